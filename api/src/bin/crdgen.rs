//! Writes the CRD manifests of `cairn_api::crd` to `deploy/crds/` (or the
//! directory given), one `<plural>.cairn.dev.yaml` per resource, and removes
//! generated manifests of resources that no longer exist.

use std::{fs, path::PathBuf, process::ExitCode};

use cairn_api::crd::{GENERATED_HEADER, manifests};

fn main() -> ExitCode {
    let dir = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds"),
    };
    match run(&dir) {
        Ok(written) => {
            for name in written {
                println!("wrote {}", dir.join(name).display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crdgen: {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

fn run(dir: &PathBuf) -> std::io::Result<Vec<String>> {
    fs::create_dir_all(dir)?;
    let manifests = manifests();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let stale = name.ends_with(".cairn.dev.yaml")
            && !manifests.iter().any(|(n, _)| *n == name)
            && fs::read_to_string(&path)?.starts_with(GENERATED_HEADER);
        if stale {
            fs::remove_file(&path)?;
            println!("removed {}", path.display());
        }
    }
    let mut written = vec![];
    for (name, yaml) in manifests {
        fs::write(dir.join(&name), yaml)?;
        written.push(name);
    }
    Ok(written)
}
