//! One dirty-page tracker for every consumer of the dirty log.
//!
//! Reading KVM's dirty log clears it, and so does reading the monitor's own bitmap: a log read
//! by one consumer (a migration's pass) is gone for every other (the next diff snapshot).
//! [`DirtyTracker`] keeps, for each registered consumer (diff snapshots, a migration,
//! replication epochs), its own set of the pages written since that consumer last took its
//! set. Whatever is harvested from the logs is OR-ed into every set; a consumer takes only its
//! own, and gives pages back (merges them into its set again) when what it took them for - a
//! send, a snapshot - failed.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::vm::DirtyBitmap;

/// A registered consumer of dirty pages (see [`DirtyTracker::register`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DirtyConsumer(u64);

#[derive(Debug, Default)]
struct Sets {
    next: u64,
    sets: BTreeMap<u64, DirtyBitmap>,
}

/// The accumulated dirty pages of every registered consumer.
#[derive(Debug, Default)]
pub struct DirtyTracker {
    sets: Mutex<Sets>,
}

/// The tracker locked, for a harvest and a take that must not interleave with another's.
pub struct DirtyTrackerGuard<'a>(MutexGuard<'a, Sets>);

impl DirtyTracker {
    /// A tracker without consumers.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Sets> {
        self.sets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the tracker: a harvest ([`DirtyTrackerGuard::add`]) and the take that follows it
    /// happen as one step.
    pub fn locked(&self) -> DirtyTrackerGuard<'_> {
        DirtyTrackerGuard(self.lock())
    }

    /// A new consumer, with an empty set: it sees the pages written from now on (and, at
    /// worst, some written a little before - a superset is always safe).
    pub fn register(&self) -> DirtyConsumer {
        let mut sets = self.lock();
        let id = sets.next;
        sets.next += 1;
        sets.sets.insert(id, DirtyBitmap::default());
        tracing::debug!(consumer = id, "dirty-page consumer registered");
        DirtyConsumer(id)
    }

    /// Forgets `consumer` and its set.
    pub fn unregister(&self, consumer: DirtyConsumer) {
        self.lock().sets.remove(&consumer.0);
        tracing::debug!(consumer = consumer.0, "dirty-page consumer unregistered");
    }

    /// Whether `consumer` is registered.
    pub fn is_registered(&self, consumer: DirtyConsumer) -> bool {
        self.lock().sets.contains_key(&consumer.0)
    }

    /// How many consumers are registered.
    pub fn consumers(&self) -> usize {
        self.lock().sets.len()
    }

    /// Merges `pages` back into `consumer`'s set: they were taken but not consumed (the send
    /// or the write they were for failed). Nothing happens for an unregistered consumer.
    pub fn give_back(&self, consumer: DirtyConsumer, pages: &DirtyBitmap) {
        if let Some(set) = self.lock().sets.get_mut(&consumer.0) {
            set.merge(pages);
        }
    }
}

impl DirtyTrackerGuard<'_> {
    /// Adds harvested pages to every consumer's set.
    pub fn add(&mut self, harvested: &DirtyBitmap) {
        for set in self.0.sets.values_mut() {
            set.merge(harvested);
        }
    }

    /// Takes `consumer`'s set, leaving it empty; `None` for an unregistered consumer.
    pub fn take(&mut self, consumer: DirtyConsumer) -> Option<DirtyBitmap> {
        self.0.sets.get_mut(&consumer.0).map(std::mem::take)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(bits: &[u64]) -> DirtyBitmap {
        let mut words = vec![0u64; 2];
        for &b in bits {
            words[(b / 64) as usize] |= 1 << (b % 64);
        }
        DirtyBitmap(vec![words])
    }

    #[test]
    fn every_consumer_sees_every_harvest_and_takes_only_its_own_set() {
        let tracker = DirtyTracker::new();
        let snapshots = tracker.register();
        let migration = tracker.register();
        tracker.locked().add(&pages(&[1, 2]));
        assert_eq!(tracker.locked().take(migration), Some(pages(&[1, 2])));
        tracker.locked().add(&pages(&[70]));
        // The migration's take did not consume the snapshots' pages.
        assert_eq!(tracker.locked().take(snapshots), Some(pages(&[1, 2, 70])));
        assert_eq!(tracker.locked().take(migration), Some(pages(&[70])));
        assert_eq!(tracker.locked().take(snapshots).unwrap().count(), 0);
    }

    #[test]
    fn pages_given_back_come_again_with_the_next_take() {
        let tracker = DirtyTracker::new();
        let epochs = tracker.register();
        tracker.locked().add(&pages(&[3]));
        let taken = tracker.locked().take(epochs).unwrap();
        tracker.locked().add(&pages(&[4]));
        tracker.give_back(epochs, &taken);
        assert_eq!(tracker.locked().take(epochs), Some(pages(&[3, 4])));
    }

    #[test]
    fn a_new_consumer_starts_empty_and_a_gone_one_takes_nothing() {
        let tracker = DirtyTracker::new();
        let first = tracker.register();
        tracker.locked().add(&pages(&[5]));
        let late = tracker.register();
        assert_eq!(tracker.locked().take(late).unwrap().count(), 0);
        tracker.unregister(first);
        assert!(!tracker.is_registered(first));
        assert_eq!(tracker.locked().take(first), None);
        tracker.give_back(first, &pages(&[6]));
        assert_eq!(tracker.consumers(), 1);
    }
}
