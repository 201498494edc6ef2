//! Hardening: a hostile VMM, a careless operator or a changed file never hangs a guest, serves a
//! wrong byte or takes the server down. One test per defect found by trying (issue 10), against
//! the real binary, real userfaultfds and real files.

use e2e::fake_vmm::{create_uffd, handshake_json, send_message, touch_pages, FakeVmm, GuestMemory, PAGE};
use e2e::server_process::{workspace_binary, write_loading_set, ServerProcess};
use e2e::snapshot_file::SnapshotFile;
use e2e::{require_userfaultfd, Watchdog};
use prefetch::identity::SnapshotIdentity;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn snapshot(dir: &Path, name: &str, len: usize, seed: u64) -> SnapshotFile {
    SnapshotFile::random(dir, name, len, 0.3, seed)
}

/// Sends `payload` with `fds` as one message and waits for the server to hang up.
fn send_and_wait_hangup(socket: &Path, payload: &[u8], fds: &[i32]) {
    let stream = UnixStream::connect(socket).expect("connect");
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(fds)];
    let iov = [std::io::IoSlice::new(payload)];
    nix::sys::socket::sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, nix::sys::socket::MsgFlags::empty(), None)
        .expect("sendmsg");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let read = (&stream).read(&mut [0u8; 1]).expect("the server closes a refused connection");
    assert_eq!(read, 0);
}

/// Attaches, touches every page from two threads and checks every byte, under a watchdog.
fn serve_and_verify(server: &ServerProcess, name: &str, snap: &SnapshotFile) {
    let _watchdog = Watchdog::arm(Duration::from_secs(30), "a healthy VM's restore");
    let vmm = FakeVmm::attach(&server.socket(name), snap.bytes.len()).expect("attach");
    vmm.touch_all(2, false);
    vmm.assert_matches(&snap.bytes);
}

#[test]
fn thousands_of_handshakes_with_many_fds_leak_none() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "vm.mem", 4 * MIB, 61);
    let server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    let baseline = server.open_fds();
    let files: Vec<std::fs::File> = (0..253).map(|_| std::fs::File::open("/dev/null").expect("/dev/null")).collect();
    let fds: Vec<i32> = files.iter().map(AsRawFd::as_raw_fd).collect();
    for i in 0..2000 {
        let count = 5 + i % 249; // 5..=253 fds in one message (the most the kernel passes)
        send_and_wait_hangup(&server.socket("vm"), b"[]", &fds[..count]);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.open_fds() > baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.open_fds() <= baseline, "server fds: {} after, {baseline} before", server.open_fds());
    assert!(server.log().contains("carried 5 file descriptors; expected exactly one"), "{}", server.log());
    serve_and_verify(&server, "vm", &snap);
}

#[test]
fn the_same_uffd_attached_twice_is_refused_and_the_first_vm_is_served() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "vm.mem", 4 * MIB, 62);
    let server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    let first = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
    server.wait_for_log("VM attached", 1);
    let json = handshake_json(&first.memory.regions);
    send_and_wait_hangup(&server.socket("vm"), json.as_bytes(), &[first.attachment.uffd.as_raw_fd()]);
    server.wait_for_log("this userfaultfd already serves VM 1", 1);
    first.touch_all(2, false);
    first.assert_matches(&snap.bytes);
}

#[test]
fn a_uffd_without_event_remove_is_refused_naming_the_feature() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "vm.mem", 4 * MIB, 63);
    let server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    let memory = GuestMemory::map(&[snap.bytes.len()], 0, false).expect("map");
    let uffd = userfaultfd::UffdBuilder::new().non_blocking(true).user_mode_only(false).create().expect("uffd");
    uffd.register(memory.regions[0].addr as *mut _, memory.regions[0].size).expect("register");
    send_and_wait_hangup(&server.socket("vm"), handshake_json(&memory.regions).as_bytes(), &[uffd.as_raw_fd()]);
    server.wait_for_log("created without UFFD_FEATURE_EVENT_REMOVE", 1);
    serve_and_verify(&server, "vm", &snap);
}

#[test]
fn a_valid_60_kib_handshake_is_read_whole_and_served() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "vm.mem", 4 * MIB, 64);
    let server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    let memory = GuestMemory::map(&[snap.bytes.len()], 0, false).expect("map");
    let uffd = create_uffd(&memory).expect("uffd");
    let r = memory.regions[0];
    // Unknown fields are ignored (newer Firecrackers may add some): 60 KiB of them.
    let json = serde_json::json!([{"base_host_virt_addr": r.addr, "size": r.size, "offset": 0, "page_size": PAGE,
        "future_field": "x".repeat(60 * 1024)}])
    .to_string();
    assert!(json.len() > 60 * 1024 && json.len() < 64 * 1024);
    let socket = UnixStream::connect(server.socket("vm")).expect("connect");
    send_message(&socket, json.as_bytes(), Some(uffd.as_raw_fd())).expect("send");
    let _watchdog = Watchdog::arm(Duration::from_secs(30), "the 60 KiB handshake's VM");
    touch_pages(&memory.page_addrs().collect::<Vec<_>>(), 2, false);
    assert!(memory.region_bytes(0) == snap.bytes.as_slice(), "every byte served");
    let attachment = e2e::fake_vmm::UffdAttachment { socket, uffd };
    drop(attachment);
    server.wait_for_log("VM ended", 1);
}

#[test]
fn a_2mib_page_size_over_4kib_memory_is_refused() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "vm.mem", 4 * MIB, 65);
    let server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    // 4 KiB anonymous memory, 2 MiB aligned, declared as 2 MiB pages.
    let memory = GuestMemory::map(&[4 * MIB], 0, false).expect("map");
    let uffd = create_uffd(&memory).expect("uffd");
    let r = memory.regions[0];
    assert_eq!(r.addr % (2 * MIB), 0);
    let json = serde_json::json!([{"base_host_virt_addr": r.addr, "size": r.size, "offset": 0, "page_size": 2 * MIB}]);
    send_and_wait_hangup(&server.socket("vm"), json.to_string().as_bytes(), &[uffd.as_raw_fd()]);
    server.wait_for_log("page_size 2097152 but the VMM maps it with 4096-byte pages", 1);
}

#[test]
fn stray_bytes_after_the_handshake_are_dropped_and_barely_logged() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "vm.mem", 4 * MIB, 66);
    let server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    let vmm = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
    let chunk = vec![0x5au8; MIB];
    for _ in 0..100 {
        (&vmm.attachment.socket).write_all(&chunk).expect("100 MB of stray bytes");
    }
    vmm.touch_all(2, false);
    vmm.assert_matches(&snap.bytes);
    let log = server.log();
    let lines = log.matches("unexpected bytes from the VMM").count();
    assert!(lines <= 100 && log.len() < 64 * 1024, "{lines} warning lines, {} bytes of log", log.len());
}

/// Runs `uffd-server serve` in `socket_dir`, expecting it to refuse to start: its stderr.
fn refused_start(socket_dir: &Path, snap: &SnapshotFile, shell_prefix: &str) -> String {
    let script = format!(
        "{shell_prefix} exec {} serve --socket-dir {} --snapshot vm={}",
        workspace_binary("uffd-server").display(),
        socket_dir.display(),
        snap.path.display()
    );
    let out = std::process::Command::new("sh").arg("-c").arg(script).output().expect("run uffd-server");
    assert!(!out.status.success(), "the server started in {}", socket_dir.display());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_unsafe_socket_directory_is_refused_and_a_new_one_is_private_whatever_the_umask() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "vm.mem", MIB, 67);

    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).expect("chown");
    assert!(refused_start(&foreign, &snap, "").contains("belongs to uid 65534"));

    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    assert!(refused_start(&open, &snap, "").contains("is writable by group or others"));

    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path(), &link).expect("symlink");
    assert!(refused_start(&link, &snap, "").contains("is not a directory"));

    // A missing directory is made 0700 and its sockets 0600, even under umask 000.
    let fresh = dir.path().join("fresh");
    let mut server = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec {} serve --socket-dir {} --snapshot vm={}",
            workspace_binary("uffd-server").display(),
            fresh.display(),
            snap.path.display()
        ))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fresh.join("control.sock").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mode = |p: &Path| std::fs::symlink_metadata(p).expect("stat").mode() & 0o777;
    let modes = (mode(&fresh), mode(&fresh.join("vm.sock")), mode(&fresh.join("control.sock")));
    // A second server on the same directory does not steal the sockets: its lock refuses it.
    let second = refused_start(&fresh, &snap, "");
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(modes, (0o700, 0o600, 0o600));
    assert!(second.contains("another server runs on socket directory"), "{second}");
}

#[test]
fn allow_uid_lets_that_user_s_vmm_in_and_keeps_others_out() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "vm.mem", 4 * MIB, 68);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let server = ServerProcess::start(&[("vm", &snap.path)], &["--allow-uid", "65534"]);
    // The server's own temp directory must let the allowed user through to the sockets.
    let parent = server.socket_dir.parent().expect("parent");
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let vmm = |uid: u32| {
        let mut command = std::process::Command::new(workspace_binary("fake-vmm"));
        command.arg(server.socket("vm")).arg(snap.bytes.len().to_string());
        command.args(["0", "--then-exit", "--user-mode-only"]).uid(uid).gid(65534);
        command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        command
    };
    let allowed = vmm(65534).output().expect("run fake-vmm");
    assert!(allowed.status.success(), "{}", String::from_utf8_lossy(&allowed.stderr));
    let fnv = prefetch::fnv1a(prefetch::FNV_OFFSET, &snap.bytes);
    assert_eq!(String::from_utf8_lossy(&allowed.stdout).lines().last(), Some(format!("fnv={fnv:#x}").as_str()));
    // Refused, its guest waits for pages nobody sends (as a refused Firecracker's restore
    // times out): stop it once the server has said why.
    let mut refused = vmm(65533).spawn().expect("run fake-vmm");
    server.wait_for_log("peer uid 65533 is not allowed", 1);
    let _ = refused.kill();
    assert!(!refused.wait().expect("wait").success(), "a VMM of a uid not allowed must not be served");
    let stats = server.stats();
    assert_eq!(stats.vms.len(), 1, "only the allowed VMM attached");
    assert!(stats.vms[0].counters.faults > 0);
}

#[test]
fn a_stalled_control_client_does_not_hold_up_stats() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "vm.mem", MIB, 69);
    let server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    // Clients that connect and never send a command (the server would wait 2 s for each).
    let stalled: Vec<UnixStream> =
        (0..5).map(|_| UnixStream::connect(server.socket_dir.join("control.sock")).expect("connect")).collect();
    let stats = server.stats();
    assert_eq!(stats.snapshots_loaded, vec!["vm".to_string()]);
    for client in &stalled {
        client.set_nonblocking(true).expect("nonblocking");
        let pending = matches!((&*client).read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        assert!(pending, "stats was answered while the stalled clients were still waiting");
    }
}

#[test]
fn planted_symlinks_and_open_directories_never_redirect_a_write() {
    use std::os::unix::fs::PermissionsExt;
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "fn.mem", MIB, 70);
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").expect("victim");
    let ws = dir.path().join("fn.ws");
    e2e::snapshot_file::write_working_set(&ws, &snap, &[(0..64).collect()]);
    let loading_set = |out: &Path| write_loading_set(&snap.path, &ws, out);
    // A symlink at the output name is replaced, never followed.
    let out = dir.path().join("fn.ls");
    std::os::unix::fs::symlink(&victim, &out).expect("symlink");
    assert!(loading_set(&out).status.success());
    assert!(!std::fs::symlink_metadata(&out).expect("stat").file_type().is_symlink());
    // Symlinks at the temp name of earlier versions (name.tmp.PID) are ignored.
    for pid in 1..64 {
        let _ = std::os::unix::fs::symlink(&victim, dir.path().join(format!(".fn.ls.tmp.{pid}")));
    }
    assert!(loading_set(&out).status.success());
    // A directory others may write to is refused, with the reason.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let refused = loading_set(&open.join("fn.ls"));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("writable by group or others"));
    // The lock file of a working set is never opened through a symlink.
    std::os::unix::fs::symlink(&victim, dir.path().join("fn.ws.lock")).expect("symlink");
    let server =
        ServerProcess::start_command("record", &[("fn", &snap.path)], &["--working-set", ws.to_str().expect("utf-8")]);
    let vmm = FakeVmm::attach(&server.socket("fn"), snap.bytes.len()).expect("attach");
    vmm.touch_all(1, false);
    vmm.assert_matches(&snap.bytes);
    drop(vmm);
    server.wait_for_log("working set not updated", 1);
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious", "no write went through a planted symlink");
}

#[test]
fn a_fifo_beside_a_good_snapshot_is_refused_and_holds_up_nothing() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "good.mem", 4 * MIB, 71);
    let fifo = dir.path().join("bad.mem");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let server = ServerProcess::start(&[("good", &snap.path), ("bad", &fifo)], &[]);
    server.wait_for_log("is not a regular file", 1);
    serve_and_verify(&server, "good", &snap);
    let memory = GuestMemory::map(&[snap.bytes.len()], 0, false).expect("map");
    let uffd = create_uffd(&memory).expect("uffd");
    send_and_wait_hangup(&server.socket("bad"), handshake_json(&memory.regions).as_bytes(), &[uffd.as_raw_fd()]);
    server.wait_for_log("is not a regular file", 2);
}

/// Rewrites `path` in place (same inode, same length) with `bytes`.
fn rewrite_in_place(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).expect("open for writing");
    file.write_all_at(bytes, 0).expect("rewrite");
    file.sync_all().expect("sync");
}

/// A handshake of the standard layout for a `len`-byte snapshot, expected to be refused.
fn refused_attach(server: &ServerProcess, name: &str, len: usize) {
    let memory = GuestMemory::map(&[len], 0, false).expect("map");
    let uffd = create_uffd(&memory).expect("uffd");
    send_and_wait_hangup(&server.socket(name), handshake_json(&memory.regions).as_bytes(), &[uffd.as_raw_fd()]);
}

#[test]
fn a_changed_memory_file_under_memory_storage_gives_each_vm_its_own_snapshot_or_a_clear_refusal() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "vm.mem", 4 * MIB, 72);
    let server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    let running = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
    let half: Vec<usize> = running.memory.page_addrs().step_by(2).collect();
    touch_pages(&half, 2, false);
    let new_bytes = snapshot(dir.path(), "other", 4 * MIB, 73).bytes;
    rewrite_in_place(&snap.path, &new_bytes);
    // The VM that started from the old file keeps seeing it whole; the next one sees the new.
    running.touch_all(2, false);
    running.assert_matches(&snap.bytes);
    let next = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
    next.touch_all(2, false);
    next.assert_matches(&new_bytes);
    server.wait_for_log("memory file changed since it was loaded", 1);
    // Truncated: the next VM is refused with the reason, none hangs.
    std::fs::OpenOptions::new().write(true).open(&snap.path).expect("open").set_len(2 * MIB as u64).expect("truncate");
    refused_attach(&server, "vm", 4 * MIB);
    server.wait_for_log("is past the end of the memory file", 1);
}

#[test]
fn a_changed_memory_file_under_disk_storage_poisons_the_running_vm_and_never_serves_a_wrong_byte() {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    require_userfaultfd();
    for change in ["rewrite", "truncate"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let snap = snapshot(dir.path(), "vm.mem", 16 * MIB, 74);
        let server = ServerProcess::start(&[("vm", &snap.path)], &["--snapshot-storage", "disk"]);
        let mut child = std::process::Command::new(workspace_binary("fake-vmm"))
            .arg(server.socket("vm"))
            .arg(snap.bytes.len().to_string())
            .arg("300")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run fake-vmm");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "touching");
        let new_bytes = snapshot(dir.path(), "other", 16 * MIB, 75).bytes;
        match change {
            "rewrite" => rewrite_in_place(&snap.path, &new_bytes),
            _ => std::fs::OpenOptions::new()
                .write(true)
                .open(&snap.path)
                .expect("open")
                .set_len(8 * MIB as u64)
                .expect("truncate"),
        }
        // The VMM's next fault cannot get the old bytes: it gets a memory error, not a hang.
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "{change}: the VMM still waits on a fault:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{change}: {status:?}");
        server.wait_for_log("page poisoned", 1);
        assert!(server.stats().vms[0].counters.poisoned_pages > 0);
        if change == "rewrite" {
            let next = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
            next.touch_all(2, false);
            next.assert_matches(&new_bytes);
        } else {
            refused_attach(&server, "vm", 16 * MIB);
            server.wait_for_log("is past the end of the memory file", 1);
        }
    }
}

#[test]
fn a_loading_set_is_not_used_once_its_memory_file_was_rewritten_even_with_its_mtime_set_back() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "fn.mem", 8 * MIB, 76);
    let (ws, ls) = (dir.path().join("fn.ws"), dir.path().join("fn.ls"));
    e2e::snapshot_file::write_working_set(&ws, &snap, &[(0..1500).collect()]);
    let built = write_loading_set(&snap.path, &ws, &ls);
    assert!(built.status.success());
    let mtime = std::fs::metadata(&snap.path).and_then(|m| m.modified()).expect("mtime");
    // Pages 5..10, in the loading set, none of them among the 64 pages the identity samples:
    // only the file's stamp can tell.
    let mut new_bytes = snap.bytes.clone();
    new_bytes[5 * PAGE..10 * PAGE].iter_mut().for_each(|b| *b = !*b);
    assert_eq!(SnapshotIdentity::of(&new_bytes), SnapshotIdentity::of(&snap.bytes));
    rewrite_in_place(&snap.path, &new_bytes);
    std::fs::File::options().write(true).open(&snap.path).expect("open").set_modified(mtime).expect("set mtime back");
    let args = ["--snapshot-storage", "disk", "--loading-set", ls.to_str().expect("utf-8"), "--prefetch", "union"];
    let server = ServerProcess::start(&[("fn", &snap.path)], &args);
    let vmm = FakeVmm::attach(&server.socket("fn"), snap.bytes.len()).expect("attach");
    vmm.touch_all(3, false);
    vmm.assert_matches(&new_bytes);
    drop(vmm);
    server.wait_for_log("VM ended", 1);
    server.wait_for_log("memory file changed since it was written", 1);
    assert_eq!(server.stats().vms[0].counters.loading_set_pages, 0);
}

#[test]
fn a_region_split_by_mprotect_is_served_where_a_cluster_spans_the_split() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "vm.mem", 4 * MIB, 78);
    let server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    let vmm = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
    let region = vmm.memory.regions[0];
    // Read-only from page 8 to page 8 + 256: two mappings inside 64 KiB clusters.
    // SAFETY: the range lies inside the region, which this test owns; only reads follow.
    let ret = unsafe { libc::mprotect((region.addr + 8 * PAGE) as *mut _, MIB, libc::PROT_READ) };
    assert_eq!(ret, 0, "mprotect: {}", std::io::Error::last_os_error());
    let _watchdog = Watchdog::arm(Duration::from_secs(30), "touching a region split by mprotect");
    vmm.touch_all(2, false);
    vmm.assert_matches(&snap.bytes);
}

#[test]
fn a_remove_racing_the_first_faults_never_hangs_reap_eager_or_the_end_of_a_union_plan() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(dir.path(), "fn.mem", 4 * MIB, 79);
    let ws = dir.path().join("fn.ws");
    e2e::snapshot_file::write_working_set(&ws, &snap, &[(0..snap.pages() as u64).collect()]);
    const TRIES: usize = 200;
    for policy in ["reap", "eager", "union"] {
        let args = ["--working-set", ws.to_str().expect("utf-8"), "--prefetch", policy];
        let server = ServerProcess::start(&[("fn", &snap.path)], &args);
        for attempt in 0..TRIES {
            let _watchdog = Watchdog::arm(Duration::from_secs(20), &format!("{policy}, try {attempt}"));
            let vmm = FakeVmm::attach(&server.socket("fn"), snap.bytes.len()).expect("attach");
            let region = vmm.memory.regions[0];
            let removed = (attempt % 8) * 64 * 1024..(attempt % 8) * 64 * 1024 + 256 * 1024;
            let first_pages: Vec<usize> = (0..MIB / PAGE).map(|p| region.addr + p * PAGE).collect();
            std::thread::scope(|scope| {
                scope.spawn(|| vmm.dontneed(0, removed.start, removed.len()).expect("madvise"));
                touch_pages(&first_pages, 1, false);
            });
            vmm.touch_all(1, false);
            let mut expected = snap.bytes.clone();
            expected[removed.clone()].fill(0);
            vmm.assert_matches(&expected);
        }
        drop(server);
    }
}

#[test]
fn a_bad_name_in_the_snapshot_dir_is_skipped_and_stats_into_a_closed_pipe_does_not_panic() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snapshots = dir.path().join("snapshots");
    std::fs::create_dir(&snapshots).expect("mkdir");
    let snap = snapshot(&snapshots, "fn.mem", MIB, 80);
    std::fs::write(snapshots.join("bad name!.mem"), vec![0u8; 4096]).expect("write");
    let dir_arg = snapshots.to_str().expect("utf-8");
    let server = ServerProcess::start(&[], &["--snapshot-dir", dir_arg]);
    server.wait_for_log("skipped, its name is not a valid snapshot name", 1);
    serve_and_verify(&server, "fn", &snap);

    // `uffd-server stats | head -0`: the reader is gone before anything is written.
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    drop(read_end);
    let out = std::process::Command::new(workspace_binary("uffd-server"))
        .arg("stats")
        .arg("--socket-dir")
        .arg(&server.socket_dir)
        .stdout(std::process::Stdio::from(write_end))
        .output()
        .expect("run stats");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("panicked"), "{:?}: {stderr}", out.status);
}
