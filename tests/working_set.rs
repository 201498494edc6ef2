//! End-to-end tests of `uffd-server record`: runs recorded through a real userfaultfd and merged
//! into the working-set file as a union.

use e2e::fake_vmm::{touch, FakeVmm, PAGE};
use e2e::require_userfaultfd;
use e2e::server_process::ServerProcess;
use e2e::snapshot_file::SnapshotFile;
use prefetch::identity::SnapshotIdentity;
use prefetch::working_set::WorkingSet;
use std::path::{Path, PathBuf};

const MIB: usize = 1 << 20;

/// Attaches a VM, touches `pages` (file page indexes inside the first region) in order from one
/// thread, checks their content and detaches.
fn run_vm(server: &ServerProcess, snap: &SnapshotFile, pages: &[usize]) -> FakeVmm {
    let vmm = FakeVmm::attach(&server.socket("fn"), snap.bytes.len()).expect("attach");
    let region = vmm.memory.regions[0];
    for &p in pages {
        touch(region.addr + p * PAGE, p % 2 == 1);
    }
    let bytes = vmm.memory.region_bytes(0);
    for &p in pages {
        assert_eq!(&bytes[p * PAGE..(p + 1) * PAGE], &snap.bytes[p * PAGE..(p + 1) * PAGE]);
    }
    vmm
}

/// A 4 MiB snapshot and `uffd-server record` serving it with `--fault-around 1` (one fault per
/// touched page), recording into `fn.ws`. `prepare` may put a file there first.
struct Recording {
    dir: tempfile::TempDir,
    snap: SnapshotFile,
    ws: PathBuf,
    server: ServerProcess,
}

fn record(seed: u64, extra: &[&str], prepare: impl FnOnce(&Path)) -> Recording {
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "fn.mem", 4 * MIB, 0.3, seed);
    let ws = dir.path().join("fn.ws");
    prepare(&ws);
    let mut args = vec!["--fault-around", "1", "--working-set", ws.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let server = ServerProcess::start_command("record", &[("fn", &snap.path)], &args);
    Recording { dir, snap, ws, server }
}

fn load(path: &Path, snap: &SnapshotFile) -> WorkingSet {
    prefetch::format::load(path, &SnapshotIdentity::of(&snap.bytes)).expect("working-set file")
}

#[test]
fn runs_are_merged_as_a_union_with_first_touch_order_and_statistics() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "fn.mem", 4 * MIB, 0.3, 21);
    let ws = dir.path().join("fn.ws");
    let ws_arg = ws.to_str().expect("utf-8 path");
    let server = ServerProcess::start_command(
        "record",
        &[("fn", &snap.path)],
        &["--fault-around", "1", "--working-set", ws_arg],
    );

    drop(run_vm(&server, &snap, &[10, 3, 7, 200, 5]));
    server.wait_for_log("run merged into the working set", 1);
    drop(run_vm(&server, &snap, &[7, 300, 11]));
    server.wait_for_log("run merged into the working set", 2);

    let set = load(&ws, &snap);
    assert_eq!(set.runs, 2);
    assert_eq!(
        set.first_run,
        vec![10, 3, 7, 200, 5],
        "the first run, in first-touch order"
    );
    assert_eq!(
        set.pages.keys().copied().collect::<Vec<_>>(),
        vec![3, 5, 7, 10, 11, 200, 300]
    );
    let seven = set.pages[&7];
    assert_eq!(
        (seven.runs, seven.rank_sum, seven.min_rank, seven.last_run, seven.writes),
        (2, 2, 0, 2, 2)
    );
    assert_eq!(set.pages[&10].last_run, 1);
    let order: Vec<u64> = set.select(0.0).into_iter().map(|(p, _)| p).collect();
    // Mean ranks: 10→0; 3, 7 ((2+0)/2), 300 → 1 (ties by page); 11→2; 200→3; 5→4.
    assert_eq!(
        order,
        vec![10, 3, 7, 300, 11, 200, 5],
        "ordered by mean first-touch rank"
    );
    assert_eq!(set.select(1.0).into_iter().map(|(p, _)| p).collect::<Vec<_>>(), vec![7]);
}

#[test]
fn two_vms_ending_at_once_both_land_and_the_window_bounds_a_run() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "fn.mem", 4 * MIB, 0.3, 22);
    let ws = dir.path().join("fn.ws");
    let args = [
        "--fault-around",
        "1",
        "--working-set",
        ws.to_str().expect("utf-8"),
        "--record-max-faults",
        "3",
    ];
    let server = ServerProcess::start_command("record", &[("fn", &snap.path)], &args);

    let a = run_vm(&server, &snap, &[1, 2, 3, 4, 5]);
    let b = run_vm(&server, &snap, &[100, 101, 102, 103]);
    std::thread::scope(|scope| {
        scope.spawn(move || drop(a));
        scope.spawn(move || drop(b));
    });
    server.wait_for_log("run merged into the working set", 2);
    let set = load(&ws, &snap);
    assert_eq!(set.runs, 2, "neither run was lost");
    assert_eq!(
        set.pages.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 100, 101, 102],
        "3 faults per run"
    );
}

#[test]
fn a_damaged_working_set_file_is_kept_aside_and_the_vm_is_served() {
    require_userfaultfd();
    let Recording { dir, snap, ws, server } = record(23, &[], |ws| {
        std::fs::write(ws, b"UFFDWSET but nothing after the magic").expect("damage")
    });
    let vmm = FakeVmm::attach(&server.socket("fn"), snap.bytes.len()).expect("attach");
    vmm.touch_all(2, false);
    vmm.assert_matches(&snap.bytes);
    drop(vmm);
    server.wait_for_log("previous working-set file unusable", 1);
    server.wait_for_log("run merged into the working set", 1);
    assert!(dir.path().join("fn.ws.corrupt").exists());
    assert_eq!(load(&ws, &snap).runs, 1);
}
