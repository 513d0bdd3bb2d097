//! The role of an open head (Primary or Remote) and the fence between a
//! change of it (promote, demote, close) and the copy sessions that write a
//! Remote head. No I/O and no tonic: `heads` changes roles, the copy
//! receiver (`copy::receiver`) claims the head and applies its batches
//! through a [`CopyClaim`].
//!
//! Invariants:
//! - a copy writes (or checkpoints, or seals) a head only while it holds an
//!   [`Apply`] guard of its claim, and it gets one only while the role is
//!   the one its claim was taken under (the same term); a role change bumps
//!   the term first (every session learns it is fenced), then takes the
//!   gate exclusively, so it waits for the applies in flight, and every
//!   apply after it is refused: after a promote returns, no copy byte lands;
//! - at most one claim per head: never two copy streams writing one target.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::{OwnedRwLockReadGuard, RwLock, RwLockWriteGuard, watch};

/// What ended the term a copy was admitted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The head was opened (the first term; never ends a claim).
    Opened,
    Promoted,
    Demoted,
    /// The head was closed or replaced by one at a newer epoch.
    Closed,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Change::Opened => "opened",
            Change::Promoted => "promoted",
            Change::Demoted => "demoted",
            Change::Closed => "closed or reopened at a newer epoch",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Term {
    n: u64,
    /// The change that began this term.
    by: Change,
}

/// Who holds a head's copy claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub link: String,
    pub snapshot: String,
}

#[derive(Debug)]
struct Inner {
    remote: AtomicBool,
    /// Shared by each apply of a copy, exclusive for a role change.
    gate: Arc<RwLock<()>>,
    term: watch::Sender<Term>,
    /// The copy session writing this head, if any.
    claim: watch::Sender<Option<Holder>>,
}

/// The role of one open head; clones share it.
#[derive(Debug, Clone)]
pub struct Role(Arc<Inner>);

/// The claim is held by another copy (see [`Role::claim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy(pub Holder);

/// The role changed after the claim was taken: the copy must start again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced(pub Change);

impl Role {
    pub fn new(remote: bool) -> Self {
        Role(Arc::new(Inner {
            remote: AtomicBool::new(remote),
            gate: Arc::new(RwLock::new(())),
            term: watch::channel(Term { n: 0, by: Change::Opened }).0,
            claim: watch::channel(None).0,
        }))
    }

    /// Role Remote: only copies write it.
    pub fn is_remote(&self) -> bool {
        self.0.remote.load(Ordering::SeqCst)
    }

    /// Begins a role change: ends the current term at once (every copy
    /// claim of it is fenced; a session waiting for frames learns it now),
    /// then waits for the applies in flight. The role is changed with
    /// [`RoleChange::set_remote`] while the change is held; no apply runs
    /// until it is dropped, and none of the old term ever again.
    pub async fn change(&self, by: Change) -> RoleChange<'_> {
        self.0.term.send_modify(|t| *t = Term { n: t.n + 1, by });
        RoleChange { inner: &self.0, _gate: self.0.gate.write().await }
    }

    /// The copy claim of this head for `holder`, waiting up to `wait` for
    /// another claim to be released (a session ending after a break still
    /// records its checkpoint); refused with the holder after that.
    pub async fn claim(&self, holder: Holder, wait: Duration) -> Result<CopyClaim, Busy> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut freed = self.0.claim.subscribe();
        loop {
            let taken = self.0.claim.send_if_modified(|c| match c {
                None => {
                    *c = Some(holder.clone());
                    true
                }
                Some(_) => false,
            });
            if taken {
                let term = self.0.term.borrow().n;
                return Ok(CopyClaim { role: self.clone(), term });
            }
            let wait = tokio::time::timeout_at(deadline, freed.wait_for(Option::is_none));
            if wait.await.is_err() {
                let other = self.0.claim.borrow().clone();
                return Err(Busy(other.unwrap_or(holder)));
            }
        }
    }

    /// Who holds the copy claim now.
    pub fn holder(&self) -> Option<Holder> {
        self.0.claim.borrow().clone()
    }
}

/// A role change in progress (see [`Role::change`]).
#[derive(Debug)]
pub struct RoleChange<'a> {
    inner: &'a Inner,
    _gate: RwLockWriteGuard<'a, ()>,
}

impl RoleChange<'_> {
    pub fn set_remote(&self, remote: bool) {
        self.inner.remote.store(remote, Ordering::SeqCst);
    }
}

/// The one copy session allowed to write a head, bound to the term (role
/// and head instance) it was taken in; released when dropped.
#[derive(Debug)]
pub struct CopyClaim {
    role: Role,
    term: u64,
}

/// Held while a batch (or a checkpoint, or a seal) is applied: no role
/// change happens meanwhile.
#[derive(Debug)]
pub struct Apply {
    _gate: OwnedRwLockReadGuard<()>,
}

impl CopyClaim {
    /// Leave to write: refused once the term of the claim has ended.
    pub async fn apply(&self) -> Result<Apply, Fenced> {
        let gate = self.role.0.gate.clone().read_owned().await;
        let now = *self.role.0.term.borrow();
        if now.n != self.term {
            return Err(Fenced(now.by));
        }
        Ok(Apply { _gate: gate })
    }

    /// Whether the head's role is Remote (as of now).
    pub fn remote(&self) -> bool {
        self.role.is_remote()
    }

    /// Resolves when the term of the claim ends, with what ended it.
    pub async fn fenced(&self) -> Fenced {
        let mut rx = self.role.0.term.subscribe();
        let mine = self.term;
        match rx.wait_for(|t| t.n != mine).await {
            Ok(t) => Fenced(t.by),
            // The sender lives in `Inner`, which this claim holds.
            Err(_) => unreachable!("the role outlives its claims"),
        }
    }
}

impl Drop for CopyClaim {
    fn drop(&mut self) {
        self.role.0.claim.send_replace(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(link: &str) -> Holder {
        Holder { link: link.into(), snapshot: "s2".into() }
    }

    #[tokio::test]
    async fn a_promote_waits_for_the_apply_in_flight_and_refuses_every_later_one() {
        let role = Role::new(true);
        let claim = role.claim(holder("a-b"), Duration::ZERO).await.unwrap();
        let applying = claim.apply().await.unwrap();
        let promote = {
            let role = role.clone();
            tokio::spawn(async move {
                let change = role.change(Change::Promoted).await;
                change.set_remote(false);
            })
        };
        // The session learns at once that it is fenced...
        assert_eq!(claim.fenced().await, Fenced(Change::Promoted));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ...but the promote waits for the batch being applied.
        assert!(!promote.is_finished(), "a role change waits for the apply in flight");
        assert!(role.is_remote(), "the role is unchanged while a batch is applied");
        drop(applying);
        promote.await.unwrap();
        assert!(!role.is_remote());
        assert_eq!(claim.apply().await.unwrap_err(), Fenced(Change::Promoted));
    }

    #[tokio::test]
    async fn a_claim_taken_after_a_change_applies_and_an_old_one_never_again() {
        let role = Role::new(true);
        let old = role.claim(holder("a-b"), Duration::ZERO).await.unwrap();
        drop(role.change(Change::Promoted).await);
        drop(role.change(Change::Demoted).await);
        assert_eq!(old.apply().await.unwrap_err(), Fenced(Change::Demoted), "back to Remote");
        drop(old);
        let new = role.claim(holder("a-b"), Duration::ZERO).await.unwrap();
        assert!(new.apply().await.is_ok());
        drop(role.change(Change::Closed).await);
        assert_eq!(new.apply().await.unwrap_err(), Fenced(Change::Closed));
    }

    #[tokio::test]
    async fn a_second_claim_is_refused_while_the_first_is_held_and_waits_for_its_release() {
        let role = Role::new(true);
        let first = role.claim(holder("a-b"), Duration::ZERO).await.unwrap();
        let refused = role.claim(holder("c-b"), Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(refused, Busy(holder("a-b")), "names the copy that holds the target");
        let waiting = {
            let role = role.clone();
            tokio::spawn(async move { role.claim(holder("a-b"), Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(first);
        let second = waiting.await.unwrap().expect("admitted once the first is released");
        assert_eq!(role.holder(), Some(holder("a-b")));
        drop(second);
        assert_eq!(role.holder(), None);
    }
}
