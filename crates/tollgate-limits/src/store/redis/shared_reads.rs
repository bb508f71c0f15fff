//! Concurrent reads of one counter share one round trip.
//!
//! An after-mode admission only reads its counter (`HMGET`). When many requests of one
//! counter arrive together (a gateway-wide budget, a team's shared key), each would send
//! the same read. Here the first becomes the *leader* and sends it; requests that arrive
//! while it is out *join* and take its answer, unless a write of this store landed since
//! it was sent.
//!
//! That rule keeps the reads as exact as separate ones for everything this replica
//! knows: every write this store makes (a script call, a batch of charges) bumps an
//! epoch once its reply is in, successful or not, and a read may only be joined by
//! requests that see the epoch it was sent under. So a request never takes a figure
//! older than a write this replica had finished before the request began. What a joined
//! read can miss is a write that was still in flight when the request began (another
//! replica's, or this one's own), which a read of its own could also have missed: the
//! two were concurrent. After-mode admission never saw calls still in flight anyway.
//!
//! A batch of charges is a read too: its script replies with each counter's value after
//! it, so while it is out, requests reading one of its counters join it as they would a
//! read (same epoch rule: the charge's state in Redis is no older than the moment it was
//! sent). A batch that fails, or whose reply has another shape, leaves its joiners to
//! read for themselves.
//!
//! A leader that is dropped (its request went away) or fails leaves nothing behind:
//! its joiners see the channel close and read for themselves, or take its error.
//!
//! A read nobody joins costs a map entry and two short locks: the channel joiners wait
//! on is made by the first of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use crate::store::StoreError;

/// `(value, reserved)` of one counter, or why it could not be read.
pub(crate) type ReadResult = Result<(u64, u64), StoreError>;

type Slot = watch::Receiver<Option<ReadResult>>;

#[derive(Debug, Default)]
pub(crate) struct SharedReads {
    /// Bumped after every write of the store lands (or fails, which may have landed).
    writes: AtomicU64,
    next_id: AtomicU64,
    in_flight: Mutex<Table>,
    sent: AtomicU64,
    joined: AtomicU64,
}

#[derive(Debug, Default)]
struct Table {
    /// The read of each counter that requests may join (sent under the current epoch,
    /// or the last one sent).
    current: HashMap<String, InFlight>,
    /// Channels of reads replaced by a newer one while joiners waited on them, by read
    /// id, until their leaders answer.
    replaced: HashMap<u64, watch::Sender<Option<ReadResult>>>,
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    epoch: u64,
    /// Made by the first joiner: a read nobody joins costs no channel.
    answer: Option<watch::Sender<Option<ReadResult>>>,
}

impl Table {
    /// Make read `id` of `key` (sent under `epoch`) the one requests join. A read it
    /// replaces stays out for its own joiners only.
    fn install(&mut self, key: &str, id: u64, epoch: u64) {
        let old = self.current.insert(
            key.to_owned(),
            InFlight {
                id,
                epoch,
                answer: None,
            },
        );
        if let Some(InFlight {
            id: old_id,
            answer: Some(tx),
            ..
        }) = old
        {
            self.replaced.insert(old_id, tx);
        }
    }
}

/// Whether this request sends the read or takes another's.
pub(crate) enum Turn<'a> {
    Lead(Lead<'a>),
    Join(Slot),
}

/// The right (and duty) to send one read and publish its answer.
pub(crate) struct Lead<'a> {
    reads: &'a SharedReads,
    key: &'a str,
    id: u64,
}

impl SharedReads {
    /// The turn of a request reading `key` now.
    pub fn turn<'a>(&'a self, key: &'a str) -> Turn<'a> {
        let epoch = self.writes.load(Ordering::Acquire);
        let mut in_flight = self.table();
        if let Some(f) = in_flight.current.get_mut(key) {
            if f.epoch == epoch {
                self.joined.fetch_add(1, Ordering::Relaxed);
                let slot = match &f.answer {
                    Some(tx) => tx.subscribe(),
                    None => {
                        let (tx, slot) = watch::channel(None);
                        f.answer = Some(tx);
                        slot
                    }
                };
                return Turn::Join(slot);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        in_flight.install(key, id, epoch);
        self.sent.fetch_add(1, Ordering::Relaxed);
        Turn::Lead(Lead {
            reads: self,
            key,
            id,
        })
    }

    /// A write about to be sent whose reply tells `key`'s `(value, reserved)` after it (a
    /// batch of charges): requests that read `key` while it is out join it as they would a
    /// read, under the same epoch rule. It replaces a read out now (whose joiners keep
    /// its answer); it is not counted as a read sent.
    pub fn offer<'a>(&'a self, key: &'a str) -> Lead<'a> {
        let epoch = self.writes.load(Ordering::Acquire);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut in_flight = self.table();
        in_flight.install(key, id, epoch);
        Lead {
            reads: self,
            key,
            id,
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A write of this store landed (or failed): reads sent before it are not joined.
    pub fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::AcqRel);
    }

    /// `(reads sent, requests that joined one)` so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.joined.load(Ordering::Relaxed),
        )
    }
}

impl Lead<'_> {
    /// Publish the answer to every joiner (none joined: nothing to send).
    pub fn finish(self, result: &ReadResult) {
        if let Some(tx) = self.take() {
            tx.send_replace(Some(result.clone()));
        }
    }

    /// Take this read's entry out (no one joins it after this); its channel, if a
    /// joiner made one.
    fn take(&self) -> Option<watch::Sender<Option<ReadResult>>> {
        let mut in_flight = self.reads.table();
        if in_flight
            .current
            .get(self.key)
            .is_some_and(|f| f.id == self.id)
        {
            in_flight.current.remove(self.key).and_then(|f| f.answer)
        } else {
            in_flight.replaced.remove(&self.id)
        }
    }
}

impl Drop for Lead<'_> {
    /// Gone without an answer (or after `finish`, a no-op): joiners see the channel
    /// close and read for themselves.
    fn drop(&mut self) {
        drop(self.take());
    }
}

/// A joiner's answer: the leader's, or `None` when the leader went away without one.
pub(crate) async fn answer(mut slot: Slot) -> Option<ReadResult> {
    match slot.wait_for(Option::is_some).await {
        Ok(v) => v.clone(),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lead<'a>(t: Turn<'a>) -> Lead<'a> {
        match t {
            Turn::Lead(l) => l,
            Turn::Join(_) => panic!("expected to lead"),
        }
    }

    /// Nothing left behind: no read to join, no replaced read's channel.
    fn assert_empty(reads: &SharedReads) {
        let table = reads.table();
        assert!(table.current.is_empty() && table.replaced.is_empty());
    }

    fn join(t: Turn<'_>) -> Slot {
        match t {
            Turn::Join(s) => s,
            Turn::Lead(_) => panic!("expected to join"),
        }
    }

    #[tokio::test]
    async fn joiners_take_the_leaders_answer_until_a_write_lands() {
        let reads = SharedReads::default();
        let first = lead(reads.turn("k"));
        let a = join(reads.turn("k"));
        let b = join(reads.turn("k"));
        // Another counter reads for itself.
        let other = lead(reads.turn("j"));
        // A write lands: the read out now may predate it, so the next request leads.
        reads.wrote();
        let second = lead(reads.turn("k"));
        let c = join(reads.turn("k"));
        assert_eq!(reads.counts(), (3, 3));
        first.finish(&Ok((7, 1)));
        assert_eq!(answer(a).await.map(Result::ok), Some(Some((7, 1))));
        assert_eq!(answer(b).await.map(Result::ok), Some(Some((7, 1))));
        // The first leader's end did not take the second's entry out.
        let d = join(reads.turn("k"));
        second.finish(&Err(StoreError::Timeout(50)));
        for s in [c, d] {
            assert!(matches!(
                answer(s).await,
                Some(Err(StoreError::Timeout(50)))
            ));
        }
        // Done: the next request leads again.
        drop(lead(reads.turn("k")));
        drop(other);
        assert_empty(&reads);
    }

    #[tokio::test]
    async fn a_write_offered_as_a_read_is_joined_like_one() {
        let reads = SharedReads::default();
        let read = lead(reads.turn("k"));
        let a = join(reads.turn("k"));
        // A charge of the same counter goes out: requests now join it, not the read
        // before it, whose joiners keep its answer.
        let charge = reads.offer("k");
        let b = join(reads.turn("k"));
        assert_eq!(reads.counts(), (1, 2));
        charge.finish(&Ok((9, 0)));
        read.finish(&Ok((7, 0)));
        assert_eq!(answer(a).await.map(Result::ok), Some(Some((7, 0))));
        assert_eq!(answer(b).await.map(Result::ok), Some(Some((9, 0))));
        // A charge without a usable reply leaves its joiners to read for themselves.
        let charge = reads.offer("k");
        let c = join(reads.turn("k"));
        drop(charge);
        assert!(answer(c).await.is_none());
        // Nor is a charge joined once a write landed after it was sent.
        let charge = reads.offer("k");
        reads.wrote();
        let again = lead(reads.turn("k"));
        drop(charge);
        drop(again);
        assert_eq!(reads.counts(), (2, 3));
        assert_empty(&reads);
    }

    #[tokio::test]
    async fn a_leader_gone_without_an_answer_leaves_its_joiners_to_read() {
        let reads = SharedReads::default();
        let first = lead(reads.turn("k"));
        let a = join(reads.turn("k"));
        drop(first);
        assert!(answer(a).await.is_none());
        assert_empty(&reads);
        drop(lead(reads.turn("k")));
    }
}
