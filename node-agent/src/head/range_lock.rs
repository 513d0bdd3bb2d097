//! Byte-range locks for a volume head: writes hold their range shared, a
//! rebuild's copy of a few blocks holds its range exclusively, so a write
//! waits only when it overlaps the blocks being copied at that moment.
//!
//! Invariants: an exclusive range never overlaps another held range; once
//! an exclusive range is asked for, new shared ranges overlapping it wait
//! (the copier is not starved by a stream of writes), and it is granted
//! when the shared ones already held there are released.

use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct RangeLocks {
    state: Mutex<State>,
    released: Notify,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// id -> [start, end)
    shared: Vec<(u64, u64, u64)>,
    /// id -> [start, end), asked for or granted.
    exclusive: Vec<(u64, u64, u64)>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// A held range; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.locks.state.lock().unwrap();
        st.shared.retain(|r| r.0 != self.id);
        st.exclusive.retain(|r| r.0 != self.id);
        drop(st);
        self.locks.released.notify_waiters();
    }
}

impl State {
    fn exclusive_overlaps(&self, start: u64, end: u64) -> bool {
        self.exclusive.iter().any(|e| overlaps((e.1, e.2), (start, end)))
    }

    fn shared_overlaps(&self, start: u64, end: u64) -> bool {
        self.shared.iter().any(|s| overlaps((s.1, s.2), (start, end)))
    }

    fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

impl RangeLocks {
    /// Waits until `step` returns `Some` (it is tried under the state's
    /// lock, again after every release).
    async fn wait_until<T>(&self, mut step: impl FnMut(&mut State) -> Option<T>) -> T {
        loop {
            // Registered before looking, so a release in between wakes us.
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = step(&mut self.state.lock().unwrap()) {
                return v;
            }
            notified.await;
        }
    }

    /// Holds `[start, end)` shared: waits while an exclusive range (held or
    /// asked for) overlaps it.
    pub async fn shared(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let id = self
            .wait_until(|st| {
                (!st.exclusive_overlaps(start, end)).then(|| {
                    let id = st.next_id();
                    st.shared.push((id, start, end));
                    id
                })
            })
            .await;
        RangeGuard { locks: self, id }
    }

    /// Holds `[start, end)` exclusively: first waits for overlapping
    /// exclusive ranges, then claims the range (new overlapping shared
    /// holders wait from then on) and waits until the overlapping shared
    /// holders already there are released.
    pub async fn exclusive(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let id = self
            .wait_until(|st| {
                (!st.exclusive_overlaps(start, end)).then(|| {
                    let id = st.next_id();
                    st.exclusive.push((id, start, end));
                    id
                })
            })
            .await;
        // From here a cancelled wait releases the claim.
        let guard = RangeGuard { locks: self, id };
        self.wait_until(|st| (!st.shared_overlaps(start, end)).then_some(())).await;
        guard
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    async fn blocked<F: Future>(f: F) -> bool {
        tokio::time::timeout(Duration::from_millis(50), f).await.is_err()
    }

    #[tokio::test]
    async fn disjoint_ranges_do_not_wait() {
        let l = RangeLocks::default();
        let _a = l.shared(0, 10).await;
        let _b = l.exclusive(10, 20).await;
        let _c = l.shared(20, 30).await;
        assert!(!blocked(l.shared(5, 10)).await);
    }

    #[tokio::test]
    async fn an_exclusive_range_waits_for_overlapping_writes_and_holds_new_ones() {
        let l = Arc::new(RangeLocks::default());
        let w = l.shared(0, 8).await;
        let copier = tokio::spawn({
            let l = l.clone();
            async move {
                let _g = l.exclusive(4, 12).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!copier.is_finished(), "the copier waits for the write in flight");
        assert!(blocked(l.shared(10, 11)).await, "a new overlapping write waits for the copier");
        drop(w);
        copier.await.unwrap();
        assert!(!blocked(l.shared(10, 11)).await, "and goes once the copier is done");
    }

    #[tokio::test]
    async fn exclusive_ranges_exclude_each_other() {
        let l = RangeLocks::default();
        let g = l.exclusive(0, 10).await;
        assert!(blocked(l.exclusive(9, 10)).await);
        drop(g);
        assert!(!blocked(l.exclusive(9, 10)).await);
    }
}
