//! Remote copy of snapshots between sites (issue 4). Built so far: the
//! bandwidth policy and limiter, the receiving and the sending end of a copy.

pub mod bandwidth;
pub mod receiver;
pub mod sender;
pub mod tls;
