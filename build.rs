//! Sets `KEYGATE_COMMIT` for `src/build_info.rs`: the commit `keygate
//! --version` and `keygate_build_info` report.
//!
//! `KEYGATE_BUILD_COMMIT`, when set, wins (a package built from a tarball
//! or in a sandbox without git says what it was built from); otherwise
//! `git rev-parse --short=12 HEAD`; otherwise `unknown`. Cargo reruns this
//! when the variable changes or HEAD moves (a checkout changes `HEAD`, a
//! commit changes the branch's ref file or `packed-refs`), so the commit is
//! never one build behind.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=KEYGATE_BUILD_COMMIT");
    let commit = match std::env::var("KEYGATE_BUILD_COMMIT") {
        Ok(given) if !given.trim().is_empty() => given.trim().to_owned(),
        _ => {
            watch_head();
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo:rustc-env=KEYGATE_COMMIT={commit}");
}

/// `git ARGS` in the package's directory: its trimmed stdout, or `None`
/// when git is missing, this is not a repository, or the answer is empty.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_owned())
}

/// Reruns the build script when HEAD moves. Only existing files are named:
/// cargo reruns on every build for a path that does not exist. `--git-path`
/// finds them in a worktree too (its HEAD is its own, refs are shared).
fn watch_head() {
    let mut files = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        files.push(branch);
    }
    for file in files {
        if let Some(path) = git(&["rev-parse", "--git-path", &file]).map(PathBuf::from)
            && path.exists()
        {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
