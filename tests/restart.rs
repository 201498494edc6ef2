//! End-to-end tests of the server's own end: a crash (SIGKILL), a stop (SIGTERM) and a planned
//! handover, each with real KVM guests (`vmm-shim restore`) faulting, prefetching and
//! ballooning through it. Every guest must finish with every invocation's checksum verified
//! (vmm-shim checks them against the memory file, and ballooned ranges as zeros).

use e2e::server_process::{run_binary, workspace_binary, ServerProcess};
use e2e::{require_kvm, require_userfaultfd, Watchdog};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A python-like guest (128 MiB) and a working set recorded from one restore of it.
struct Fixture {
    _dir: tempfile::TempDir,
    snap_dir: PathBuf,
    ws: PathBuf,
}

fn fixture() -> Fixture {
    require_kvm();
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap_dir = dir.path().join("snapshot");
    let utf8 = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    run_binary("vmm-shim", &["snapshot", "--workload", "python-like", "--out", &utf8(&snap_dir)]).expect("snapshot");
    let ws = dir.path().join("vm.ws");
    let recorder =
        ServerProcess::start_command("record", &[("vm", &snap_dir.join("mem"))], &["--working-set", &utf8(&ws)]);
    let mut vm = spawn_vm(&recorder, &snap_dir, 2, &[]);
    assert!(vm.wait().expect("wait").success(), "recording restore failed");
    recorder.wait_for_log("run merged into the working set", 1);
    Fixture { _dir: dir, snap_dir, ws }
}

impl Fixture {
    /// A server of the snapshot, prefetching the working set in the background (`union`).
    fn serve(&self) -> ServerProcess {
        let ws = self.ws.to_str().expect("utf-8");
        ServerProcess::start(&[("vm", &self.snap_dir.join("mem"))], &["--working-set", ws, "--prefetch", "union"])
    }
}

/// A `vmm-shim restore` of `invocations` invocations through `server`, ballooning 2 MiB of
/// heap after each (a REMOVE each time; later invocations must read zeros there).
fn spawn_vm(server: &ServerProcess, snap_dir: &Path, invocations: u32, extra: &[&str]) -> Child {
    Command::new(workspace_binary("vmm-shim"))
        .args(["restore", "--mem-backend", "uffd", "--balloon-range", "2:2", "--invoke", &invocations.to_string()])
        .arg("--snapshot")
        .arg(snap_dir)
        .arg("--uffd-socket")
        .arg(server.socket("vm"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm-shim")
}

/// `count` VMs of `invocations` each (as [`spawn_vm`]), returned once the server has journaled
/// them all.
fn start_journaled(server: &ServerProcess, snap_dir: &Path, count: usize, invocations: u32) -> Vec<Child> {
    let vms: Vec<Child> = (0..count).map(|_| spawn_vm(server, snap_dir, invocations, &[])).collect();
    wait_until(&format!("{count} journaled VMs"), server, || journals(server).0 == count);
    vms
}

/// Waits for every VM; fails with the stderr of the first that did not verify, or with the
/// server's log if one has not finished within 90 s (a guest frozen on a fault).
fn assert_all_verified(vms: Vec<Child>, server: &ServerProcess, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    for mut vm in vms {
        while vm.try_wait().expect("wait for vmm-shim").is_none() {
            if Instant::now() > deadline {
                let _ = vm.kill();
                panic!("{what}: a guest did not finish (frozen?)\nserver log:\n{}", server.log());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = vm.wait_with_output().expect("wait for vmm-shim");
        assert!(
            out.status.success(),
            "{what}: a guest failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            server.log()
        );
    }
}

fn journal_dir(server: &ServerProcess) -> PathBuf {
    server.socket_dir.join("journal")
}

/// The journals in the server's journal directory, and how many removed ranges they hold.
fn journals(server: &ServerProcess) -> (usize, usize) {
    let Ok(entries) = std::fs::read_dir(journal_dir(server)) else { return (0, 0) };
    let files: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "journal")).collect();
    let removed =
        files.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default().matches("\"removed\"").count()).sum();
    (files.len(), removed)
}

fn wait_until(what: &str, server: &ServerProcess, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn sixteen_guests_survive_twenty_crashes_of_the_server_at_random_moments() {
    let fixture = fixture();
    let mut server = fixture.serve();
    let _watchdog = Watchdog::arm(Duration::from_secs(600), "the crash rounds");
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut taken_over = 0;
    for round in 0..20 {
        let vms = start_journaled(&server, &fixture.snap_dir, 16, 12);
        seed = vmm_shim::workload::xorshift(seed);
        if round % 2 == 1 {
            // Right after a REMOVE: the moment a lost range would serve snapshot bytes.
            let before = journals(&server).1;
            wait_until("a REMOVE", &server, || journals(&server).1 > before);
        } else {
            // Anywhere in the first ~60 ms: mid-prefetch, mid-invocation.
            std::thread::sleep(Duration::from_micros(seed % 60_000));
        }
        let live = journals(&server).0;
        server.restart(&[]);
        taken_over += live;
        assert_all_verified(vms, &server, &format!("crash round {round}"));
        wait_until("every journal removed", &server, || journals(&server).0 == 0);
    }
    let recovered = server.log().matches("VM taken over").count();
    assert!(recovered >= taken_over.min(20 * 16) / 2, "most VMs live at a crash were taken over: {recovered}");
    assert_eq!(server.log().matches("VM not recovered").count(), 0, "{}", server.log());
}

#[test]
fn a_server_killed_after_reading_each_remove_and_before_journaling_it_loses_none() {
    // The window a crash test only hits now and then, hit every time: each server process
    // reads the VM's next REMOVE and is SIGKILLed before its journal append (a failpoint). The
    // kernel has let the VMM drop the pages by then; only the events file tells the successor.
    let fixture = fixture();
    let ws = fixture.ws.to_str().expect("utf-8");
    let mut server = ServerProcess::start_with_env(
        "serve",
        &[("vm", &fixture.snap_dir.join("mem"))],
        &["--working-set", ws, "--prefetch", "union"],
        &[("FAILPOINTS", "remove-read=return")],
    );
    let _watchdog = Watchdog::arm(Duration::from_secs(120), "the REMOVE-window crashes");
    let invocations = 4;
    let mut vm = spawn_vm(&server, &fixture.snap_dir, invocations, &[]);
    let mut crashes = 0;
    while vm.try_wait().expect("wait for vmm-shim").is_none() {
        if !server.is_running() {
            crashes += 1;
            server.restart(&[]);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // One balloon after each invocation: every REMOVE killed a server, and each successor
    // but the last (whose VMM may be gone) took the VM over, knowing the REMOVE only from the
    // events file, and journaled it before its own death.
    let log = server.log();
    assert!(crashes >= invocations - 1, "{crashes} crashes:\n{log}");
    let taken_over = log.matches("VM taken over").count();
    assert!(taken_over + 1 >= crashes as usize, "{taken_over} takeovers:\n{log}");
    assert!(log.contains("read_not_journaled=1"), "{log}");
    assert_all_verified(vec![vm], &server, "a REMOVE read by a dying server");
}

#[test]
fn a_vm_idle_in_a_blocking_read_stops_for_a_handover_and_sigterm_and_sees_its_vmm_end() {
    // With nothing to prefetch, a VM's loop waits in a blocking read of its uffd, which says
    // nothing about the VMM or the server: the watcher must interrupt it for each of these.
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = e2e::snapshot_file::SnapshotFile::random(dir.path(), "vm.mem", 4 << 20, 0.3, 77);
    let mut server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    let _watchdog = Watchdog::arm(Duration::from_secs(120), "the idle VMs");
    let ended = |server: &ServerProcess, how: &str| server.log().matches(&format!("VM ended ({how}")).count();
    let idle_vm = |socket: PathBuf| {
        let vmm = e2e::fake_vmm::FakeVmm::attach(&socket, snap.bytes.len()).expect("attach");
        vmm.touch_all(1, false);
        std::thread::sleep(Duration::from_millis(50)); // every page served: the loop waits in read
        vmm
    };
    // A handover: the predecessor's loop stops although it waits in a read.
    let vmm = idle_vm(server.socket("vm"));
    let started = Instant::now();
    assert!(server.take_over().success(), "{}", server.log());
    assert!(started.elapsed() < Duration::from_secs(10), "the idle VM held the handover up:\n{}", server.log());
    assert_eq!(ended(&server, "stopped for a successor"), 1, "{}", server.log());
    // Its VMM ends: the successor's loop, idle in a read too, learns it.
    drop(vmm);
    wait_until("the successor to see the VMM end", &server, || ended(&server, "VMM closed") == 1);
    // SIGTERM: a new idle VM stops at once, journaled for the next start.
    let vmm = idle_vm(server.socket("vm"));
    let started = Instant::now();
    assert!(server.terminate().success(), "{}", server.log());
    assert!(started.elapsed() < Duration::from_secs(10), "the idle VM held the stop up:\n{}", server.log());
    assert!(!server.log().contains("not every VM stopped"), "{}", server.log());
    assert_eq!(journals(&server).0, 1, "the idle VM is journaled for the next start");
    drop(vmm);
}

#[test]
fn a_planned_handover_of_sixteen_faulting_guests_loses_no_fault() {
    let fixture = fixture();
    let mut server = fixture.serve();
    let _watchdog = Watchdog::arm(Duration::from_secs(300), "the handover rounds");
    for round in 0..3 {
        let vms = start_journaled(&server, &fixture.snap_dir, 16, 12);
        std::thread::sleep(Duration::from_millis(5 * round));
        let status = server.take_over();
        assert!(status.success(), "the predecessor exits cleanly after a handover:\n{}", server.log());
        assert_all_verified(vms, &server, &format!("handover round {round}"));
    }
    let log = server.log();
    assert_eq!(log.matches("took over from the previous server").count(), 3, "{log}");
    assert_eq!(log.matches("VM not recovered").count(), 0, "{log}");
    // The socket works for new VMs after the handovers.
    let vm = spawn_vm(&server, &fixture.snap_dir, 2, &[]);
    assert_all_verified(vec![vm], &server, "after the handovers");
}

#[test]
fn sigterm_leaves_journals_and_removes_sockets_and_a_restart_finishes_every_guest() {
    let fixture = fixture();
    let mut server = fixture.serve();
    let _watchdog = Watchdog::arm(Duration::from_secs(120), "the SIGTERM round");
    let vms = start_journaled(&server, &fixture.snap_dir, 4, 12);
    let status = server.terminate();
    assert!(status.success(), "SIGTERM is a clean stop:\n{}", server.log());
    assert!(!server.socket("vm").exists(), "the socket file is removed");
    let (left, _) = journals(&server);
    assert!(left > 0, "the VMs' journals are left for a restart:\n{}", server.log());
    server.restart(&[]);
    assert_all_verified(vms, &server, "after SIGTERM");
    assert!(server.log().matches("VM taken over").count() >= left);
    let counted = server.stats().vms.iter().filter(|vm| vm.counters.taken_over == 1).count();
    assert_eq!(counted, left, "each VM taken back is counted once (uffd_vms_taken_over_total)");
}

#[test]
fn a_vmm_that_died_meanwhile_and_a_reused_pid_are_cleaned_up_never_touched() {
    let fixture = fixture();
    let mut server = fixture.serve();
    let mut vms = start_journaled(&server, &fixture.snap_dir, 2, 1_000_000);
    server.kill_hard();
    // One VMM dies while no server runs; the other's journal is made to name a process that
    // holds no such uffd: a pid reused by an innocent process.
    vms[0].kill().expect("kill the VMM");
    vms[0].wait().expect("reap");
    let mut innocent = Command::new("sleep").arg("60").spawn().expect("spawn sleep");
    let victim_pid = vms[1].id();
    for entry in std::fs::read_dir(journal_dir(&server)).expect("journal dir").flatten() {
        if entry.path().extension().is_none_or(|x| x != "journal") {
            continue; // the events files beside them
        }
        let text = std::fs::read_to_string(entry.path()).expect("journal");
        if text.contains(&format!("\"peer_pid\":{victim_pid},")) {
            let moved =
                text.replace(&format!("\"peer_pid\":{victim_pid},"), &format!("\"peer_pid\":{},", innocent.id()));
            std::fs::write(entry.path(), moved).expect("rewrite journal");
        }
    }
    server.restart(&[]);
    let log = server.log();
    assert!(log.contains("has exited: nothing to recover, journal removed"), "{log}");
    assert!(log.contains("is another process now"), "the reused pid is recognised:\n{log}");
    assert_eq!(journals(&server).0, 0, "both journals are gone");
    let left: Vec<_> =
        std::fs::read_dir(journal_dir(&server)).expect("journal dir").flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "their events files too: {left:?}");
    assert!(matches!(innocent.try_wait(), Ok(None)), "the innocent process was not touched");
    innocent.kill().expect("kill sleep");
    let _ = innocent.wait();
    vms[1].kill().expect("kill the orphaned VMM");
    let _ = vms[1].wait();
}

#[test]
fn a_second_server_on_the_same_socket_directory_refuses_to_start() {
    let fixture = fixture();
    let server = fixture.serve();
    let mem = fixture.snap_dir.join("mem");
    let out = Command::new(workspace_binary("uffd-server"))
        .args(["serve", "--socket-dir"])
        .arg(&server.socket_dir)
        .arg("--snapshot")
        .arg(format!("other={}", mem.display()))
        .output()
        .expect("run a second server");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another server runs on socket directory"), "{stderr}");
    assert!(server.socket("vm").exists(), "the first server's socket is untouched");
}

#[test]
fn socket_path_puts_the_single_snapshot_socket_where_the_vmm_is_configured() {
    let fixture = fixture();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("firecracker-uffd.sock");
    let server = ServerProcess::start(
        &[("vm", &fixture.snap_dir.join("mem"))],
        &["--socket-path", path.to_str().expect("utf-8")],
    );
    let vm = Command::new(workspace_binary("vmm-shim"))
        .args(["restore", "--mem-backend", "uffd", "--invoke", "2", "--snapshot"])
        .arg(&fixture.snap_dir)
        .arg("--uffd-socket")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm-shim");
    assert_all_verified(vec![vm], &server, "--socket-path");
    assert!(!server.socket("vm").exists(), "no NAME.sock in the socket directory");
}

#[test]
fn ready_is_told_to_systemd_once_the_sockets_accept() {
    let fixture = fixture();
    let dir = tempfile::tempdir().expect("temp dir");
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    notify.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let notify_env = notify_path.to_str().expect("utf-8");
    let server = ServerProcess::start_with_env(
        "serve",
        &[("vm", &fixture.snap_dir.join("mem"))],
        &[],
        &[("NOTIFY_SOCKET", notify_env)],
    );
    let mut message = [0u8; 64];
    let len = notify.recv(&mut message).expect("READY=1 from the server");
    assert_eq!(&message[..len], b"READY=1\n");
    assert!(server.socket("vm").exists(), "the sockets are bound before READY");
}

#[test]
fn the_shipped_systemd_unit_is_valid() {
    // systemd-analyze checks the unit's syntax and that ExecStart is executable: point it at
    // the binary just built.
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/systemd/uffd-server.service"))
            .expect("the shipped unit");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("uffd-server.service");
    let binary = workspace_binary("uffd-server");
    std::fs::write(&path, unit.replace("/usr/local/bin/uffd-server", binary.to_str().expect("utf-8"))).expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (./x installs systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("uffd-server.service:"), "systemd-analyze verify:\n{stderr}");
}

#[test]
fn a_run_being_recorded_goes_on_across_a_handover() {
    let fixture = fixture();
    let mem = fixture.snap_dir.join("mem");
    let identity = prefetch::identity::SnapshotIdentity::of(&std::fs::read(&mem).expect("memory file"));
    let pages_of = |ws: &Path| prefetch::format::load(ws, &identity).expect("working set").pages.len();
    // The same restore recorded twice: straight through, and handed over in the middle.
    let mut recorded = Vec::new();
    for handover in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        let ws = dir.path().join("vm.ws");
        let mut server =
            ServerProcess::start_command("record", &[("vm", &mem)], &["--working-set", ws.to_str().expect("utf-8")]);
        let vm = spawn_vm(&server, &fixture.snap_dir, 8, &[]);
        wait_until("the VM journaled", &server, || journals(&server).0 == 1);
        if handover {
            std::thread::sleep(Duration::from_millis(30));
            assert!(server.take_over().success(), "handover:\n{}", server.log());
            assert!(server.log().contains("VM taken over"), "the VM was handed over mid-run:\n{}", server.log());
        }
        assert_all_verified(vec![vm], &server, "recording");
        server.wait_for_log("run merged into the working set", 1);
        recorded.push(pages_of(&ws));
    }
    assert!(recorded[0] > 1000, "the run recorded the guest's pages: {recorded:?}");
    assert_eq!(recorded[0], recorded[1], "the handed-over run lost no first touch");
}

#[test]
fn a_successor_that_fails_mid_handover_leaves_the_old_server_serving_every_guest() {
    let fixture = fixture();
    let mut server = fixture.serve();
    let _watchdog = Watchdog::arm(Duration::from_secs(300), "the failed handover");
    let vms = start_journaled(&server, &fixture.snap_dir, 4, 12);
    // A successor that asks, reads the start of the handover and dies.
    {
        use std::io::{Read, Write};
        let mut successor =
            std::os::unix::net::UnixStream::connect(server.socket_dir.join("control.sock")).expect("control socket");
        successor.write_all(b"handover\n").expect("ask for a handover");
        let mut start = [0u8; 16];
        successor.read_exact(&mut start).expect("the handover starts");
    }
    server.wait_for_log("handover failed", 1);
    assert!(server.is_running(), "the old server goes on:\n{}", server.log());
    assert_all_verified(vms, &server, "after a failed handover");
    // And it accepts new VMs again.
    let vm = spawn_vm(&server, &fixture.snap_dir, 2, &[]);
    assert_all_verified(vec![vm], &server, "a VM after the failed handover");
}
