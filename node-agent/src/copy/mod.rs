//! Remote copy of snapshots between sites: the bandwidth policy and
//! limiter, the sending and the receiving end of a copy, the links an agent
//! sends (fan-out, cascade, resync) and mutual TLS between sites.

pub mod bandwidth;
pub mod batch;
pub mod convert;
pub mod links;
pub mod receiver;
pub mod records;
pub mod sender;
pub mod session;
pub mod tls;
