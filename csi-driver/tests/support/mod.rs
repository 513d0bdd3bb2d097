//! What the CSI driver's process-level tests share: a `cairn-csi` process
//! in either role on its own unix socket, and clients that dial it.

// Each test file uses the part it needs.
#![allow(dead_code)]

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use cairn_api::csi::v1::{identity_client::IdentityClient, node_client::NodeClient};
use tonic::transport::Channel;

/// A running `cairn-csi` process on a unix socket.
pub struct CsiProcess {
    child: Child,
    socket: PathBuf,
}

impl CsiProcess {
    pub fn start(socket: &Path, role_args: &[&OsStr]) -> CsiProcess {
        // The controller builds its Kubernetes client at start (it talks to
        // the API server only when a Controller RPC runs): a kubeconfig
        // naming an API server that is not there is enough for Identity.
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let kubeconfig = socket.with_file_name("kubeconfig");
        std::fs::write(
            &kubeconfig,
            "apiVersion: v1\nkind: Config\nclusters: [{name: none, cluster: {server: 'https://127.0.0.1:9'}}]\n\
             users: [{name: none, user: {}}]\ncontexts: [{name: none, context: {cluster: none, user: none}}]\ncurrent-context: none\n",
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-csi"))
            .env("KUBECONFIG", &kubeconfig)
            .args(role_args)
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--log-format", "text"])
            .env("CAIRN_LOG", std::env::var("CAIRN_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting cairn-csi");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("listening "), "cairn-csi printed {line:?}");
        CsiProcess { child, socket: socket.to_path_buf() }
    }

    /// A node plugin named `node` whose local agent is at `agent`.
    pub fn node(base: &Path, node: &str, agent: &str) -> CsiProcess {
        let state = base.join(format!("{node}-state"));
        let args: Vec<&OsStr> = vec![
            "node".as_ref(),
            "--node-id".as_ref(),
            node.as_ref(),
            "--storage-cluster".as_ref(),
            "site-a".as_ref(),
            "--agent-endpoint".as_ref(),
            agent.as_ref(),
            "--state-dir".as_ref(),
            state.as_os_str(),
        ];
        CsiProcess::start(&base.join(format!("{node}/csi.sock")), &args)
    }

    pub async fn channel(&self) -> Channel {
        let socket = self.socket.clone();
        tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let socket = socket.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .expect("dialling the CSI socket")
    }

    pub async fn node_client(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }
}

impl Drop for CsiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
