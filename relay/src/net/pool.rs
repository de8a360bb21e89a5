//! Per-thread pool of data buffers in a few size classes. A connection takes one while it has
//! bytes in flight and drops it right after, which gives it back; the pool keeps a bounded
//! number per class so a burst does not stay resident.

use std::cell::RefCell;

/// The smallest class, and the size a direction starts with: interactive traffic fits.
pub const MIN: usize = 4 << 10;

const CLASSES: usize = 6; // 4, 8, 16, 32, 64, 128 KiB
const KEEP: usize = 64;

thread_local! {
    static FREE: RefCell<[Vec<Box<[u8]>>; CLASSES]> = RefCell::new(Default::default());
    static IN_USE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
}

/// Buffers taken on this thread and not given back yet (tests: idle holds none).
pub fn in_use() -> isize {
    IN_USE.with(|c| c.get())
}

fn class(size: usize) -> usize {
    let mut c = 0;
    while c + 1 < CLASSES && (MIN << c) < size {
        c += 1;
    }
    c
}

/// The largest pooled buffer.
pub const LARGEST: usize = MIN << (CLASSES - 1);

/// A data buffer that goes back to the pool when dropped.
pub struct Buf(Box<[u8]>);

impl Buf {
    /// No buffer at all (holds no memory).
    pub fn none() -> Buf {
        Buf(Box::default())
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
}

/// A buffer of at least `size` bytes: rounded up to its class, or of exactly `size` (and not
/// pooled) above [`LARGEST`].
pub fn take(size: usize) -> Buf {
    IN_USE.with(|n| n.set(n.get() + 1));
    if size > LARGEST {
        return Buf(vec![0u8; size].into_boxed_slice());
    }
    let c = class(size);
    Buf(FREE
        .with(|f| f.borrow_mut()[c].pop())
        .unwrap_or_else(|| vec![0u8; MIN << c].into_boxed_slice()))
}

fn give(buf: Box<[u8]>) {
    if buf.is_empty() {
        return;
    }
    IN_USE.with(|n| n.set(n.get() - 1));
    let c = class(buf.len());
    if MIN << c != buf.len() {
        return;
    }
    FREE.with(|f| {
        let mut f = f.borrow_mut();
        if f[c].len() < KEEP {
            f[c].push(buf);
        }
    });
}
