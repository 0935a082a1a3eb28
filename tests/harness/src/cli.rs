//! The `tollgate` binary as tests run it: where cargo built it, a [`Command`] for it that ignores
//! the caller's `TOLLGATE_CONFIG`, and [`cli_create_key`].

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `tollgate` binary built for these tests: `CARGO_BIN_EXE_tollgate`, which cargo sets when
/// it runs an integration test, else the one beside the test binary (`target/debug/deps/..`).
fn tollgate_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_tollgate") {
        return PathBuf::from(path);
    }
    let test_binary = std::env::current_exe().expect("the test binary's path");
    let beside = test_binary
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("tollgate"));
    match beside {
        Some(path) if path.is_file() => path,
        _ => panic!(
            "the tollgate binary is not next to {}: run the tests with cargo test, which \
             builds it, or set CARGO_BIN_EXE_tollgate",
            test_binary.display()
        ),
    }
}

/// `tollgate`, run in `dir`, without the caller's `TOLLGATE_CONFIG`: only what the test sets.
pub fn tollgate_command(dir: &Path) -> Command {
    let mut cmd = Command::new(tollgate_bin());
    cmd.current_dir(dir).env_remove("TOLLGATE_CONFIG");
    cmd
}

/// Creates a key with `tollgate keys create --json ARGS` on `db_url`; returns (key, id).
pub fn cli_create_key(dir: &Path, db_url: &str, args: &[&str]) -> (String, i64) {
    let out = tollgate_command(dir)
        .args(["keys", "create", "--json"])
        .args(args)
        .env("TOLLGATE_DATABASE_URL", db_url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["key"].as_str().unwrap().to_string(),
        v["id"].as_i64().unwrap(),
    )
}
