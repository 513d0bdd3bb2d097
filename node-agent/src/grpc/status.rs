//! Error -> gRPC status: each module's error enum (store, head, heads,
//! links, copy) mapped to the code a client acts on.
//!
//! Invariant: every match is exhaustive (no `_ =>`), so a new variant must
//! choose its code; the message is the error's whole source chain; a stale
//! epoch carries the `REASON_STALE_EPOCH` metadata whichever way it arrives.

use cairn_api::{
    GeometryError, RangeError,
    agent::{REASON_METADATA, REASON_STALE_EPOCH},
    convert::FieldError,
};
use tonic::{Code, Status};

use crate::{
    copy::{links::LinkError, sender::CopyError, session::sender::Fault},
    error::Error,
    head::HeadError,
    heads::HeadsError,
};

/// The error's message followed by every source not already in it (most
/// messages name their source themselves).
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !msg.contains(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        source = s.source();
    }
    msg
}

fn stale_epoch(mut status: Status) -> Status {
    status
        .metadata_mut()
        .insert(REASON_METADATA, tonic::metadata::MetadataValue::from_static(REASON_STALE_EPOCH));
    status
}

/// A request field that does not parse.
pub fn field(e: FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The code of a store error.
fn store_code(e: &Error) -> Code {
    match e {
        Error::ReplicaNotFound { .. } | Error::SnapshotNotFound { .. } => Code::NotFound,
        Error::ReplicaExists { .. } | Error::SnapshotExists { .. } => Code::AlreadyExists,
        Error::StaleGeneration { .. }
        | Error::ChunkNotHeld { .. }
        | Error::StaleEpoch { .. }
        | Error::EpochTaken { .. }
        | Error::StaleInSync { .. } => Code::FailedPrecondition,
        Error::Incarnation { .. } => Code::Aborted,
        Error::Range { source, .. } => match source {
            RangeError::PastEnd { .. } => Code::OutOfRange,
            RangeError::Unaligned { .. } | RangeError::Empty | RangeError::TooLong { .. } => {
                Code::InvalidArgument
            }
        },
        Error::Geometry { source, .. } => match source {
            GeometryError::ChunkPastEnd { .. } => Code::OutOfRange,
            GeometryError::BadSize { .. }
            | GeometryError::TooLarge { .. }
            | GeometryError::BadChunkSize { .. }
            | GeometryError::Shrink { .. } => Code::InvalidArgument,
        },
        Error::Checksum { .. } | Error::Corrupt { .. } => Code::DataLoss,
        Error::Io { .. } | Error::StoreIo { .. } | Error::Meta { .. } => Code::Internal,
        Error::NotServing { .. } => Code::Unavailable,
    }
}

/// Maps a store error to the gRPC status a client acts on.
pub fn store_status(e: Error) -> Status {
    let status = Status::new(store_code(&e), chain(&e));
    if matches!(e, Error::StaleEpoch { .. } | Error::EpochTaken { .. }) {
        stale_epoch(status)
    } else {
        status
    }
}

fn head_code(e: &HeadError) -> Code {
    match e {
        HeadError::Placement { .. } => Code::FailedPrecondition,
        HeadError::Range { .. } => Code::OutOfRange,
        HeadError::NoReplica { .. } | HeadError::Unproven { .. } => Code::Unavailable,
        HeadError::DataLoss { .. } => Code::DataLoss,
        HeadError::Fenced { .. } | HeadError::Refused { .. } => Code::FailedPrecondition,
        HeadError::Snapshot { .. } => Code::Aborted,
        HeadError::MissingPeer { .. } => Code::InvalidArgument,
        HeadError::Rebuild { .. } => Code::Aborted,
    }
}

/// Maps a head error to a status code.
pub fn head_status(e: HeadError) -> Status {
    let status = Status::new(head_code(&e), chain(&e));
    if matches!(e, HeadError::Fenced { .. }) { stale_epoch(status) } else { status }
}

fn heads_code(e: &HeadsError) -> Code {
    match e {
        HeadsError::NotOpen { .. } | HeadsError::NotOpenHere { .. } => Code::NotFound,
        HeadsError::NotExposed { .. } => Code::NotFound,
        HeadsError::AlreadyPrimary { .. }
        | HeadsError::AlreadyRemote { .. }
        | HeadsError::RemoteNotWritable { .. }
        | HeadsError::RemoteNotAttached { .. }
        | HeadsError::NoFuseDir { .. }
        | HeadsError::Fuse(_)
        | HeadsError::Mounted { .. }
        | HeadsError::Attached { .. }
        | HeadsError::StaleOpen { .. } => Code::FailedPrecondition,
        HeadsError::MountDir { .. } | HeadsError::Task { .. } => Code::Internal,
        HeadsError::EmptyAgentName | HeadsError::Peer { .. } => Code::InvalidArgument,
        HeadsError::Head(h) => head_code(h),
    }
}

/// Maps an error of the heads open on this agent to a status code.
pub fn heads_status(e: HeadsError) -> Status {
    match e {
        HeadsError::Head(h) => head_status(h),
        other => Status::new(heads_code(&other), chain(&other)),
    }
}

fn copy_code(e: &CopyError) -> Code {
    match e {
        CopyError::Head(h) => head_code(h),
        CopyError::Snapshot { .. } => Code::FailedPrecondition,
        CopyError::Connect { .. } => Code::Unavailable,
        CopyError::Receiver { status, .. } => status.code(),
        CopyError::Session { fault, .. } => match fault {
            Fault::Start(_)
            | Fault::Unexpected(_)
            | Fault::DigestLength(_)
            | Fault::Malformed(_) => Code::Internal,
            Fault::Ended => Code::Aborted,
            Fault::DigestMismatch { .. } => Code::DataLoss,
        },
    }
}

/// The refusal for a copy that failed, with the code its cause calls for.
pub fn copy_status(e: CopyError) -> Status {
    match e {
        CopyError::Head(h) => head_status(h),
        other => Status::new(copy_code(&other), chain(&other)),
    }
}

fn link_code(e: &LinkError) -> Code {
    match e {
        LinkError::BadId | LinkError::Invalid { .. } | LinkError::Setting(_) => {
            Code::InvalidArgument
        }
        LinkError::NotFound { .. } | LinkError::NoSnapshot { .. } => Code::NotFound,
        LinkError::Damaged { .. } | LinkError::TargetDigest { .. } => Code::DataLoss,
        LinkError::Busy { .. }
        | LinkError::Running { .. }
        | LinkError::HeadNotOpen { .. }
        | LinkError::NoCommonBase { .. }
        | LinkError::Diverged { .. }
        | LinkError::NothingNewer { .. }
        | LinkError::Needed(_) => Code::FailedPrecondition,
        LinkError::FinalCopy { source, .. } => link_code(source),
        LinkError::Copy(c) => copy_code(c),
        LinkError::Head(h) => head_code(h),
        LinkError::Heads(h) => heads_code(h),
        LinkError::Store(s) => store_code(s),
    }
}

/// Maps a link error to a status code.
pub fn link_status(e: LinkError) -> Status {
    match e {
        LinkError::Copy(c) => copy_status(c),
        LinkError::Head(h) => head_status(h),
        LinkError::Heads(h) => heads_status(h),
        LinkError::Store(s) => store_status(s),
        other => Status::new(link_code(&other), chain(&other)),
    }
}
