//! What the container image (the top-level Dockerfile) relies on, tested without a container
//! engine: the Dockerfile's stages and settings agree with tollgate and with the Kubernetes
//! manifests; the binary needs no shared library beyond those distroless `cc` ships; and
//! `tollgate serve` with the image's configuration starts and answers as the image's
//! unprivileged user, on a read-only root file system, with only its data volume writable.
//!
//! The binary tested is the one cargo built for the tests (debug). Its shared libraries are the
//! release binary's: the profile changes optimisation and debug information, not what is linked
//! (no dependency links a system library only in one profile; mimalloc and ring are compiled in).
//! When `target/release/tollgate` exists, it is checked too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use harness::check::{check_request, denied};
use harness::net::{free_port, http_client};

/// The image's user: distroless's "nonroot".
const IMAGE_UID: u32 = 65532;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn dockerfile() -> String {
    std::fs::read_to_string(repo().join("Dockerfile")).unwrap()
}

/// The Dockerfile's instructions, continuation lines joined: (INSTRUCTION, arguments).
fn instructions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile().lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(rest) = line.strip_suffix('\\') {
            current.push_str(rest);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let (op, args) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((op.to_uppercase(), args.trim().to_string()));
        current.clear();
    }
    out
}

fn arg_default(name: &str) -> String {
    instructions()
        .iter()
        .find_map(|(op, args)| {
            (op == "ARG")
                .then(|| args.strip_prefix(&format!("{name}=")))
                .flatten()
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no ARG {name}"))
}

/// The libraries of distroless `cc` for Debian 12 (gcr.io/distroless/cc-debian12): its packages
/// are those of "base" (libc6, libssl3) plus libgcc-s1, libstdc++6, libgomp1 and gcc-12-base, as
/// GoogleContainerTools/distroless lists them in cc/config.bzl and base/config.bzl. These are the
/// shared objects those packages install (glibc's parts: libc, libm, libpthread, libdl, librt,
/// libresolv, libutil, the dynamic loader; libgcc_s; libstdc++; libgomp; OpenSSL 3).
const DISTROLESS_CC_LIBRARIES: &[&str] = &[
    "linux-vdso.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libc.so.6",
    "libm.so.6",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "libresolv.so.2",
    "libutil.so.1",
    "libanl.so.1",
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "libgomp.so.1",
    "libssl.so.3",
    "libcrypto.so.3",
];

fn binaries() -> Vec<PathBuf> {
    let mut found = vec![PathBuf::from(env!("CARGO_BIN_EXE_tollgate"))];
    let release = repo().join("target/release/tollgate");
    if release.is_file() {
        found.push(release);
    }
    found
}

#[test]
fn the_binary_needs_only_libraries_distroless_cc_ships() {
    for binary in binaries() {
        let out = Command::new("ldd").arg(&binary).output().expect("ldd runs");
        assert!(out.status.success(), "{out:?}");
        let listing = String::from_utf8(out.stdout).unwrap();
        let mut names = Vec::new();
        for line in listing.lines().map(str::trim).filter(|l| !l.is_empty()) {
            assert!(!line.contains("not found"), "{}: {line}", binary.display());
            let first = line.split_whitespace().next().unwrap();
            let name = Path::new(first).file_name().unwrap().to_str().unwrap();
            names.push(name.to_string());
        }
        assert!(names.iter().any(|n| n == "libc.so.6"), "{listing}");
        for name in &names {
            assert!(
                DISTROLESS_CC_LIBRARIES.contains(&name.as_str()),
                "{} needs {name}, which distroless cc does not ship:\n{listing}",
                binary.display()
            );
        }
    }
}

#[test]
fn the_dockerfile_builds_with_the_projects_toolchain_and_runs_unprivileged() {
    let toolchain = std::fs::read_to_string(repo().join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let rust = arg_default("RUST_IMAGE");
    assert_eq!(rust, format!("docker.io/library/rust:{channel}-bookworm"));
    // Built on Debian 12, run on Debian 12: the glibc linked against is the one shipped.
    let runtime = arg_default("RUNTIME_IMAGE");
    assert!(
        runtime.starts_with("gcr.io/distroless/cc-debian12:nonroot"),
        "{runtime}"
    );
    let steps = instructions();
    let froms: Vec<&String> = steps
        .iter()
        .filter(|(op, _)| op == "FROM")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(froms, ["${RUST_IMAGE} AS build", "${RUNTIME_IMAGE}"]);
    let last_from = steps.iter().rposition(|(op, _)| op == "FROM").unwrap();
    let runtime_stage = &steps[last_from..];
    let get = |op: &str| -> Vec<&str> {
        runtime_stage
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    // No shell in the image, so nothing runs in its stage.
    assert!(get("RUN").is_empty());
    assert_eq!(get("USER"), [format!("{IMAGE_UID}:{IMAGE_UID}").as_str()]);
    assert_eq!(get("ENTRYPOINT"), [r#"["/usr/local/bin/tollgate"]"#]);
    assert_eq!(get("CMD"), [r#"["serve"]"#]);
    assert_eq!(get("VOLUME"), [r#"["/var/lib/tollgate"]"#]);
    assert_eq!(get("ENV"), ["TOLLGATE_CONFIG=/etc/tollgate/tollgate.yaml"]);
    // The image's configuration: valid, on the exposed ports, its database on the volume.
    let config =
        tollgate::config::Config::load(Some(&repo().join("docker/tollgate.yaml")), Vec::new())
            .unwrap();
    assert_eq!(
        get("EXPOSE"),
        [format!("{} {}", config.grpc_addr.port(), config.http_addr.port()).as_str()]
    );
    assert!(config.grpc_addr.ip().is_unspecified() && config.http_addr.ip().is_unspecified());
    assert_eq!(
        config.database.url.expose(),
        "sqlite:///var/lib/tollgate/tollgate.db"
    );
    assert!(dockerfile().contains("COPY docker/tollgate.yaml /out/etc/tollgate/tollgate.yaml"));
    // The manifests run it as the image's user.
    for file in [
        "examples/kubernetes/base/deployment.yaml",
        "examples/kubernetes/overlays/sidecar/api.yaml",
        "examples/kubernetes/migrate/job.yaml",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        assert!(text.contains(&format!("runAsUser: {IMAGE_UID}")), "{file}");
    }
}

/// Every file the build stage copies is in the build context: present, and not left out by
/// .dockerignore (everything is, but what it lets back in with `!`).
#[test]
fn the_build_context_holds_what_the_dockerfile_copies() {
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(patterns[0], "*", "the context starts empty");
    let included = |path: &str| {
        let mut inside = false;
        for p in &patterns[1..] {
            let (keep, p) = match p.strip_prefix('!') {
                Some(p) => (true, p),
                None => (false, *p),
            };
            let p = p.trim_end_matches('/');
            if path == p || path.starts_with(&format!("{p}/")) {
                inside = keep;
            }
        }
        inside
    };
    for (op, args) in instructions() {
        if op != "COPY" || args.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = args.split_whitespace().collect();
        for source in &parts[..parts.len() - 1] {
            assert!(repo().join(source).exists(), "COPY {source}: no such file");
            assert!(
                included(source),
                "COPY {source}: .dockerignore leaves it out"
            );
        }
    }
    // What cargo needs to read the workspace's manifests.
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "src",
        "proto",
        "migrations",
        "benches",
        "tests/harness",
    ] {
        assert!(included(needed), "{needed} is not in the build context");
        assert!(
            dockerfile().contains(&format!("COPY {needed}"))
                || dockerfile().contains(&format!(" {needed} "))
                || dockerfile().contains(&format!("COPY {needed}/")),
            "the Dockerfile does not copy {needed}"
        );
    }
}

/// `tollgate serve` as the image runs it: uid and gid 65532 with no capabilities and no way to
/// gain any, every file system read-only but a fresh tmpfs as the data volume (a private mount
/// namespace, so nothing outside this test sees it), the image's configuration file. It becomes
/// ready (its SQLite database created and migrated on the volume) and answers a Check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_and_answers_as_the_image_user_with_only_its_data_volume_writable() {
    assert!(
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false),
        "this test needs root, to make a mount namespace and drop to the image's user"
    );
    let data = tempfile::tempdir().unwrap();
    // The binary and the config file as the image holds them: readable by its user wherever
    // this checkout is (a clean clone may sit in a directory only root can enter).
    let image = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let set = |path: &std::path::Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        set(image.path(), 0o755);
        std::fs::copy(
            env!("CARGO_BIN_EXE_tollgate"),
            image.path().join("tollgate"),
        )
        .unwrap();
        set(&image.path().join("tollgate"), 0o755);
        std::fs::copy(
            repo().join("docker/tollgate.yaml"),
            image.path().join("tollgate.yaml"),
        )
        .unwrap();
        set(&image.path().join("tollgate.yaml"), 0o644);
    }
    let (grpc, http) = (free_port(), free_port());
    let script = r#"
        set -e
        # Every mount read-only, deepest first (the root last)...
        findmnt -rn -o TARGET | sort -r | while read -r m; do
          mount -o remount,bind,ro "$m" 2>/dev/null || true
        done
        for d in / /tmp /var/tmp /dev/shm "$(dirname "$BIN")"; do
          if touch "$d/.tollgate-ro-probe" 2>/dev/null; then
            rm -f "$d/.tollgate-ro-probe"; echo "$d is writable" >&2; exit 1
          fi
        done
        # ...but the data volume, an emptyDir-like tmpfs owned by the image's user.
        mount -t tmpfs -o mode=0700,uid=65532,gid=65532,size=64m tollgate-data "$DATA"
        cd "$DATA"
        exec setpriv --reuid=65532 --regid=65532 --clear-groups --no-new-privs \
          --inh-caps=-all --bounding-set=-all -- "$BIN" serve
    "#;
    let log = data.path().with_extension("log");
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DATA", data.path())
        .env("BIN", image.path().join("tollgate"))
        .env("TOLLGATE_CONFIG", image.path().join("tollgate.yaml"))
        // The image's file, on ports free here and with the volume where this test mounted it.
        .env("TOLLGATE_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("TOLLGATE_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env(
            "TOLLGATE_DATABASE_URL",
            format!("sqlite://{}/tollgate.db", data.path().display()),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("unshare runs");
    let started = Instant::now();
    let client = http_client();
    let ready = loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "tollgate exited with {status}: {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        let r = client
            .get(format!("http://127.0.0.1:{http}/readyz"))
            .send()
            .await;
        if let Ok(r) = r
            && r.status() == 200
        {
            break r.text().await.unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not ready: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The process is tollgate, as the image's user, with no capabilities.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Name:"), ["tollgate"]);
    assert_eq!(field("Uid:"), ["65532"; 4]);
    assert_eq!(field("Gid:"), ["65532"; 4]);
    assert_eq!(field("CapEff:"), ["0000000000000000"]);
    assert_eq!(field("NoNewPrivs:"), ["1"]);
    // Its database is on the volume (seen through the process's own mounts).
    let db = format!(
        "/proc/{}/root{}/tollgate.db",
        child.id(),
        data.path().display()
    );
    assert!(
        Path::new(&db).is_file(),
        "no database on the volume; readyz: {ready}"
    );
    // And it answers Envoy's Check.
    let mut authz = AuthorizationClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .unwrap();
    let answer = authz.check(check_request(&[])).await.unwrap().into_inner();
    assert_eq!(denied(&answer).status, 401);
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let exited = child.wait().unwrap();
    assert!(
        exited.success(),
        "{exited}: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    let _ = std::fs::remove_file(&log);
}
