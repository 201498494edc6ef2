//! A panic in the server never freezes a guest unseen (faults injected with the `fail` crate,
//! through the test build's FAILPOINTS): one in the prefetch or learning stage leaves the VM
//! served on demand; one in the demand path ends that VM with a logged error while the
//! server's other VMs go on.

use e2e::fake_vmm::{touch_pages, FakeVmm};
use e2e::require_userfaultfd;
use e2e::server_process::ServerProcess;
use e2e::snapshot_file::{write_working_set, SnapshotFile};

const MIB: usize = 1 << 20;

#[test]
fn a_panic_in_prefetch_or_learning_leaves_the_vm_served_on_demand() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "fn.mem", 16 * MIB, 0.3, 51);
    let ws = dir.path().join("fn.ws");
    // Every other page of the first half: a plan of many batches; the second half is learned.
    write_working_set(&ws, &snap, &[(0..snap.pages() as u64 / 2).step_by(2).collect()]);
    let args = ["--working-set", ws.to_str().expect("utf-8"), "--prefetch", "union", "--fault-around", "1"];
    let failpoints = "prefetch-step=3*off->panic;learner-note=2*off->panic";
    let server = ServerProcess::start_with_env("serve", &[("fn", &snap.path)], &args, &[("FAILPOINTS", failpoints)]);
    for vm in 1..=2 {
        let vmm = FakeVmm::attach(&server.socket("fn"), snap.bytes.len()).expect("attach");
        // An idle VM's loop prefetches at once: the failpoint fires before the guest runs.
        server.wait_for_log("the prefetch stage panicked", vm);
        vmm.touch_all(3, false);
        vmm.assert_matches(&snap.bytes);
        drop(vmm);
        server.wait_for_log("VM ended", vm);
    }
    let log = server.log();
    assert_eq!(log.matches("the prefetch stage panicked").count(), 2, "{log}");
    assert_eq!(log.matches("the learning stage panicked").count(), 2, "{log}");
    assert!(!log.contains("new pages learned"), "a dropped learner teaches nothing:\n{log}");
    for vm in server.stats().vms {
        assert_eq!(vm.ended.as_deref(), Some("VMM closed its socket"));
        assert_eq!(vm.counters.stage_panics, 2, "{:?}", vm.counters);
        assert_eq!(vm.counters.prefetch_done_us, 0, "the plan was dropped, not finished");
    }
}

#[test]
fn a_panic_in_the_demand_path_ends_that_vm_only() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "vm.mem", 16 * MIB, 0.3, 52);
    let failpoints = "demand-serve=20*off->1*panic->off";
    let server = ServerProcess::start_with_env(
        "serve",
        &[("vm", &snap.path)],
        &["--fault-around", "1"],
        &[("FAILPOINTS", failpoints)],
    );
    let bystander = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
    let victim = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
    let pages: Vec<usize> = victim.memory.page_addrs().collect();
    let guest = std::thread::spawn(move || touch_pages(&pages, 1, false));
    server.wait_for_log("serving the VM panicked", 1);

    bystander.touch_all(2, false);
    bystander.assert_matches(&snap.bytes);

    // The victim's thread waits on a fault nobody will answer; the VMM closing its uffd (as a
    // VMM whose restore timed out does) releases it with zero pages. Unmap only after that.
    let FakeVmm { attachment, memory } = victim;
    drop(attachment);
    guest.join().expect("the guest thread ends once the uffd is closed");
    drop(memory);

    let stats = server.stats();
    let ended = |id: u64| stats.vms.iter().find(|v| v.id == id).expect("vm").clone_end();
    assert!(ended(2).is_some_and(|why| why.starts_with("serving the VM panicked")), "{:?}", ended(2));
    assert_eq!(ended(1), None, "the bystander is still attached");
    let victim_counters = &stats.vms.iter().find(|v| v.id == 2).expect("vm 2").counters;
    assert_eq!((victim_counters.faults, victim_counters.stage_panics), (20, 1));
    assert!(server.log().contains("ERROR"), "the end is logged as an error:\n{}", server.log());
}

trait EndOf {
    fn clone_end(&self) -> Option<String>;
}

impl EndOf for uffd_server::registry::VmReport {
    fn clone_end(&self) -> Option<String> {
        self.ended.clone()
    }
}
