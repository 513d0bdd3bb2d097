//! The README's commands, checked against the tree so they cannot drift:
//! every `cargo run` names a package and a binary that exist (and one that
//! `cargo run -p` alone can pick), every `cairn`, `cairn-agent`,
//! `cairn-demo`, `cairn-bench` and `cairn-faults` command line names subcommands and flags
//! that binary accepts (asked with `--help`, as a reader would), and every
//! script it names exists and is executable. The commands that need a
//! cluster, Docker or kind (`kubectl`, `helm`, `docker`) are not run here.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The lines of the README's ```sh blocks, comments and `sudo` removed,
/// `\` continuations joined.
fn sh_lines(markdown: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in markdown.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            in_sh = !in_sh && trimmed == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let code = match trimmed.find(" #") {
            Some(i) => trimmed[..i].trim_end(),
            None if trimmed.starts_with('#') => "",
            None => trimmed,
        };
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(code);
        let full = pending.trim().trim_start_matches("sudo ").to_string();
        pending.clear();
        if !full.is_empty() {
            lines.push(full);
        }
    }
    lines
}

/// Shell words, with "double-quoted" words kept whole.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// Package -> (its binaries, its default-run), from `cargo metadata`.
fn packages() -> BTreeMap<String, (Vec<String>, Option<String>)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1", "--offline"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let bins = p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
                .map(|t| t["name"].as_str().unwrap().to_string())
                .collect();
            let default = p["default_run"].as_str().map(str::to_string);
            (p["name"].as_str().unwrap().to_string(), (bins, default))
        })
        .collect()
}

/// The built binary named `name`.
fn binary(name: &str) -> PathBuf {
    match name {
        "cairn-agent" => cairn_e2e::agent_binary().unwrap(),
        "cairn" => cairn_e2e::cli_binary().unwrap(),
        "cairn-demo" => env!("CARGO_BIN_EXE_cairn-demo").into(),
        "cairn-bench" => env!("CARGO_BIN_EXE_cairn-bench").into(),
        "cairn-faults" => env!("CARGO_BIN_EXE_cairn-faults").into(),
        other => panic!("the README runs {other}, which this test does not know: add it"),
    }
}

fn help(bin: &Path, path: &[String]) -> Option<String> {
    let out = Command::new(bin).args(path).arg("--help").output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Checks `args` against `bin`'s help: the leading words that change the
/// help are subcommands; every `--flag` must be in the help of the deepest
/// one. Returns what is wrong.
fn check_args(name: &str, args: &[String]) -> Vec<String> {
    let bin = binary(name);
    let mut path: Vec<String> = Vec::new();
    let mut text = help(&bin, &path).unwrap_or_else(|| panic!("{name} --help failed"));
    for word in args.iter().take_while(|w| !w.starts_with('-')) {
        let mut deeper = path.clone();
        deeper.push(word.clone());
        match help(&bin, &deeper) {
            Some(t) if t != text => {
                path = deeper;
                text = t;
            }
            // A positional argument: the help does not change.
            Some(_) => {}
            None => return vec![format!("`{name} {}`: {word:?} is not accepted", path.join(" "))],
        }
    }
    args.iter()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|flag| flag.split('=').next().unwrap())
        .filter(|flag| !text.contains(&format!("--{flag}")))
        .map(|flag| format!("`{name} {}` has no --{flag}", path.join(" ")))
        .collect()
}

#[test]
fn every_command_in_the_readme_names_what_exists() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let packages = packages();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for line in sh_lines(&readme) {
        let w = words(&line);
        match w[0].as_str() {
            "cargo" if w.get(1).map(String::as_str) == Some("run") => {
                let flag = |f: &str| w.iter().position(|x| x == f).and_then(|i| w.get(i + 1));
                let dashes = w.iter().position(|x| x == "--").unwrap_or(w.len());
                let Some(package) = flag("-p") else {
                    wrong.push(format!("{line}: no -p PACKAGE"));
                    continue;
                };
                let Some((bins, default)) = packages.get(package) else {
                    wrong.push(format!("{line}: there is no package {package}"));
                    continue;
                };
                let bin = match flag("--bin") {
                    Some(b) if bins.contains(b) => b.clone(),
                    Some(b) => {
                        wrong.push(format!("{line}: package {package} has no binary {b}"));
                        continue;
                    }
                    None => match (bins.as_slice(), default) {
                        (_, Some(d)) => d.clone(),
                        ([only], None) => only.clone(),
                        _ => {
                            wrong.push(format!("{line}: cargo cannot tell which binary of {package} to run ({bins:?})"));
                            continue;
                        }
                    },
                };
                wrong.extend(check_args(&bin, &w[(dashes + 1).min(w.len())..]));
                checked += 1;
            }
            "cairn" => {
                wrong.extend(check_args("cairn", &w[1..]));
                checked += 1;
            }
            script if script.ends_with(".sh") => {
                let path = root().join(script.trim_start_matches("./"));
                let executable =
                    std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
                if !executable {
                    wrong.push(format!("{line}: {} is not an executable file", path.display()));
                }
                checked += 1;
            }
            _ => {}
        }
    }
    assert!(checked >= 20, "only {checked} README commands were found: is the parser still right?");
    assert!(wrong.is_empty(), "README commands that do not work as written:\n{}", wrong.join("\n"));
}
