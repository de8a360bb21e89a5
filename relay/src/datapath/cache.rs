//! The caches in front of the policy and server hash maps: `Array` maps of buckets
//! ([`Bucket`]) that the programs read without a kernel call, the hash maps staying the exact
//! record for keys whose bucket has no room (`overflow`).
//!
//! The programs read a bucket while userspace writes it, and a map update is a plain copy: a
//! reader may see any mix of the old and the new bytes. So a bucket never changes in one write
//! from one key to another. [`plan`] takes it there in steps, each of which changes either keys
//! whose entries are empty (value zero) or values whose keys stay, and it sends readers to the
//! hash map (`overflow`) for as long as entries change. Whatever mix a reader sees, a key that
//! stays protected is either found with its value or looked up in the hash map, which
//! [`super::Maps::sync`] fills before the caches' entries change and empties after.

use std::{collections::HashMap as StdHashMap, hash::Hash};

use anyhow::Context as _;
use aya::{
    Pod,
    maps::{Array, HashMap, MapData},
};
use relay_common::{
    BUCKET_ENTRIES, Bucket, Policy, PolicyEntryV4, PolicyEntryV6, PolicyKeyV4, PolicyKeyV6,
    ServerEntryV4, ServerEntryV6, policy_bucket_v4, policy_bucket_v6, server_bucket_v4,
    server_bucket_v6,
};

/// An entry of a cache bucket: a key and its value, empty while the value is zero.
pub trait Entry: Pod + PartialEq {
    type Key: Pod + Eq + Hash + Ord;
    type Value: Pod + PartialEq;
    fn new(key: Self::Key, value: Self::Value) -> Self;
    fn key(&self) -> Self::Key;
    fn is_empty(&self) -> bool;
    /// The same key with a zero value: empty.
    fn emptied(&self) -> Self;
    /// The bucket of `key`.
    fn bucket(key: &Self::Key) -> u32;
}

const NO_POLICY: Policy = Policy { action: 0, slot: 0 };

impl Entry for PolicyEntryV4 {
    type Key = PolicyKeyV4;
    type Value = Policy;
    fn new(key: PolicyKeyV4, policy: Policy) -> Self {
        PolicyEntryV4 { key, policy }
    }
    fn key(&self) -> PolicyKeyV4 {
        self.key
    }
    fn is_empty(&self) -> bool {
        self.policy.action == 0
    }
    fn emptied(&self) -> Self {
        Self::new(self.key, NO_POLICY)
    }
    fn bucket(key: &PolicyKeyV4) -> u32 {
        policy_bucket_v4(&key.addr, key.port)
    }
}

impl Entry for PolicyEntryV6 {
    type Key = PolicyKeyV6;
    type Value = Policy;
    fn new(key: PolicyKeyV6, policy: Policy) -> Self {
        PolicyEntryV6 { key, policy }
    }
    fn key(&self) -> PolicyKeyV6 {
        self.key
    }
    fn is_empty(&self) -> bool {
        self.policy.action == 0
    }
    fn emptied(&self) -> Self {
        Self::new(self.key, NO_POLICY)
    }
    fn bucket(key: &PolicyKeyV6) -> u32 {
        policy_bucket_v6(&key.addr, key.port)
    }
}

impl Entry for ServerEntryV4 {
    type Key = [u8; 4];
    type Value = u32;
    fn new(addr: [u8; 4], slot: u32) -> Self {
        ServerEntryV4 { addr, slot }
    }
    fn key(&self) -> [u8; 4] {
        self.addr
    }
    fn is_empty(&self) -> bool {
        self.slot == 0
    }
    fn emptied(&self) -> Self {
        Self::new(self.addr, 0)
    }
    fn bucket(addr: &[u8; 4]) -> u32 {
        server_bucket_v4(addr)
    }
}

impl Entry for ServerEntryV6 {
    type Key = [u8; 16];
    type Value = u32;
    fn new(addr: [u8; 16], slot: u32) -> Self {
        ServerEntryV6 { addr, slot }
    }
    fn key(&self) -> [u8; 16] {
        self.addr
    }
    fn is_empty(&self) -> bool {
        self.slot == 0
    }
    fn emptied(&self) -> Self {
        Self::new(self.addr, 0)
    }
    fn bucket(addr: &[u8; 16]) -> u32 {
        server_bucket_v6(addr)
    }
}

/// The bucket values to write, in order, to bring one bucket to what it should hold.
#[derive(Debug, PartialEq, Eq)]
pub struct Steps<E> {
    /// Written before the hash map changes: the bucket as it is, sending readers to the map.
    pub before: Option<Bucket<E>>,
    /// Written after the hash map has changed; the last one is what the bucket should hold.
    pub after: Vec<Bucket<E>>,
}

/// The steps from `current` to a bucket holding `wanted` (the keys of this bucket, with their
/// values), or `None` if it already does. Keys that stay keep their entries; the others fill
/// the free entries in key order; keys beyond the bucket's room stay in the hash map alone.
pub fn plan<E: Entry>(
    current: &Bucket<E>,
    wanted: &StdHashMap<E::Key, E::Value>,
) -> Option<Steps<E>> {
    let mut target = *current;
    let mut inline = std::collections::HashSet::new();
    for e in &mut target.entries {
        // A key twice in one bucket (never written so, but pins outlive versions) keeps one.
        let stays = !e.is_empty() && !inline.contains(&e.key());
        match wanted.get(&e.key()) {
            Some(v) if stays => {
                inline.insert(e.key());
                *e = E::new(e.key(), *v);
            }
            _ => *e = e.emptied(),
        }
    }
    let mut rest: Vec<(E::Key, E::Value)> = wanted
        .iter()
        .filter(|(k, _)| !inline.contains(*k))
        .map(|(k, v)| (*k, *v))
        .collect();
    rest.sort_by_key(|(k, _)| *k);
    let mut rest = rest.into_iter();
    for e in target.entries.iter_mut().filter(|e| e.is_empty()) {
        match rest.next() {
            Some((k, v)) => *e = E::new(k, v),
            None => break,
        }
    }
    target.overflow = u32::from(rest.next().is_some());
    if target == *current {
        return None;
    }

    let deferring = Bucket {
        overflow: 1,
        ..*current
    };
    // Entries whose key changes are emptied first (the old key stays, its value goes)...
    let mut freed = deferring;
    // ... then take their new key, still empty ...
    let mut keyed = deferring;
    for i in 0..BUCKET_ENTRIES {
        if current.entries[i].key() != target.entries[i].key() {
            freed.entries[i] = current.entries[i].emptied();
            keyed.entries[i] = target.entries[i].emptied();
        }
    }
    // ... then every value is set at once, the keys standing still ...
    let valued = Bucket {
        overflow: 1,
        ..target
    };
    // ... and only then may readers stop asking the hash map.
    let mut after: Vec<Bucket<E>> = Vec::new();
    let mut last = deferring;
    for step in [freed, keyed, valued, target] {
        if step != last {
            after.push(step);
            last = step;
        }
    }
    Some(Steps {
        before: (deferring != *current).then_some(deferring),
        after,
    })
}

/// A hash map (the exact record) and its cache (what the programs read first).
pub struct Cached<E: Entry>
where
    Bucket<E>: Pod,
{
    name: &'static str,
    exact: HashMap<MapData, E::Key, E::Value>,
    cache: Array<MapData, Bucket<E>>,
}

/// What [`Cached::begin`] found to write to the cache.
pub struct Plans<E>(Vec<(u32, Steps<E>)>);

impl<E: Entry> Cached<E>
where
    Bucket<E>: Pod,
{
    pub fn new(
        name: &'static str,
        exact: HashMap<MapData, E::Key, E::Value>,
        cache: Array<MapData, Bucket<E>>,
    ) -> Self {
        Cached { name, exact, cache }
    }

    /// First of three: the buckets that are to change send readers to the hash map.
    pub fn begin(&mut self, wanted: &StdHashMap<E::Key, E::Value>) -> anyhow::Result<Plans<E>> {
        let mut by_bucket: StdHashMap<u32, StdHashMap<E::Key, E::Value>> = StdHashMap::new();
        for (k, v) in wanted {
            by_bucket.entry(E::bucket(k)).or_default().insert(*k, *v);
        }
        let none = StdHashMap::new();
        let mut plans = Vec::new();
        for i in 0..self.cache.len() {
            let current = self.cache.get(&i, 0).context(self.name)?;
            if let Some(steps) = plan(&current, by_bucket.get(&i).unwrap_or(&none)) {
                plans.push((i, steps));
            }
        }
        for (i, steps) in &plans {
            if let Some(b) = &steps.before {
                self.cache.set(*i, b, 0).context(self.name)?;
            }
        }
        Ok(Plans(plans))
    }

    /// Second: new keys into the hash map (every map's before any stale key leaves any map).
    pub fn insert(&mut self, wanted: &StdHashMap<E::Key, E::Value>) -> anyhow::Result<()> {
        for (k, v) in wanted {
            self.exact.insert(k, v, 0).context(self.name)?;
        }
        Ok(())
    }

    /// ... and stale keys out of it.
    pub fn remove_stale(&mut self, wanted: &StdHashMap<E::Key, E::Value>) -> anyhow::Result<()> {
        let stale: Vec<E::Key> = self
            .exact
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains_key(k))
            .collect();
        for k in stale {
            self.exact.remove(&k).context(self.name)?;
        }
        Ok(())
    }

    /// Third: the cache's buckets in their steps, each bucket to the end.
    pub fn finish(&mut self, Plans(plans): Plans<E>) -> anyhow::Result<()> {
        for (i, steps) in plans {
            for b in &steps.after {
                self.cache.set(i, b, 0).context(self.name)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type E = ServerEntryV4;

    fn empty() -> Bucket<E> {
        Bucket {
            entries: [E::new([0; 4], 0); BUCKET_ENTRIES],
            overflow: 0,
            _pad: 0,
        }
    }

    fn addr(n: u8) -> [u8; 4] {
        [192, 0, 2, n]
    }

    fn wanted(keys: &[(u8, u32)]) -> StdHashMap<[u8; 4], u32> {
        keys.iter().map(|(n, slot)| (addr(*n), *slot)).collect()
    }

    /// What a reader of `b` finds for `key`: `Some(value)`, or `None` for "ask the hash map".
    fn read(b: &Bucket<E>, key: [u8; 4]) -> Option<Option<u32>> {
        for e in &b.entries {
            if !e.is_empty() && e.key() == key {
                return Some(Some(e.slot));
            }
        }
        (b.overflow == 0).then_some(None)
    }

    /// Every mix a reader can see between `a` and `b`, field by field (each entry's key and
    /// value, the overflow flag, each from either side).
    fn mixes(a: &Bucket<E>, b: &Bucket<E>) -> Vec<Bucket<E>> {
        let mut out = vec![*a];
        for i in 0..BUCKET_ENTRIES {
            let mut next = Vec::new();
            for m in &out {
                for (k, v) in [
                    (a.entries[i].addr, a.entries[i].slot),
                    (a.entries[i].addr, b.entries[i].slot),
                    (b.entries[i].addr, a.entries[i].slot),
                    (b.entries[i].addr, b.entries[i].slot),
                ] {
                    let mut m = *m;
                    m.entries[i] = E::new(k, v);
                    next.push(m);
                }
            }
            out = next;
        }
        let mut with_flag = Vec::new();
        for m in out {
            for overflow in [a.overflow, b.overflow] {
                with_flag.push(Bucket { overflow, ..m });
            }
        }
        with_flag
    }

    /// Applies the steps from `from` to `to` and checks, for every state and every mix a reader
    /// can see on the way, that each key in both finds its value (old or new) or the hash map,
    /// that no key is found with a value it never had, and that the end holds `to`.
    fn check(from: &Bucket<E>, old: &StdHashMap<[u8; 4], u32>, to: &StdHashMap<[u8; 4], u32>) {
        let Some(steps) = plan(from, to) else {
            for k in to.keys() {
                assert!(read(from, *k).is_some(), "unchanged bucket must hold {k:?}");
            }
            return;
        };
        let mut states = vec![*from];
        states.extend(steps.before);
        states.extend(steps.after.iter().copied());
        for pair in states.windows(2) {
            for m in mixes(&pair[0], &pair[1]) {
                for e in m.entries.iter().filter(|e| !e.is_empty()) {
                    let (k, v) = (e.key(), e.slot);
                    assert!(
                        old.get(&k) == Some(&v) || to.get(&k) == Some(&v),
                        "{k:?} with a value it never had ({v}) in {m:?}"
                    );
                }
                for (k, new) in to {
                    let Some(old) = old.get(k) else { continue };
                    match read(&m, *k) {
                        Some(Some(v)) => assert!(v == *old || v == *new, "{k:?}: value {v}"),
                        Some(None) => panic!("{k:?} lost in {m:?} between {pair:?}"),
                        None => {}
                    }
                }
            }
        }
        let end = states.last().unwrap();
        for (k, v) in to {
            assert!(
                matches!(read(end, *k), Some(Some(x)) if x == *v) || end.overflow != 0,
                "{k:?} in the end: {end:?}"
            );
        }
        for e in &end.entries {
            assert!(e.is_empty() || to.get(&e.key()) == Some(&e.slot));
        }
        assert_eq!(
            end.overflow != 0,
            to.keys().any(|k| !matches!(read(end, *k), Some(Some(_)))),
            "overflow only for keys without an entry"
        );
    }

    /// Runs `plan` from the bucket `old` configures (from empty) to `new`.
    fn transition(old: &[(u8, u32)], new: &[(u8, u32)]) {
        let (old, new) = (wanted(old), wanted(new));
        let mut bucket = empty();
        if let Some(s) = plan(&bucket, &old) {
            bucket = *s.after.last().unwrap();
        }
        check(&bucket, &old, &new);
    }

    #[test]
    fn fills_an_empty_bucket_in_steps() {
        let steps = plan(&empty(), &wanted(&[(1, 1), (2, 2)])).unwrap();
        let before = steps.before.unwrap();
        assert_eq!(before.overflow, 1, "readers ask the hash map first");
        assert_eq!(before.entries, empty().entries);
        let last = steps.after.last().unwrap();
        assert_eq!(last.overflow, 0);
        assert_eq!(last.entries[0], E::new(addr(1), 1));
        assert_eq!(last.entries[1], E::new(addr(2), 2));
        // Keys with empty values, then values, then the flag.
        assert_eq!(steps.after.len(), 3, "{:?}", steps.after);
        assert!(steps.after[0].entries.iter().all(E::is_empty));
    }

    #[test]
    fn an_unchanged_bucket_is_not_written() {
        let w = wanted(&[(1, 1)]);
        let b = *plan(&empty(), &w).unwrap().after.last().unwrap();
        assert_eq!(plan(&b, &w), None);
    }

    #[test]
    fn keys_beyond_the_room_overflow_into_the_hash_map() {
        let many: Vec<(u8, u32)> = (1..=6).map(|n| (n, u32::from(n))).collect();
        let steps = plan(&empty(), &wanted(&many)).unwrap();
        let last = steps.after.last().unwrap();
        assert_eq!(last.overflow, 1);
        assert!(last.entries.iter().all(|e| !e.is_empty()));
        transition(&[], &many);
    }

    #[test]
    fn every_transition_keeps_staying_keys_findable() {
        /// (address's last byte, slot) of the servers before and after.
        type Config<'a> = &'a [(u8, u32)];
        let cases: &[(Config, Config)] = &[
            (&[(1, 1), (2, 2)], &[(2, 2), (3, 3)]),
            (
                &[(1, 1), (2, 2), (3, 3), (4, 4)],
                &[(5, 5), (2, 2), (3, 3), (4, 4)],
            ),
            (&[(1, 1), (2, 2)], &[(1, 7), (2, 2)]),
            (&[(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)], &[(5, 5), (6, 6)]),
            (
                &[(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)],
                &[(1, 1), (2, 2), (3, 3), (4, 4)],
            ),
            (&[(1, 1)], &[]),
            (&[], &[(9, 9)]),
        ];
        for (old, new) in cases {
            transition(old, new);
        }
    }

    #[test]
    fn entries_of_other_buckets_are_dropped() {
        // A pinned cache filled by another hash function, say: keys in the wrong bucket go.
        let mut b = empty();
        b.entries[2] = E::new(addr(8), 8);
        let steps = plan(&b, &wanted(&[(1, 1)])).unwrap();
        let last = steps.after.last().unwrap();
        assert!(
            last.entries
                .iter()
                .all(|e| e.is_empty() || e.key() == addr(1))
        );
        check(&b, &wanted(&[(8, 8)]), &wanted(&[(1, 1)]));
    }
}
