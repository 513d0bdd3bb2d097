//! The `cairn` command-line client against real agents: open a head, take
//! a snapshot, register a link at a second agent, copy the snapshot there,
//! and read the digests back; bad input gets a clear message and exit 2.

use std::process::Command;

use cairn_e2e::{AgentProcess, cli_binary};

fn cairn(agent: &AgentProcess, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(cli_binary().unwrap())
        .arg("--agent")
        .arg(agent.endpoint())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_opens_snapshots_and_copies_between_agents() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a1 = AgentProcess::start_named(dirs[0].path(), "a1").unwrap();
    let b1 = AgentProcess::start_named(dirs[1].path(), "b1").unwrap();
    let secret = dirs[2].path().join("secret");
    std::fs::write(&secret, b"a-long-enough-pairing-secret").unwrap();
    let secret = secret.to_str().unwrap();

    let list = format!("a1={}", a1.endpoint());
    let (ok, out, err) = cairn(
        &a1,
        &["head", "open", "vol", "--size", "64MiB", "--replicas", "1", "--agent-list", &list],
    );
    assert!(ok, "{err}");
    assert!(out.contains("a1") && out.contains("in sync"), "{out}");
    let (ok, out, err) = cairn(&a1, &["head", "snapshot", "vol", "s1", "--generation", "1"]);
    assert!(ok && out.contains("snapshot s1 sealed"), "{out}{err}");
    let (_, digest_a, _) = cairn(&a1, &["head", "digest", "vol", "--snapshot", "s1"]);

    let list_b = format!("b1={}", b1.endpoint());
    let (ok, _, err) = cairn(
        &b1,
        &[
            "head",
            "open",
            "copy",
            "--size",
            "64MiB",
            "--replicas",
            "1",
            "--agent-list",
            &list_b,
            "--role",
            "remote",
        ],
    );
    assert!(ok, "{err}");
    let (ok, out, err) =
        cairn(&b1, &["link", "register", "l1", "--secret-file", secret, "--target-volume", "copy"]);
    assert!(ok && out.contains("registered"), "{out}{err}");
    let (ok, out, err) = cairn(
        &a1,
        &[
            "copy",
            "vol",
            "s1",
            "--link",
            "l1",
            "--secret-file",
            secret,
            "--to",
            &b1.endpoint(),
            "--rate",
            "100MiB",
        ],
    );
    assert!(ok && out.contains("s1 copied"), "{out}{err}");
    let (_, digest_b, _) = cairn(&b1, &["head", "digest", "copy", "--snapshot", "s1"]);
    assert_eq!(digest_a.trim(), digest_b.trim(), "same digest at both agents");
    assert!(out.contains(digest_a.trim()), "{out}");

    // A link with a windowed policy, synced; its snapshot kept while needed.
    let put = |window: &str| {
        cairn(
            &a1,
            &[
                "link",
                "put",
                "l1",
                "--volume",
                "vol",
                "--to",
                &b1.endpoint(),
                "--secret-file",
                secret,
                "--window",
                window,
                "--zone",
                "Europe/Berlin",
            ],
        )
    };
    let (ok, _, err) = put("mon,funday 08:00-18:00 10MiB");
    assert!(!ok && err.contains("funday"), "{err}");
    let (ok, out, err) = put("mon,tue,wed,thu,fri,sat,sun 00:00- 50MiB");
    assert!(ok && out.contains("l1") && out.contains("last copied: none"), "{out}{err}");
    let (ok, _, err) = cairn(&a1, &["head", "snapshot", "vol", "s2", "--generation", "2"]);
    assert!(ok, "{err}");
    let (ok, out, err) = cairn(&a1, &["link", "sync", "l1"]);
    assert!(ok && out.contains("s2 copied"), "{out}{err}");
    let (ok, out, _) = cairn(&a1, &["link", "list"]);
    assert!(ok && out.contains("last copied: s2"), "{out}");
    let (ok, _, err) = cairn(&a1, &["head", "delete-snapshot", "vol", "s2"]);
    assert!(!ok && err.contains("link l1"), "{err}");
    let (ok, out, err) = cairn(&a1, &["head", "delete-snapshot", "vol", "s1"]);
    assert!(ok && out.contains("deleted"), "{out}{err}");
    let (ok, out, _) = cairn(&b1, &["head", "snapshots", "copy"]);
    assert!(ok && out.contains("s1") && out.contains("s2"), "{out}");

    let (ok, _, err) = cairn(&a1, &["head", "open", "vol2", "--size", "12XB"]);
    assert!(!ok && err.contains("unknown unit"), "{err}");
    let (ok, _, err) = cairn(&a1, &["head", "status", "nope"]);
    assert!(!ok && err.contains("no head of volume nope"), "{err}");
}
