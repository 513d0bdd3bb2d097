//! The agent's tonic edges: each parses a request, calls the domain code
//! and maps its errors to gRPC codes with an exhaustive match.

pub mod snapshot_copy;
