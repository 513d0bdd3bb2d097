//! Remote copy of snapshots between sites (issue 4). Built so far: the
//! bandwidth policy and limiter.

pub mod bandwidth;
