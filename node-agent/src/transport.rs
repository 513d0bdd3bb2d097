//! Transport limits every gRPC end of this agent shares (servers, peer
//! channels, copy channels): HTTP/2 windows and frame size, the largest
//! message, and page sizes of paged listings.
//!
//! Invariant: both ends of a call agree on these, because both take them
//! from here; a change applies to every service and client at once.

/// Head-block indexes per page by default, and at most.
pub const HEAD_BLOCKS_PAGE: usize = 65536;
pub const MAX_HEAD_BLOCKS_PAGE: usize = 262144;
/// The largest gRPC message accepted or sent: a 4 MiB write plus framing.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// HTTP/2 receive window of a whole connection, on both ends. hyper's
/// defaults (1 MiB on a server) let only one 1 MiB write at a time be in
/// flight to an agent; a volume head keeps many.
pub const H2_CONNECTION_WINDOW: u32 = 64 << 20;
/// HTTP/2 receive window of one call: a whole message of the largest write.
pub const H2_STREAM_WINDOW: u32 = 8 << 20;
/// Largest HTTP/2 frame either end accepts: a 1 MiB write travels in one
/// frame instead of 64 of the 16 KiB default.
pub const H2_MAX_FRAME: u32 = 1 << 20;
