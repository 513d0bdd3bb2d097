//! Tests that cannot run on this host say so: on stderr, and as a line in
//! the file `CAIRN_SKIP_LOG` names. e2e/test.sh sets it and lists every
//! skipped test with its reason in its summary, so a test that returned
//! early is never counted as one that passed.

use std::io::Write;

/// Records that the running test is skipped, and why (what it needs that
/// this host lacks). The caller returns right after.
pub fn skip(why: &str) {
    let test = test_name();
    eprintln!("skipped: {test}: {why}");
    let Some(path) = std::env::var_os("CAIRN_SKIP_LOG") else { return };
    let line = format!("{test}\t{why}\n");
    // One write of one short line to a file opened for appending: lines of
    // tests running in parallel do not interleave.
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = appended {
        eprintln!("could not record the skip in {}: {e}", path.to_string_lossy());
    }
}

/// `<test binary>::<test>`: libtest names each test's thread after it.
fn test_name() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| match stem.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
            _ => stem,
        })
        .unwrap_or_else(|| "?".into());
    let thread = std::thread::current();
    format!("{binary}::{}", thread.name().unwrap_or("?"))
}
