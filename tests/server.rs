//! End-to-end tests of `uffd-server serve`: the real binary, a real userfaultfd, and a test VMM
//! that attaches exactly as Firecracker does.

use e2e::fake_vmm::{create_uffd, handshake_json, send_message, FakeVmm, GuestMemory, GuestRegion, GAP, HUGE, PAGE};
use e2e::server_process::{workspace_binary, ServerProcess};
use e2e::snapshot_file::{Rng, SnapshotFile};
use e2e::{ensure_huge_pages, require_userfaultfd};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: usize = 1 << 20;

fn snapshot(dir: &tempfile::TempDir, len: usize, seed: u64) -> SnapshotFile {
    SnapshotFile::random(dir.path(), "vm.mem", len, 0.3, seed)
}

#[test]
fn every_byte_matches_a_64mib_snapshot_touched_from_several_threads() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(&dir, 64 * MIB, 1);
    for fault_around in ["1", "16"] {
        let server = ServerProcess::start(&[("vm", &snap.path)], &["--fault-around", fault_around]);
        let vmm = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
        vmm.touch_all(4, false);
        vmm.assert_matches(&snap.bytes);
    }
}

#[test]
fn zero_pages_are_mapped_with_zeropage_and_data_pages_copied() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(&dir, 16 * MIB, 2);
    let (pages, zero) = (snap.pages() as u64, snap.zero_pages() as u64);
    assert!(zero > 0 && zero < pages);
    let server = ServerProcess::start(&[("vm", &snap.path)], &["--fault-around", "1"]);

    let reader = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
    reader.touch_all(3, false);
    reader.assert_matches(&snap.bytes);
    drop(reader);
    server.wait_for_log("VM ended", 1);
    // A write fault on a zero page is served by copying zeros: ZEROPAGE would cost a CoW fault.
    let writer = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
    writer.touch_all(3, true);
    writer.assert_matches(&snap.bytes);
    drop(writer);
    server.wait_for_log("VM ended", 2);

    let stats = server.stats();
    let (read, write) = (&stats.vms[0].counters, &stats.vms[1].counters);
    assert_eq!(
        (read.faults, read.zeropage_pages, read.copied_pages, read.zero_copied_pages),
        (pages, zero, pages - zero, 0)
    );
    assert_eq!(
        (write.faults, write.zeropage_pages, write.copied_pages, write.zero_copied_pages),
        (pages, 0, pages - zero, zero)
    );
    assert_eq!(read.copied_bytes, (pages - zero) * PAGE as u64);
    assert!(read.fault_latency_p50_us > 0.0);
    assert_eq!(stats.vms[0].ended.as_deref(), Some("VMM closed its socket"));
}

#[test]
fn removed_ranges_read_as_zeros_not_snapshot_bytes() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "vm.mem", 32 * MIB, 0.0, 3);
    let server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    let vmm = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
    let region1 = vmm.memory.regions[1];
    // Never touched yet: the REMOVE comes before any fault there.
    vmm.dontneed(1, 3 * PAGE, 5 * PAGE).expect("madvise");
    vmm.touch_all(2, false);
    // Touched already: the pages are dropped and fault again.
    vmm.dontneed(0, MIB + 7 * PAGE, MIB).expect("madvise");
    vmm.touch_all(2, false);

    let mut expected = snap.bytes.clone();
    let region1_file = region1.file_offset;
    expected[region1_file + 3 * PAGE..region1_file + 8 * PAGE].fill(0);
    expected[MIB + 7 * PAGE..2 * MIB + 7 * PAGE].fill(0);
    vmm.assert_matches(&expected);
    drop(vmm);
    server.wait_for_log("VM ended", 1);
    let c = &server.stats().vms[0].counters;
    assert_eq!(c.remove_events, 2);
    assert_eq!(c.removed_faults, 5 + 256, "every removed page faulted once and was served as zeros");
}

#[test]
fn sixteen_vms_restore_from_one_snapshot_at_once() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(&dir, 16 * MIB, 4);
    let server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    std::thread::scope(|scope| {
        for _ in 0..16 {
            scope.spawn(|| {
                let vmm = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
                vmm.touch_all(2, false);
                vmm.assert_matches(&snap.bytes);
            });
        }
    });
    server.wait_for_log("VM ended", 16);
    assert_eq!(server.log().matches("snapshot loaded").count(), 1, "one copy of the snapshot serves every VM");
    assert_eq!(server.stats().vms.len(), 16);
}

/// Sends `payload` (and `fd`) as a handshake and waits for the server to hang up.
fn send_bad_handshake(server: &ServerProcess, payload: &[u8], fd: Option<i32>) {
    let socket = UnixStream::connect(server.socket("vm")).expect("connect");
    if payload.is_empty() && fd.is_none() {
        socket.shutdown(std::net::Shutdown::Write).expect("shutdown");
    } else {
        send_message(&socket, payload, fd).expect("send");
    }
    socket.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut buf = [0u8; 1];
    let read = (&socket).read(&mut buf).expect("the server must close a refused connection");
    assert_eq!(read, 0, "nothing is ever sent to a VMM");
}

fn region_json(addr: usize, size: usize, offset: usize, page_size: usize) -> serde_json::Value {
    serde_json::json!({"base_host_virt_addr": addr, "size": size, "offset": offset, "page_size": page_size, "page_size_kib": page_size})
}

#[test]
fn malformed_handshakes_get_specific_errors_and_other_vms_are_still_served() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(&dir, 8 * MIB, 5);
    let len = snap.bytes.len();
    let server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    let before = FakeVmm::attach(&server.socket("vm"), len).expect("attach");
    let half: Vec<usize> = before.memory.page_addrs().step_by(2).collect();
    e2e::fake_vmm::touch_pages(&half, 2, false);

    // A real uffd over real memory, so that only the JSON is wrong.
    let memory = GuestMemory::map(&[len], 0, false).expect("map");
    let uffd = create_uffd(&memory).expect("uffd");
    let (base, fd) = (memory.regions[0].addr, Some(uffd.as_raw_fd()));
    let json = |regions: Vec<serde_json::Value>| serde_json::Value::Array(regions).to_string().into_bytes();
    let valid = handshake_json(&memory.regions).into_bytes();
    let dev_null = std::fs::File::open("/dev/null").expect("/dev/null");
    let mut rng = Rng::new(9);
    let garbage: Vec<u8> = (0..2048).map(|_| b"{}[]:,\"abc019 "[(rng.next_u64() % 14) as usize]).collect();

    let cases: Vec<(&str, Vec<u8>, Option<i32>, &str)> = vec![
        ("empty message", vec![], None, "empty handshake"),
        ("no fd", valid.clone(), None, "carried no file descriptor"),
        ("fd that is not a uffd", valid.clone(), Some(dev_null.as_raw_fd()), "is not a userfaultfd (it is /dev/null)"),
        ("invalid JSON", b"{not json".to_vec(), fd, "handshake JSON is invalid"),
        (">1 KiB of JSON garbage", garbage, fd, "handshake JSON is invalid"),
        (
            "overlapping regions",
            json(vec![region_json(base, 2 * MIB, 0, PAGE), region_json(base + MIB, 2 * MIB, 2 * MIB, PAGE)]),
            fd,
            "regions 0 and 1 overlap in the VMM's address space",
        ),
        (
            "region past end of file",
            json(vec![region_json(base, 2 * MIB, len - MIB, PAGE)]),
            fd,
            "is past the end of the memory file",
        ),
        ("unaligned region", json(vec![region_json(base + 512, MIB, 0, PAGE)]), fd, "is not aligned to its page size"),
        (
            "page size 8192",
            json(vec![region_json(base, MIB, 0, 8192)]),
            fd,
            "region 0: page size 8192 is not supported",
        ),
    ];
    let mut seen_invalid_json = 0;
    for (case, payload, fd, message) in cases {
        send_bad_handshake(&server, &payload, fd);
        let count = if message.contains("JSON is invalid") {
            seen_invalid_json += 1;
            seen_invalid_json
        } else {
            1
        };
        server.wait_for_log(message, count);
        eprintln!("refused as expected: {case}");
    }
    assert_eq!(server.log().matches("VM refused").count(), 9);

    before.touch_all(2, false);
    before.assert_matches(&snap.bytes);
    let after = FakeVmm::attach(&server.socket("vm"), len).expect("attach");
    after.touch_all(2, false);
    after.assert_matches(&snap.bytes);
}

#[test]
fn a_vmm_killed_mid_restore_does_not_disturb_the_others() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(&dir, 16 * MIB, 6);
    let len = snap.bytes.len();
    let server = ServerProcess::start(&[("vm", &snap.path)], &["--fault-around", "1"]);
    let survivor = FakeVmm::attach(&server.socket("vm"), len).expect("attach");

    let mut victim = Command::new(workspace_binary("fake-vmm"))
        .arg(server.socket("vm"))
        .arg(len.to_string())
        .arg("200")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn fake-vmm");
    let mut line = String::new();
    BufReader::new(victim.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "touching", "the victim is faulting");
    std::thread::scope(|scope| {
        scope.spawn(|| survivor.touch_all(2, false));
        std::thread::sleep(Duration::from_millis(50));
        victim.kill().expect("SIGKILL");
    });
    victim.wait().expect("reap");
    server.wait_for_log("VM ended (VMM closed its socket)", 1);

    survivor.assert_matches(&snap.bytes);
    let newcomer = FakeVmm::attach(&server.socket("vm"), len).expect("attach");
    newcomer.touch_all(2, false);
    newcomer.assert_matches(&snap.bytes);
    let stats = server.stats();
    let victim_stats = stats.vms.iter().find(|v| v.ended.is_some()).expect("the victim ended");
    assert!(victim_stats.counters.faults > 0 && victim_stats.counters.faults < snap.pages() as u64);
}

#[test]
fn hugetlbfs_backed_regions_are_served_in_2mib_pages() {
    require_userfaultfd();
    if !ensure_huge_pages(8) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut bytes = SnapshotFile::random(dir.path(), "tmp", 16 * MIB, 0.3, 7).bytes;
    bytes[2 * MIB..4 * MIB].fill(0); // one all-zero huge page: served by copying zeros
    let snap = SnapshotFile::from_bytes(dir.path(), "vm.mem", bytes);
    let server = ServerProcess::start(&[("vm", &snap.path)], &[]);
    let vmm = FakeVmm::attach_layout(&server.socket("vm"), &[8 * MIB, 8 * MIB], HUGE, true).expect("attach hugetlbfs");
    vmm.touch_all(2, false);
    vmm.assert_matches(&snap.bytes);
    drop(vmm);
    server.wait_for_log("VM ended", 1);
    let c = &server.stats().vms[0].counters;
    // Two threads may fault on one huge page at once: the second finds it present and is woken.
    assert_eq!(c.faults, 8 + c.already_present, "one served fault per 2 MiB page");
    assert_eq!((c.copied_pages, c.zero_copied_pages, c.zeropage_pages), (7 * 512, 512, 0));
}

#[test]
fn regions_of_the_standard_layout_have_a_gap() {
    // Guards the harness itself: the two regions must not be adjacent (the x86 memory hole).
    require_userfaultfd();
    let memory = GuestMemory::map(&[4 * MIB, 2 * MIB], GAP, false).expect("map");
    let [a, b]: [GuestRegion; 2] = memory.regions.clone().try_into().expect("two regions");
    assert_eq!(b.addr - (a.addr + a.size), GAP);
    assert_eq!(b.file_offset, a.size);
}

#[test]
fn one_process_serves_several_snapshots_each_on_its_socket() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let python = SnapshotFile::random(dir.path(), "python.mem", 4 * MIB, 0.3, 10);
    let node = SnapshotFile::random(dir.path(), "node.mem", 6 * MIB, 0.3, 11);
    let server = ServerProcess::start(&[("python", &python.path), ("node", &node.path)], &[]);
    for (name, snap) in [("python", &python), ("node", &node)] {
        let vmm = FakeVmm::attach(&server.socket(name), snap.bytes.len()).expect("attach");
        vmm.touch_all(2, false);
        vmm.assert_matches(&snap.bytes);
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(server.socket("node")).expect("socket").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "sockets are private to the server's user");
}

#[test]
fn peers_outside_allow_uid_are_refused_and_stats_command_reports_vms() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = snapshot(&dir, 4 * MIB, 12);
    let our_uid = nix::unistd::getuid().as_raw();
    let strict = ServerProcess::start(&[("vm", &snap.path)], &["--allow-uid", &(our_uid + 1).to_string()]);
    // The uid is checked on connect, before any handshake is read.
    let refused = UnixStream::connect(strict.socket("vm")).expect("connect");
    strict.wait_for_log(&format!("peer uid {our_uid} is not allowed"), 1);
    let mut buf = [0u8; 1];
    match (&refused).read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the server must hang up on a refused peer, got {other:?}"),
    }

    let open = ServerProcess::start(&[("vm", &snap.path)], &["--allow-uid", &our_uid.to_string()]);
    let vmm = FakeVmm::attach(&open.socket("vm"), snap.bytes.len()).expect("attach");
    vmm.touch_all(1, false);
    vmm.assert_matches(&snap.bytes);
    let output = Command::new(workspace_binary("uffd-server"))
        .args(["stats", "--json", "--socket-dir"])
        .arg(&open.socket_dir)
        .output()
        .expect("run stats");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("stats JSON");
    let vm = &json["vms"][0];
    assert_eq!(vm["peer_pid"], std::process::id());
    assert_eq!(vm["ended"], serde_json::Value::Null, "still attached");
    assert!(vm["counters"]["faults"].as_u64().expect("faults") > 0);
}
