//! The replica's part of the durable replica state (see `docs/design.md`,
//! "Durable replica state"): its incarnation, the head that holds its
//! epoch, and the in-sync set the head records on it.
//!
//! Invariants: the incarnation changes on every load and create, so a head
//! never takes a reloaded replica (which may lack unflushed writes) for the
//! one it wrote to; an epoch, once a head is recorded at it, is refused to
//! any other head; an in-sync record only moves forward in (epoch, seq), and
//! is durable (committed) before the call returns.

use std::collections::BTreeSet;

use cairn_api::snapshot::InSyncRecord;

use super::{Replica, State};
use crate::error::{Error, Result};

/// A fresh incarnation: random and never 0 (0 means "not checked").
pub(crate) fn new_incarnation() -> u64 {
    rand::random::<u64>().max(1)
}

impl Replica {
    /// This load's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Refuses a request that expects another incarnation (`0`: unchecked).
    pub fn check_incarnation(&self, expected: u64) -> Result<()> {
        if expected == 0 || expected == self.incarnation {
            return Ok(());
        }
        Err(Error::Incarnation { volume: self.volume.clone(), expected, actual: self.incarnation })
    }

    /// Admits `epoch` for the head `head` (empty: anonymous): like
    /// [`Replica::admit`], and at the admitted epoch, a head other than the
    /// one recorded there is refused; the first named head is recorded.
    pub(crate) fn admit_head(&self, st: &mut State, epoch: u64, head: &str) -> Result<()> {
        self.admit(st, epoch)?;
        if head.is_empty() || st.epoch_head == head {
            return Ok(());
        }
        if !st.epoch_head.is_empty() {
            return Err(Error::EpochTaken {
                volume: self.volume.clone(),
                epoch,
                holder: st.epoch_head.clone(),
                request: head.to_string(),
            });
        }
        let mut record = st.record();
        record.epoch_head = head.to_string();
        self.commit_record(&record, "recording the epoch's head")?;
        st.epoch_head = head.to_string();
        Ok(())
    }

    /// Raises the admitted epoch to `epoch` (a new head fencing the old one
    /// before its first write); returns the epoch now admitted.
    pub fn fence(&self, epoch: u64) -> Result<u64> {
        self.fence_as(epoch, "")
    }

    /// [`Replica::fence`] by the head `head` (its agent's name), which is
    /// recorded at the epoch: another head at the same epoch is refused.
    pub fn fence_as(&self, epoch: u64, head: &str) -> Result<u64> {
        let mut st = self.write_state()?;
        self.admit_head(&mut st, epoch, head)?;
        Ok(st.epoch)
    }

    /// Records, durably, the head's in-sync set `members` at (`epoch`,
    /// `seq`). Refused below the admitted epoch, from another head at it, and
    /// below the (epoch, seq) recorded; a repeat is a no-op.
    pub fn set_in_sync(
        &self,
        epoch: u64,
        head: &str,
        seq: u64,
        members: BTreeSet<String>,
    ) -> Result<()> {
        let mut st = self.write_state()?;
        self.admit_head(&mut st, epoch, head)?;
        let current = st.in_sync.as_ref().map_or((0, 0), InSyncRecord::version);
        if (epoch, seq) < current {
            return Err(Error::StaleInSync {
                volume: self.volume.clone(),
                request: (epoch, seq),
                current,
            });
        }
        let next = InSyncRecord { epoch, seq, members };
        if st.in_sync.as_ref() == Some(&next) {
            return Ok(());
        }
        let mut record = st.record();
        record.in_sync = Some(next.clone());
        self.commit_record(&record, "recording the in-sync set")?;
        st.in_sync = Some(next);
        Ok(())
    }
}
