//! Compiles the protobuf APIs (the agent's and CSI's) with protox (no
//! `protoc`, no network; protox brings the google.protobuf well-known types)
//! and emits the file descriptor set for gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/cairn/agent/v1/agent.proto", "proto/csi/v1/csi.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("cairn_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().bytes(".cairn.agent.v1").compile_fds(fds)?;
    Ok(())
}
