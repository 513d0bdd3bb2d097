//! The copy session as a state machine without I/O: the sending and the
//! receiving end's protocol decisions (what to send next, when to
//! checkpoint, what a resume starts from, when to seal, what a broken
//! stream leaves). The tonic and disk code in `copy::sender` and
//! `copy::receiver` feed them events (replies, frames, the clock) and carry
//! out what they answer; nothing here reads a disk, a socket or the clock.
//!
//! Invariant kept: a checkpoint names a block before which every block is
//! durable at the target, for one snapshot, generation and base; a resume
//! starts there and nowhere else, and a seal happens only on equal digests.

pub mod receiver;
pub mod sender;

#[cfg(test)]
mod sim;

use serde::{Deserialize, Serialize};

/// Where a broken copy stands (the value of the `copy_checkpoints` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub snapshot: String,
    pub generation: u64,
    /// The base snapshot of an incremental copy, empty for a full one.
    pub base: String,
    /// Every block before this index is durable at the target.
    pub through_block: u64,
    pub bytes_done: u64,
}
