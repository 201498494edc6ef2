//! A real KVM guest whose memory is served by `uffd-server` through a real userfaultfd: the
//! vCPU's first access to every page — page tables, code and data alike, faulted by KVM in
//! kernel mode — goes through the server.

use e2e::fake_vmm::PAGE;
use e2e::server_process::ServerProcess;
use e2e::snapshot_file::{Rng, SnapshotFile};
use e2e::{require_kvm, require_userfaultfd};
use vmm_shim::guest::{boot_structures, CODE, DATA, MAILBOX, STACK_BOTTOM};
use vmm_shim::memory::GuestMemory;
use vmm_shim::uffd_backend::UffdAttachment;
use vmm_shim::usize_of;
use vmm_shim::vm::Vm;
use vmm_shim::workload::{fold, invoke_program};

const MIB: usize = 1 << 20;

/// A snapshot image: random data (30% zero pages) from 1 MiB on, and below it the boot
/// structures, the checksum program and a list of `pages` random data-page addresses.
fn snapshot_image(len: usize, pages: usize, seed: u64, dir: &std::path::Path) -> (SnapshotFile, Vec<u64>) {
    let mut bytes = SnapshotFile::random(dir, "data", len, 0.3, seed).bytes;
    bytes[..usize_of(DATA)].fill(0);
    let mut put = |at: u64, data: &[u8]| bytes[usize_of(at)..usize_of(at) + data.len()].copy_from_slice(data);
    for (at, data) in boot_structures(len as u64) {
        put(at, &data);
    }
    put(CODE, &invoke_program(CODE).expect("assemble"));
    let mut rng = Rng::new(seed ^ 0xabc);
    let data_pages = (len - usize_of(DATA)) / PAGE;
    let list: Vec<u64> = (0..pages).map(|_| DATA + (rng.next_u64() % data_pages as u64) * PAGE as u64).collect();
    assert!(MAILBOX + 8 * pages as u64 <= STACK_BOTTOM);
    put(MAILBOX, &list.iter().flat_map(|a| a.to_le_bytes()).collect::<Vec<u8>>());
    (SnapshotFile::from_bytes(dir, "vm.mem", bytes), list)
}

/// Runs the invocation program to DONE and returns the checksum it reported.
fn run_checksum(vm: &mut Vm, pages: usize) -> u64 {
    vmm_shim::restore::run_invocation(vm.vcpu(0), 0, CODE, pages as u64, 0).expect("the guest reaches DONE").checksum
}

#[test]
fn a_kvm_guest_computes_the_right_checksum_over_memory_served_by_uffd_server() {
    require_kvm();
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let (len, pages) = (64 * MIB, 1500);
    let (snap, list) = snapshot_image(len, pages, 61, dir.path());
    let expected = fold(
        list.iter().map(|&a| u64::from_le_bytes(snap.bytes[usize_of(a)..usize_of(a) + 8].try_into().expect("8 bytes"))),
        0,
    );

    for fault_around in ["1", "16"] {
        let server = ServerProcess::start(&[("vm", &snap.path)], &["--fault-around", fault_around]);
        let memory = GuestMemory::map(&[len], 0, false).expect("map");
        let attachment = UffdAttachment::attach(&server.socket("vm"), &memory).expect("attach");
        let mut vm = Vm::new(&memory).expect("vm");
        assert_eq!(run_checksum(&mut vm, pages), expected, "fault-around {fault_around}");
        drop(vm);
        drop(attachment);
        server.wait_for_log("VM ended", 1);
        let c = &server.stats().vms[0].counters;
        assert!(c.faults > 0 && c.copied_pages > 0, "the vCPU's pages came from the server: {c:?}");
        assert_eq!(c.already_present, 0);
    }
}

/// Runs a binary of the workspace, failing the test with its stderr if it fails.
fn run(binary: &str, args: &[&str]) -> String {
    e2e::server_process::run_binary(binary, args).unwrap_or_else(|e| panic!("{e}"))
}

/// `vmm-shim snapshot` with `args` into a new temp dir; needs KVM and userfaultfd.
fn snapshot(args: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
    require_kvm();
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap_dir = dir.path().join("snapshot");
    run("vmm-shim", &[&["snapshot", "--out", snap_dir.to_str().expect("utf-8")][..], args].concat());
    (dir, snap_dir)
}

/// `vmm-shim restore --json` with `args`; returns the checksums it verified.
fn restore(snapshot: &std::path::Path, args: &[&str]) -> Vec<u64> {
    let report = e2e::server_process::vmm_shim_restore(snapshot, args).unwrap_or_else(|e| panic!("{e}"));
    report["invocations"]
        .as_array()
        .expect("invocations")
        .iter()
        .map(|i| i["checksum"].as_u64().expect("checksum"))
        .collect()
}

/// Records the run of `input` from the snapshot in `snapshot` into the working-set file `ws`.
fn record(snapshot: &std::path::Path, ws: &std::path::Path, input: u64) {
    let ws = ws.to_str().expect("utf-8");
    let recorder = ServerProcess::start_command("record", &[("vm", &snapshot.join("mem"))], &["--working-set", ws]);
    let socket = recorder.socket("vm");
    let input = input.to_string();
    restore(snapshot, &["--mem-backend", "uffd", "--uffd-socket", socket.to_str().expect("utf-8"), "--input", &input]);
    recorder.wait_for_log("run merged into the working set", 1);
}

#[test]
fn snapshot_then_restore_through_every_backend_and_policy_verifies_every_invocation() {
    let (dir, snap_dir) = snapshot(&["--workload", "hello", "--seed", "5"]);
    let mem = snap_dir.join("mem");

    // The guest's runtime init wrote the xorshift stream into its heap: check it from the file.
    let bytes = std::fs::read(&mem).expect("memory file");
    let mut x = 5u64 | 1;
    for qword in bytes[usize_of(DATA)..usize_of(DATA) + (4 << 20)].chunks(8).take(1000) {
        x = vmm_shim::workload::xorshift(x);
        assert_eq!(qword, x.to_le_bytes(), "runtime init content");
    }

    let file = restore(&snap_dir, &["--mem-backend", "file", "--invoke", "3"]);
    assert_eq!(file.len(), 3);
    assert_eq!(
        restore(&snap_dir, &["--mem-backend", "copy", "--invoke", "3"]),
        file,
        "the same guest, the same checksums"
    );

    let server = ServerProcess::start(&[("vm", &mem)], &[]);
    let socket = server.socket("vm");
    let uffd_args = ["--mem-backend", "uffd", "--uffd-socket", socket.to_str().expect("utf-8"), "--invoke", "3"];
    assert_eq!(restore(&snap_dir, &uffd_args), file);
    // Two vCPUs at once: concurrent KVM faults on one uffd.
    assert_eq!(restore(&snap_dir, &[&uffd_args[..], &["--vcpus", "2"][..]].concat()), file);
    // A balloon drops 2 MiB of heap after each invocation: through the server it reads as
    // zeros (REMOVE), as anonymous memory does; the restore checks every checksum against that.
    let balloon = ["--balloon-range", "2:2"];
    let ballooned = restore(&snap_dir, &[&uffd_args[..], &balloon[..]].concat());
    assert_eq!(
        ballooned,
        restore(&snap_dir, &[&["--mem-backend", "copy", "--invoke", "3"][..], &balloon[..]].concat())
    );
    assert_eq!(ballooned[0], file[0], "nothing is ballooned before the first invocation");
    assert_ne!(ballooned[1..], file[1..], "later invocations read the zeros");
    drop(server);

    // record, then serve --working-set with every prefetch policy.
    let ws = dir.path().join("hello.ws");
    let ws_arg = ws.to_str().expect("utf-8");
    record(&snap_dir, &ws, 7);
    for policy in ["none", "eager", "reap", "union"] {
        let server = ServerProcess::start(&[("vm", &mem)], &["--working-set", ws_arg, "--prefetch", policy]);
        let socket = server.socket("vm");
        let args = ["--mem-backend", "uffd", "--uffd-socket", socket.to_str().expect("utf-8"), "--invoke", "3"];
        assert_eq!(restore(&snap_dir, &args), file, "policy {policy}");
        assert_eq!(restore(&snap_dir, &[&args[..], &["--vcpus", "2"][..]].concat()), file, "policy {policy}, 2 vCPUs");
        server.wait_for_log("VM ended", 2);
        let c = &server.stats().vms[0].counters;
        if policy != "none" {
            assert!(c.prefetched_pages > 0, "{policy}: {c:?}");
        }
    }
}

#[test]
fn killing_vmm_shim_mid_invocation_leaves_the_server_serving_other_restores() {
    let (_dir, snap_dir) = snapshot(&["--workload", "python-like"]);
    let server = ServerProcess::start(&[("vm", &snap_dir.join("mem"))], &["--fault-around", "1"]);
    let socket = server.socket("vm");
    let socket = socket.to_str().expect("utf-8");
    let snapshot = snap_dir.to_str().expect("utf-8");
    let mut victim = std::process::Command::new(e2e::server_process::workspace_binary("vmm-shim"))
        .args([
            "restore",
            "--snapshot",
            snapshot,
            "--mem-backend",
            "uffd",
            "--uffd-socket",
            socket,
            "--invoke",
            "100000",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn vmm-shim");
    server.wait_for_log("VM attached", 1);
    std::thread::sleep(std::time::Duration::from_millis(100)); // mid-invocation: faults in flight
    victim.kill().expect("SIGKILL");
    victim.wait().expect("reap");
    // Ended by the socket closing, or first by a COPY finding the address space gone (ESRCH).
    server.wait_for_log("VM ended (VMM", 1);

    let checksums = restore(&snap_dir, &["--mem-backend", "uffd", "--uffd-socket", socket, "--invoke", "3"]);
    assert_eq!(checksums, restore(&snap_dir, &["--mem-backend", "file", "--invoke", "3"]));
    let victim_faults = server.stats().vms[0].counters.faults;
    assert!(victim_faults > 0, "the victim was faulting when killed");
}

#[test]
fn a_3_5_gib_sparse_guest_restores_across_the_mmio_gap() {
    let (_dir, snap_dir) = snapshot(&["--workload", "hello", "--mem-mib", "3584"]);
    let mem = snap_dir.join("mem");
    let meta = std::fs::metadata(&mem).expect("memory file");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.len(), 3584 << 20, "regions back to back: 3 GiB below the gap + 512 MiB above");
    assert!(meta.blocks() * 512 < 64 << 20, "sparse: zero pages are holes ({} bytes used)", meta.blocks() * 512);

    let file = restore(&snap_dir, &["--mem-backend", "file", "--invoke", "2"]);
    let server = ServerProcess::start(&[("vm", &mem)], &[]);
    let socket = server.socket("vm");
    let args = ["--mem-backend", "uffd", "--uffd-socket", socket.to_str().expect("utf-8"), "--invoke", "2"];
    assert_eq!(restore(&snap_dir, &args), file);
    server.wait_for_log("regions=2 guest_bytes=3758096384", 1);
}

#[test]
fn a_computing_guest_folds_its_compute_into_the_checksum_the_host_verifies() {
    let (dir, plain) = snapshot(&["--workload", "hello", "--seed", "9"]);
    let computing = dir.path().join("computing");
    run(
        "vmm-shim",
        &[
            "snapshot",
            "--workload",
            "hello",
            "--seed",
            "9",
            "--compute-rounds",
            "50",
            "--out",
            computing.to_str().expect("utf-8"),
        ],
    );
    let server = ServerProcess::start(&[("plain", &plain.join("mem")), ("computing", &computing.join("mem"))], &[]);
    let args = |name: &str| {
        [
            "--mem-backend".into(),
            "uffd".into(),
            "--uffd-socket".into(),
            server.socket(name).to_str().expect("utf-8").to_string(),
            "--invoke".into(),
            "2".into(),
        ]
    };
    // vmm-shim fails the restore if the guest's checksum is not the host's fold with 50 rounds.
    let with_compute = restore(&computing, &args("computing").each_ref().map(String::as_str));
    let without = restore(&plain, &args("plain").each_ref().map(String::as_str));
    assert_eq!(with_compute.len(), 2);
    assert_ne!(with_compute, without, "the same memory and inputs: only the compute differs");
    assert_eq!(with_compute, restore(&computing, &["--mem-backend", "copy", "--invoke", "2"]));
}

#[test]
fn placed_but_untouched_heap_pages_are_counted_against_the_pages_touched() {
    let (_dir, snap) = snapshot(&["--workload", "hello"]);
    let mem = snap.join("mem");
    let heap = |extra: &[&str]| {
        let server = ServerProcess::start(&[("hello", &mem)], extra);
        let socket = server.socket("hello");
        let report = e2e::server_process::vmm_shim_restore(
            &snap,
            &["--mem-backend", "uffd", "--uffd-socket", socket.to_str().expect("utf-8")],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let field = |name: &str| report["heap"][name].as_u64().unwrap_or_else(|| panic!("heap.{name} in {report}"));
        (field("resident_pages"), field("touched_pages"), field("untouched_resident_pages"))
    };
    // One page per fault, nothing prefetched: only what the guest touched is there.
    let (resident, touched, untouched) = heap(&["--fault-around", "1"]);
    assert_eq!((resident, untouched), (touched, 0));
    // Everything placed before the guest runs: every other heap page is untouched.
    let (resident, touched, untouched) = heap(&["--prefetch", "eager"]);
    assert_eq!(untouched, resident - touched);
    assert!(untouched > 0 && resident > touched);
}

#[test]
fn a_union_server_places_the_plan_while_the_vmm_loads_so_the_guest_takes_no_fault() {
    let (dir, snap) = snapshot(&["--workload", "python-like"]);
    let mem = snap.join("mem");
    let ws = dir.path().join("python.ws");
    let ws_arg = ws.to_str().expect("utf-8");
    record(&snap, &ws, 7);

    let server = ServerProcess::start(&[("vm", &mem)], &["--working-set", ws_arg, "--prefetch", "union"]);
    let socket = server.socket("vm");
    // The same input as recorded: every page it touches is in the plan. 300 ms of VMM load
    // (Firecracker's is 8–13 ms) against ~10 ms of placing: a margin for a loaded machine.
    let args = ["--mem-backend", "uffd", "--uffd-socket", socket.to_str().expect("utf-8"), "--input", "7"];
    let report = e2e::server_process::vmm_shim_restore(&snap, &[&args[..], &["--vmm-load-ms", "300"][..]].concat())
        .unwrap_or_else(|e| panic!("{e}"));
    let us = |name: &str| report[name].as_f64().unwrap_or_else(|| panic!("{name} in {report}"));
    assert!(us("vmm_load_us") >= 300_000.0, "the VMM spent its load time: {report}");
    assert!(us("first_instruction_us") >= us("vmm_load_us"), "the guest ran after it: {report}");
    server.wait_for_log("VM ended", 1);
    let c = &server.stats().vms[0].counters;
    assert!(c.prefetch_planned_pages > 0 && c.prefetched_pages == c.prefetch_planned_pages, "{c:?}");
    // Timed from the attach, which comes after the restore's start.
    assert!(c.prefetch_done_us as f64 <= us("first_instruction_us"), "the plan was placed before the guest ran: {c:?}");
    assert_eq!(c.faults, 0, "the guest found every page it touched in place: {c:?}");
}
