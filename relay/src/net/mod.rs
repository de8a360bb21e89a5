//! Socket-level building blocks of the relay's data movement, below any notion of a connection
//! or a security level:
//! - [`io`]: whole writes, half-close, small readiness waits, bytes not acknowledged yet;
//! - [`pool`]: per-thread data buffers in a few size classes;
//! - [`pipe`]: per-thread pipes and `splice(2)`, for plain↔plain.

pub mod io;
pub mod pipe;
pub mod pool;
