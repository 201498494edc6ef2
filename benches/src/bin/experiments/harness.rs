//! Driving the real binaries: snapshots with `vmm-shim snapshot`, working sets recorded with
//! `uffd-server record`, restores with `vmm-shim restore --json` under each configuration.

use anyhow::{ensure, Context, Result};
use e2e::server_process::{run_binary, vmm_shim_restore, workspace_binary, ServerProcess};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Inputs recorded into the working set before measuring, and inputs measured.
pub const RECORDED: [u64; 5] = [1, 2, 3, 4, 5];
pub const MEASURED: [u64; 3] = [101, 102, 103];

/// The restores every latency experiment compares; `warm` comes from their second invocations.
pub const CONFIGS: [&str; 5] = ["copy", "file", "uffd none", "uffd reap", "uffd union"];

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// A snapshot of the python-like workload with `extra` `vmm-shim snapshot` options.
pub fn snapshot(dir: PathBuf, extra: &[&str]) -> Result<PathBuf> {
    run_binary("vmm-shim", &[&["snapshot", "--workload", "python-like", "--out", path(&dir)][..], extra].concat())?;
    Ok(dir)
}

/// `vmm-shim restore` options: `extra`, then `--input` for each of `inputs`.
fn restore_options<'a>(extra: &'a [impl AsRef<str>], inputs: &'a [String]) -> Vec<&'a str> {
    let mut args: Vec<&str> = extra.iter().map(AsRef::as_ref).collect();
    for input in inputs {
        args.extend(["--input", input.as_str()]);
    }
    args
}

fn input_args(inputs: &[u64]) -> Vec<String> {
    inputs.iter().map(u64::to_string).collect()
}

/// `vmm-shim restore --json` of `inputs` with `extra` arguments.
pub fn restore(snapshot: &Path, extra: &[impl AsRef<str>], inputs: &[u64]) -> Result<Timed> {
    let inputs = input_args(inputs);
    Timed::from_report(&vmm_shim_restore(snapshot, &restore_options(extra, &inputs))?)
}

/// One `vmm-shim restore` per entry of `inputs`, all started at once; their reports in order.
pub fn restore_concurrently(snapshot: &Path, extra: &[impl AsRef<str>], inputs: &[u64]) -> Result<Vec<Timed>> {
    let vmm_shim = workspace_binary("vmm-shim");
    let children = inputs
        .iter()
        .map(|&input| {
            let inputs = input_args(&[input]);
            Command::new(&vmm_shim)
                .args(["restore", "--json", "--snapshot", path(snapshot)])
                .args(restore_options(extra, &inputs))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("spawning vmm-shim")
        })
        .collect::<Result<Vec<_>>>()?;
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output()?;
            ensure!(out.status.success(), "vmm-shim restore failed:\n{}", String::from_utf8_lossy(&out.stderr));
            Timed::from_report(&serde_json::from_slice(&out.stdout)?)
        })
        .collect()
}

/// What a restore report says, in ms.
#[derive(Clone, Copy, Debug)]
pub struct Timed {
    /// From the start of the restore to the first invocation's first instruction.
    pub first_instruction: f64,
    /// From the start of the restore to the first invocation's DONE.
    pub first_done: f64,
    /// The first invocation alone (first instruction to DONE).
    pub first_invocation: f64,
    /// The second invocation, if any: all memory resident (warm).
    pub second_invocation: f64,
    /// Heap pages placed that the first invocation did not touch (uffd backend; NaN otherwise).
    pub untouched_pages: f64,
}

impl Timed {
    fn from_report(report: &Value) -> Result<Timed> {
        let ms = |v: &Value| v.as_f64().map(|us| us / 1e3).context("restore report without a timing");
        let invocations = &report["invocations"];
        let first_instruction = ms(&report["first_instruction_us"])?;
        let first_invocation = ms(&invocations[0]["us"])?;
        Ok(Timed {
            first_instruction,
            first_done: first_instruction + first_invocation,
            first_invocation,
            second_invocation: ms(&invocations[1]["us"]).unwrap_or(f64::NAN),
            untouched_pages: report["heap"]["untouched_resident_pages"].as_f64().unwrap_or(f64::NAN),
        })
    }
}

/// Records `RECORDED` inputs into a working-set file with `uffd-server record`.
pub fn record(snapshot: &Path, ws: &Path) -> Result<()> {
    let server = ServerProcess::start_command("record", &[("vm", &snapshot.join("mem"))], &["--working-set", path(ws)]);
    for input in RECORDED {
        restore(snapshot, &uffd_args(&server), &[input])?;
    }
    server.wait_for_log("run merged into the working set", RECORDED.len());
    Ok(())
}

/// A server for `snapshot` with prefetch `policy` and a private copy of working set `ws`
/// (online refinement must not change the file the next measurement starts from).
pub fn server(snapshot: &Path, ws: &Path, policy: &str, extra: &[&str]) -> Result<ServerProcess> {
    let copy = ws.with_extension(format!("measured-{policy}"));
    std::fs::copy(ws, &copy).with_context(|| format!("copying {}", ws.display()))?;
    let mut args = vec!["--working-set", path(&copy), "--prefetch", policy];
    args.extend_from_slice(extra);
    Ok(ServerProcess::start(&[("vm", &snapshot.join("mem"))], &args))
}

/// `vmm-shim restore` arguments attaching to `server`.
pub fn uffd_args(server: &ServerProcess) -> [String; 4] {
    ["--mem-backend".into(), "uffd".into(), "--uffd-socket".into(), path(&server.socket("vm")).to_string()]
}

/// One restore of `input` (then the same input again, for warm) under `config` (one of
/// [`CONFIGS`]), uffd configurations from a fresh server.
pub fn measure(snapshot: &Path, ws: &Path, config: &str, input: u64) -> Result<Timed> {
    measure_after_load(snapshot, ws, config, input, 0)
}

/// As [`measure`], with the VMM spending `vmm_load_ms` on its own load between guest memory
/// and the vCPUs (`vmm-shim restore --vmm-load-ms`), as Firecracker does.
pub fn measure_after_load(snapshot: &Path, ws: &Path, config: &str, input: u64, vmm_load_ms: u64) -> Result<Timed> {
    let load = ["--vmm-load-ms".to_string(), vmm_load_ms.to_string()];
    let load = if vmm_load_ms > 0 { &load[..] } else { &[] };
    match config.strip_prefix("uffd ") {
        None => restore(snapshot, &[&["--mem-backend".into(), config.into()][..], load].concat(), &[input, input]),
        Some(policy) => {
            let server = server(snapshot, ws, policy, &[])?;
            restore(snapshot, &[&uffd_args(&server)[..], load].concat(), &[input, input])
        }
    }
}

/// A memory figure of process `pid` from `/proc/PID/status` (`VmRSS`, `VmHWM`: the peak), bytes.
pub fn proc_memory(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse::<u64>().ok());
    kib.map(|kib| kib * 1024).with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Drops the page cache (root only); false if it could not.
pub fn drop_caches() -> bool {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}
