//! The real `uffd-server` binary, run as a child process with its log captured to a file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uffd_server::control::{query_stats, StatsResponse};

/// Path of a binary of this workspace in the current executable's `target/<profile>/` (tests and
/// benches run from its `deps/`). `cargo build --workspace --bins` (part of the README's
/// commands) builds them.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build --workspace --bins` (the README's test command does)",
        path.display()
    );
    path
}

/// Runs workspace binary `name` with `args`: its stdout, or an error carrying its stderr.
pub fn run_binary(name: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(workspace_binary(name)).args(args).output()?;
    anyhow::ensure!(out.status.success(), "{name} {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

/// `uffd-server import --store STORE --name NAME MEMFILE`: what it printed.
pub fn import_to_store(store: &Path, name: &str, memfile: &Path) -> anyhow::Result<String> {
    let utf8 = |p: &Path| p.to_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", p.display()));
    run_binary("uffd-server", &["import", "--store", &utf8(store)?, "--name", name, &utf8(memfile)?])
}

/// `uffd-server loading-set --snapshot SNAPSHOT --working-set WORKING_SET --out OUT`.
pub fn write_loading_set(snapshot: &Path, working_set: &Path, out: &Path) -> std::process::Output {
    Command::new(workspace_binary("uffd-server"))
        .args(["loading-set", "--snapshot"])
        .arg(snapshot)
        .arg("--working-set")
        .arg(working_set)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run uffd-server loading-set")
}

/// `vmm-shim restore --json --snapshot SNAPSHOT` with `args`: the parsed report.
pub fn vmm_shim_restore(snapshot: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let snapshot = snapshot.to_str().ok_or_else(|| anyhow::anyhow!("snapshot path is not UTF-8"))?;
    let all = [&["restore", "--json", "--snapshot", snapshot][..], args].concat();
    Ok(serde_json::from_str(&run_binary("vmm-shim", &all)?)?)
}

pub struct ServerProcess {
    child: Child,
    pub socket_dir: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
    /// The arguments and environment, for a successor started on the same directory.
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
}

impl ServerProcess {
    /// Starts `uffd-server serve` for `snapshots` (name, memory file) with `extra` arguments and
    /// waits until it listens.
    pub fn start(snapshots: &[(&str, &Path)], extra: &[&str]) -> ServerProcess {
        Self::start_command("serve", snapshots, extra)
    }

    /// Starts `uffd-server serve --store STORE` (every snapshot of the chunk store) with `extra`
    /// arguments and waits until it listens and every snapshot is loaded.
    pub fn start_store(store: &Path, extra: &[&str]) -> ServerProcess {
        let store = store.to_str().expect("store path is UTF-8");
        Self::start_with_env("serve", &[], &[&["--store", store][..], extra].concat(), &[])
    }

    /// As [`ServerProcess::start`], for another subcommand taking the same arguments (`record`).
    pub fn start_command(command: &str, snapshots: &[(&str, &Path)], extra: &[&str]) -> ServerProcess {
        Self::start_with_env(command, snapshots, extra, &[])
    }

    /// As [`ServerProcess::start_command`], with `env` set for the server (e.g. `FAILPOINTS`,
    /// which only a server built with feature `failpoints` honours, as `./x test` builds it).
    pub fn start_with_env(
        command: &str,
        snapshots: &[(&str, &Path)],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> ServerProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket_dir = dir.path().join("sockets");
        let log = dir.path().join("server.log");
        let mut args: Vec<std::ffi::OsString> = vec![command.into(), "--socket-dir".into(), socket_dir.clone().into()];
        for (name, path) in snapshots {
            args.extend(["--snapshot".into(), format!("{name}={}", path.display()).into()]);
        }
        args.extend(extra.iter().map(Into::into));
        let mut env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        env.push(("RUST_LOG".into(), std::env::var("E2E_SERVER_LOG").unwrap_or_else(|_| "info".into())));
        env.push(("NO_COLOR".into(), "1".into()));
        std::fs::File::create(&log).expect("log file");
        let child = spawn_logged(&args, &env, &log);
        let mut server = ServerProcess { child, socket_dir, log, _dir: dir, args, env };
        server.wait_until_listening();
        if server.env.iter().any(|(k, _)| k == "FAILPOINTS") {
            assert!(
                server.log().contains("failpoints configured"),
                "this uffd-server has no failpoints: build it with `--features uffd-server/failpoints` (./x test does)"
            );
        }
        server
    }

    /// Kills the server with SIGKILL (a crash) and reaps it.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the server to exit; its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill sends a signal to our own child; no memory is involved.
        unsafe { libc::kill(self.child.id().cast_signed(), libc::SIGTERM) };
        self.child.wait().expect("wait for uffd-server")
    }

    /// Starts the same server again on the same directory (killing this one first, if it
    /// still runs), with `extra` arguments more, and waits until it listens. Its log goes on in
    /// the same file. Returns when the new process was started.
    pub fn restart(&mut self, extra: &[&str]) -> Instant {
        self.kill_hard();
        let args = [&self.args[..], &extra.iter().map(Into::into).collect::<Vec<_>>()].concat();
        let spawned = Instant::now();
        self.child = spawn_logged(&args, &self.env, &self.log);
        self.wait_until_listening();
        spawned
    }

    /// Starts a successor with `--takeover` and waits until it serves and this one has exited
    /// (its exit status).
    pub fn take_over(&mut self) -> std::process::ExitStatus {
        let args = [&self.args[..], &["--takeover".into()]].concat();
        let successor = spawn_logged(&args, &self.env, &self.log);
        let mut predecessor = std::mem::replace(&mut self.child, successor);
        let status = predecessor.wait().expect("wait for the predecessor");
        self.wait_until_listening();
        status
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        // Ready: the control socket answers (it is bound after every snapshot socket) and no
        // snapshot is still loading (a VM's restore is timed from its connection, not from the
        // server's start).
        let ready = |dir: &Path| query_stats(dir).is_ok_and(|stats| stats.snapshots_loading.is_empty());
        while !ready(&self.socket_dir) {
            assert!(self.is_running(), "uffd-server exited at start:\n{}", self.log());
            assert!(Instant::now() < deadline, "uffd-server did not listen in time:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.socket_dir.join(format!("{name}.sock"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The number after `key=` on the first line of the log that contains `line` (e.g. the
    /// `ms=` of "snapshot loaded"); None if there is none.
    pub fn logged_number(&self, line: &str, key: &str) -> Option<f64> {
        let log = self.log();
        let found = log.lines().find(|l| l.contains(line))?;
        found.split_whitespace().find_map(|field| field.strip_prefix(key)?.strip_prefix('='))?.parse().ok()
    }

    /// Waits until the log contains `needle` `count` times; panics with the log on timeout.
    pub fn wait_for_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.log().matches(needle).count() < count {
            assert!(Instant::now() < deadline, "timed out waiting for {count}× `{needle}` in the log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stats(&self) -> StatsResponse {
        query_stats(&self.socket_dir).expect("query stats")
    }

    /// CPU time (user + system) the server has used so far, all its threads, ended ones too.
    pub fn cpu_time(&self) -> std::io::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // The fields after the command name (which may hold spaces) end with `)`.
        let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) else {
            return Err(std::io::Error::other(format!("unexpected /proc/{}/stat", self.child.id())));
        };
        // SAFETY: sysconf reads a configuration value and has no other effect.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
        Ok(Duration::from_nanos((utime + stime) * 1_000_000_000 / hz))
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open file descriptors of the server now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map_or(0, Iterator::count)
    }

    /// Whether the server still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Spawns `uffd-server` with `args` and `env`, its stderr appended to `log`.
fn spawn_logged(args: &[std::ffi::OsString], env: &[(String, String)], log: &Path) -> Child {
    let stderr = std::fs::OpenOptions::new().append(true).open(log).expect("log file");
    Command::new(workspace_binary("uffd-server"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn uffd-server")
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
