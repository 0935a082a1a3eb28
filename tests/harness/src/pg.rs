//! [`PrivatePostgres`]: a PostgreSQL server of the test's own (initdb and pg_ctl in a temporary
//! directory, on a free port), for tests that stop and restart it or configure it as the shared
//! server is not: with TLS only ([`PrivatePostgres::start_tls`]: a server certificate from a test
//! CA, client certificates checked, and a `pg_hba.conf` that rejects every connection without
//! TLS).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::net::free_port;
use crate::tls::TestCa;

/// A PostgreSQL server of the test's own, in a temporary directory, on a free port.
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL version with pg_ctl")
}

/// Runs a PostgreSQL tool as the `postgres` user (the server refuses to run as root).
fn as_postgres(bin: &Path, tool: &str, args: &[&str]) {
    let tool = bin.join(tool);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&tool);
        c
    } else {
        Command::new(&tool)
    };
    let out = cmd.args(args).output().expect("postgres tool runs");
    assert!(out.status.success(), "{tool:?} {args:?}: {out:?}");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The user a TLS server admits only with a client certificate whose common name it is.
pub const CERT_USER: &str = "tollgate_cert";

impl PrivatePostgres {
    /// Started, plaintext, trusting every local connection.
    pub fn start() -> PrivatePostgres {
        let pg = Self::init();
        pg.up();
        pg
    }

    /// Started with TLS only: `ca` signs its certificate (for 127.0.0.1 and localhost) and the
    /// client certificates it checks; `pg_hba.conf` rejects every connection without TLS, and
    /// admits [`CERT_USER`] only with a client certificate (`cert`), everyone else by trust.
    pub fn start_tls(ca: &TestCa) -> PrivatePostgres {
        let pg = Self::init();
        let server = ca.server(1);
        for (name, contents) in [
            ("server.crt", server.cert_pem.as_str()),
            ("server.key", server.key_pem.as_str()),
            ("root.crt", ca.pem.as_str()),
        ] {
            let path = pg.data.join(name);
            std::fs::write(&path, contents).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            if is_root() {
                let ok = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&path)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown {path:?}");
            }
        }
        let conf = pg.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(
            "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             ssl_ca_file = 'root.crt'\n",
        );
        std::fs::write(&conf, text).unwrap();
        std::fs::write(
            pg.data.join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 hostnossl all all 0.0.0.0/0 reject\n\
                 hostssl all {CERT_USER} 127.0.0.1/32 cert\n\
                 hostssl all all 127.0.0.1/32 trust\n"
            ),
        )
        .unwrap();
        pg.up();
        // The certificate user, made over the local socket (TCP needs TLS).
        as_postgres(
            &pg.bin,
            "psql",
            &[
                "-h",
                pg.data.to_str().unwrap(),
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                &format!("CREATE ROLE {CERT_USER} LOGIN SUPERUSER"),
            ],
        );
        pg
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    fn init() -> PrivatePostgres {
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
        }
        let bin = postgres_bin();
        let data = dir.path().join("data");
        as_postgres(
            &bin,
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        PrivatePostgres {
            bin,
            data,
            port: free_port(),
            _dir: dir,
        }
    }

    /// Freezes the whole server: the postmaster and every process it started.
    pub fn freeze(&self) -> Frozen {
        let pid_file = std::fs::read_to_string(self.data.join("postmaster.pid")).unwrap();
        let postmaster = pid_file.lines().next().unwrap().trim().to_string();
        let children = Command::new("pgrep")
            .args(["-P", &postmaster])
            .output()
            .unwrap();
        let mut pids = vec![postmaster];
        pids.extend(
            String::from_utf8_lossy(&children.stdout)
                .split_whitespace()
                .map(str::to_string),
        );
        Frozen::pids(pids)
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn up(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.data.display()
        );
        as_postgres(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "-l",
                &format!("{}/log", self.data.display()),
                "start",
            ],
        );
    }

    pub fn down(&self) {
        as_postgres(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

/// Processes of a private server stopped with SIGSTOP, as a frozen host or a partition looks to
/// its clients: sockets stay open and nothing answers. They go on when this is dropped.
pub struct Frozen(Vec<String>);

impl Frozen {
    /// These processes (of a private server).
    pub fn pids(pids: Vec<String>) -> Frozen {
        signal("-STOP", &pids);
        Frozen(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal("-CONT", &self.0);
    }
}

fn signal(sig: &str, pids: &[String]) {
    let status = Command::new("kill").arg(sig).args(pids).status().unwrap();
    assert!(status.success(), "kill {sig} {pids:?}");
}
