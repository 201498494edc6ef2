//! End-to-end tests of `uffd-server record`: runs recorded through a real userfaultfd and merged
//! into the working-set file as a union.

use e2e::fake_vmm::{touch, FakeVmm, HUGE, PAGE};
use e2e::server_process::{workspace_binary, write_loading_set, ServerProcess};
use e2e::snapshot_file::{write_working_set, SnapshotFile};
use e2e::{ensure_huge_pages, require_userfaultfd};
use prefetch::identity::SnapshotIdentity;
use prefetch::loading_set::LoadingSet;
use prefetch::plan::{Batch, BatchKind, Plan};
use prefetch::working_set::WorkingSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uffd_server::source::snapshot::FileStamp;
use vmm_shim::usize_of;

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

/// A 4 MiB snapshot and `uffd-server record` serving it, recording into `fn.ws`. `prepare` may
/// put a file there first. No `--fault-around` is given: `record` serves single pages anyway,
/// which the tests rely on (their pages share 64 KiB clusters).
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
    let mut args = vec!["--working-set", ws.to_str().expect("utf-8 path")];
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
    // Pages 3, 5, 7 and 10 share a 64 KiB cluster: `record` must see each of them.
    let Recording { snap, ws, server, dir: _dir } = record(21, &[], |_| {});

    drop(run_vm(&server, &snap, &[10, 3, 7, 200, 5]));
    server.wait_for_log("run merged into the working set", 1);
    drop(run_vm(&server, &snap, &[7, 300, 11]));
    server.wait_for_log("run merged into the working set", 2);

    let set = load(&ws, &snap);
    assert_eq!(set.runs, 2);
    assert_eq!(set.first_run, vec![10, 3, 7, 200, 5], "the first run, in first-touch order");
    assert_eq!(set.pages.keys().copied().collect::<Vec<_>>(), vec![3, 5, 7, 10, 11, 200, 300]);
    let seven = set.pages[&7];
    assert_eq!((seven.runs, seven.rank_sum, seven.min_rank, seven.last_run, seven.writes), (2, 2, 0, 2, 2));
    assert_eq!(set.pages[&10].last_run, 1);
    let order: Vec<u64> = set.select(0.0).into_iter().map(|(p, _)| p).collect();
    // Mean ranks: 10→0; 3, 7 ((2+0)/2), 300 → 1 (ties by page); 11→2; 200→3; 5→4.
    assert_eq!(order, vec![10, 3, 7, 300, 11, 200, 5], "ordered by mean first-touch rank");
    assert_eq!(set.select(1.0).into_iter().map(|(p, _)| p).collect::<Vec<_>>(), vec![7]);
}

#[test]
fn two_vms_ending_at_once_both_land_and_the_window_bounds_a_run() {
    require_userfaultfd();
    let Recording { snap, ws, server, dir: _dir } = record(22, &["--record-max-faults", "3"], |_| {});

    let a = run_vm(&server, &snap, &[1, 2, 3, 4, 5]);
    let b = run_vm(&server, &snap, &[100, 101, 102, 103]);
    std::thread::scope(|scope| {
        scope.spawn(move || drop(a));
        scope.spawn(move || drop(b));
    });
    server.wait_for_log("run merged into the working set", 2);
    let set = load(&ws, &snap);
    assert_eq!(set.runs, 2, "neither run was lost");
    assert_eq!(set.pages.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 100, 101, 102], "3 faults per run");
}

#[test]
fn a_damaged_working_set_file_is_kept_aside_and_the_vm_is_served() {
    require_userfaultfd();
    let Recording { dir, snap, ws, server } =
        record(23, &[], |ws| std::fs::write(ws, b"UFFDWSET but nothing after the magic").expect("damage"));
    let vmm = FakeVmm::attach(&server.socket("fn"), snap.bytes.len()).expect("attach");
    vmm.touch_all(2, false);
    vmm.assert_matches(&snap.bytes);
    drop(vmm);
    server.wait_for_log("previous working-set file unusable", 1);
    server.wait_for_log("run merged into the working set", 1);
    assert!(dir.path().join("fn.ws.corrupt").exists());
    assert_eq!(load(&ws, &snap).runs, 1);
}

fn serve_with(snap: &SnapshotFile, ws: &Path, extra: &[&str]) -> ServerProcess {
    let mut args = vec!["--working-set", ws.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    ServerProcess::start(&[("fn", &snap.path)], &args)
}

#[test]
fn every_policy_serves_every_byte_while_the_guest_touches_from_several_threads() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "fn.mem", 32 * MIB, 0.3, 31);
    let pages = snap.pages() as u64;
    let ws = dir.path().join("fn.ws");
    // First run: every 3rd page of the first half; second run shifts to the second half.
    let first: Vec<u64> = (0..pages / 2).step_by(3).collect();
    let second: Vec<u64> = (pages / 2..pages).step_by(3).collect();
    write_working_set(&ws, &snap, &[first.clone(), second.clone()]);

    for policy in ["none", "eager", "reap", "union"] {
        let server = serve_with(&snap, &ws, &["--prefetch", policy]);
        let vmm = FakeVmm::attach(&server.socket("fn"), snap.bytes.len()).expect("attach");
        vmm.touch_all(4, true);
        vmm.assert_matches(&snap.bytes);
        drop(vmm);
        server.wait_for_log("VM ended", 1);
        let c = server.stats().vms[0].counters.clone();
        let placed = c.prefetched_pages + c.prefetch_present_pages;
        match policy {
            "none" => assert_eq!(c.prefetch_planned_pages, 0),
            "eager" => {
                assert_eq!((c.prefetch_planned_pages, c.prefetched_pages), (pages, pages), "all before any fault")
            }
            "reap" => {
                assert!(c.prefetch_planned_pages >= first.len() as u64 && c.prefetch_planned_pages < pages / 2 + 8);
                assert_eq!(c.prefetched_pages, c.prefetch_planned_pages, "installed before any fault");
            }
            "union" => {
                assert!(c.prefetch_planned_pages >= (first.len() + second.len()) as u64);
                assert!(placed <= c.prefetch_planned_pages && c.prefetched_pages > 0);
            }
            _ => unreachable!(),
        }
        eprintln!("{policy}: {c:?}");
    }
}

#[test]
fn unusable_working_set_files_are_ignored_with_the_reason_and_the_vm_is_served() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "fn.mem", 4 * MIB, 0.3, 32);
    let other = SnapshotFile::random(dir.path(), "other.mem", 4 * MIB, 0.3, 33);
    let ws = dir.path().join("fn.ws");
    write_working_set(&ws, &snap, &[(0..200).collect()]);
    let good = std::fs::read(&ws).expect("read");
    let other_ws = dir.path().join("other.ws");
    write_working_set(&other_ws, &other, &[(0..200).collect()]);

    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x04;
    let mut version = good.clone();
    version[8] = 9;
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("truncated", good[..good.len() - 10].to_vec(), "truncated"),
        ("flipped bit", flipped, "checksum mismatch"),
        ("wrong version", version, "version 9 is not supported"),
        ("other snapshot's file", std::fs::read(&other_ws).expect("read"), "belongs to another snapshot"),
    ];
    for (case, bytes, reason) in cases {
        std::fs::write(&ws, &bytes).expect("write case");
        let server = serve_with(&snap, &ws, &["--prefetch", "union"]);
        let vmm = FakeVmm::attach(&server.socket("fn"), snap.bytes.len()).expect("attach");
        vmm.touch_all(2, false);
        vmm.assert_matches(&snap.bytes);
        drop(vmm);
        server.wait_for_log("VM ended", 1);
        server.wait_for_log("working set not used, serving without its prefetch", 1);
        server.wait_for_log(reason, 1);
        assert_eq!(server.stats().vms[0].counters.prefetched_pages, 0, "{case}: nothing prefetched");
        eprintln!("ignored as expected: {case}");
    }
}

#[test]
fn a_demand_fault_outside_the_set_is_served_while_a_large_prefetch_is_running() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "fn.mem", 256 * MIB, 0.0, 34);
    let ws = dir.path().join("fn.ws");
    // The set: the whole first region (3/4 of the guest, 48k pages), in page order.
    let vmm_layout_first_region = (snap.pages() / 4 * 3) as u64;
    write_working_set(&ws, &snap, &[(0..vmm_layout_first_region).collect()]);
    // One page per prefetch batch: the plan takes ~50k ioctls, the demand fault one.
    let server =
        serve_with(&snap, &ws, &["--prefetch", "union", "--prefetch-batch-pages", "1", "--bridge-gap-pages", "0"]);
    let vmm = FakeVmm::attach(&server.socket("fn"), snap.bytes.len()).expect("attach");
    let outside = vmm.memory.regions[1];
    touch(outside.addr + 5 * PAGE, false); // not in the set
    let last_planned = vmm.memory.regions[0].addr + (usize_of(vmm_layout_first_region) - 1) * PAGE;
    touch(last_planned, false); // in the set, last in plan order: pulled forward
    let early = server.stats().vms[0].counters.clone();
    vmm.touch_all(2, false);
    vmm.assert_matches(&snap.bytes);
    drop(vmm);
    server.wait_for_log("VM ended", 1);
    let c = server.stats().vms[0].counters.clone();

    assert_eq!(early.faults_outside_plan, 1, "the demand fault outside the set was served…");
    assert!(early.faults_during_prefetch >= 1, "…while the prefetch was running: {early:?}");
    assert!(early.faults_unreached_plan >= 1, "the last planned page was faulted before its batch ran");
    assert!(c.prefetch_done_us > 0, "the prefetch finished afterwards");
    assert!(
        c.prefetch_first_batch_us > 0 && c.prefetch_first_batch_us <= c.prefetch_done_us,
        "its first batch was placed before it finished: {c:?}"
    );
    assert_eq!(c.prefetch_planned_pages, vmm_layout_first_region);
    assert_eq!(c.prefetched_pages + c.prefetch_present_pages, vmm_layout_first_region);
}

#[test]
fn serve_learns_pages_outside_the_set_into_the_file() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "fn.mem", 4 * MIB, 0.3, 35);
    let ws = dir.path().join("fn.ws");
    write_working_set(&ws, &snap, &[vec![1, 2, 3]]);
    let server = serve_with(&snap, &ws, &["--prefetch", "union", "--fault-around", "1"]);
    drop(run_vm(&server, &snap, &[2, 40, 41, 3, 500]));
    server.wait_for_log("new pages learned into the working set", 1);
    let set = load(&ws, &snap);
    assert_eq!(set.runs, 1, "a serve run is not counted as a recorded run");
    assert_eq!(set.pages.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 40, 41, 500]);
    assert_eq!(set.pages[&40].runs, 1);
    let ranks: Vec<u32> = [40, 41, 500].iter().map(|p| set.pages[p].min_rank).collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]), "learned in first-touch order: {ranks:?}");

    // The plan is cached per file version: the rewritten file is planned once more, then
    // reused by VMs that teach nothing new.
    assert_eq!(server.log().matches("working set loaded and planned").count(), 1);
    drop(run_vm(&server, &snap, &[1, 40]));
    drop(run_vm(&server, &snap, &[2, 500]));
    server.wait_for_log("VM ended", 3);
    assert_eq!(server.log().matches("working set loaded and planned").count(), 2);
    assert_eq!(server.log().matches("new pages learned").count(), 1);
}

#[test]
fn end_recording_closes_the_window_while_the_vm_runs_on() {
    require_userfaultfd();
    let Recording { snap, ws, server, dir: _dir } = record(24, &[], |_| {});
    let vmm = run_vm(&server, &snap, &[1, 2, 3]);
    let end = |vm: &str| {
        std::process::Command::new(workspace_binary("uffd-server"))
            .args(["end-recording", "--vm", vm, "--socket-dir"])
            .arg(&server.socket_dir)
            .output()
            .expect("run end-recording")
    };
    let ended = end(&server.stats().vms[0].id.to_string());
    assert!(ended.status.success(), "{}", String::from_utf8_lossy(&ended.stderr));
    let region = vmm.memory.regions[0];
    for p in [50, 60] {
        touch(region.addr + p * PAGE, false); // served, not recorded
    }
    assert_eq!(vmm.memory.region_bytes(0)[50 * PAGE], snap.bytes[50 * PAGE]);
    drop(vmm);
    server.wait_for_log("run merged into the working set", 1);
    assert_eq!(load(&ws, &snap).pages.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);

    let unknown = end("999");
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no VM with id `999`"));
}

#[test]
fn disk_storage_serves_every_byte_without_holding_the_snapshot() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "fn.mem", 16 * MIB, 0.3, 41);
    let server = ServerProcess::start(&[("fn", &snap.path)], &["--snapshot-storage", "disk"]);
    let vmm = FakeVmm::attach(&server.socket("fn"), snap.bytes.len()).expect("attach");
    vmm.touch_all(4, true);
    vmm.assert_matches(&snap.bytes);
    assert_eq!(server.stats().snapshot_resident_bytes, 0, "nothing held in RAM");
}

#[test]
fn a_loading_set_is_read_at_once_checked_and_bound_to_its_snapshot() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "fn.mem", 8 * MIB, 0.3, 42);
    let (ws, ls) = (dir.path().join("fn.ws"), dir.path().join("fn.ls"));
    write_working_set(&ws, &snap, &[(0..1500).step_by(2).collect(), (100..900).collect()]);
    let built = write_loading_set(&snap.path, &ws, &ls);
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let serve = |expect_log: &str| {
        let args = ["--snapshot-storage", "disk", "--loading-set", ls.to_str().expect("utf-8"), "--prefetch", "union"];
        let server = ServerProcess::start(&[("fn", &snap.path)], &args);
        let vmm = FakeVmm::attach(&server.socket("fn"), snap.bytes.len()).expect("attach");
        vmm.touch_all(3, false);
        vmm.assert_matches(&snap.bytes);
        drop(vmm);
        server.wait_for_log("VM ended", 1);
        server.wait_for_log(expect_log, 1);
        server.stats().vms[0].counters.clone()
    };

    let c = serve("loading set loaded");
    assert!(c.loading_set_pages > 0 && c.loading_set_pages <= c.prefetched_pages, "{c:?}");

    // A flipped data byte costs that batch (served from the snapshot), never a wrong byte.
    let mut bytes = std::fs::read(&ls).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80;
    std::fs::write(&ls, &bytes).expect("damage");
    let damaged = serve("failed its checksum");
    assert!(damaged.loading_set_pages < c.loading_set_pages);

    // A memory file rewritten since (its mtime moved) no longer matches the loading set.
    let file = std::fs::File::options().write(true).open(&snap.path).expect("open");
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).expect("set mtime");
    let stale = serve("memory file changed since it was written");
    assert_eq!(stale.loading_set_pages, 0);
}

/// Waits until the first VM's whole plan is placed (before the guest touches anything, so the
/// prefetch path, not demand faults, places it).
fn wait_for_prefetch_done(server: &ServerProcess) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.stats().vms.first().is_none_or(|vm| vm.counters.prefetch_done_us == 0) {
        assert!(Instant::now() < deadline, "the prefetch never finished:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn prefetch_places_all_zero_huge_pages_with_batches_straddling_their_boundaries() {
    require_userfaultfd();
    if !ensure_huge_pages(8) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut bytes = SnapshotFile::random(dir.path(), "tmp", 16 * MIB, 0.3, 43).bytes;
    bytes[2 * MIB..6 * MIB].fill(0); // huge pages 1 and 2 of the first region: all zeros
    let snap = SnapshotFile::from_bytes(dir.path(), "fn.mem", bytes);
    let ws = dir.path().join("fn.ws");
    // Pages 1000..1100 straddle the 4 MiB boundary (two zero huge pages), 500..530 the 2 MiB one
    // (data, then zeros), 2000..2100 lie in the second region.
    let pages: Vec<u64> = (1000..1100).chain(500..530).chain(2000..2100).collect();
    write_working_set(&ws, &snap, &[pages]);
    let server = serve_with(&snap, &ws, &["--prefetch", "union", "--prefetch-batch-pages", "512"]);
    let vmm = FakeVmm::attach_layout(&server.socket("fn"), &[8 * MIB, 8 * MIB], HUGE, true).expect("attach hugetlbfs");
    wait_for_prefetch_done(&server);
    vmm.touch_all(2, false);
    vmm.assert_matches(&snap.bytes);
    drop(vmm);
    server.wait_for_log("VM ended", 1);
    let c = server.stats().vms[0].counters.clone();
    // Widened to whole huge pages (of 512 pages): 500..512 is data in huge page 0, 512..530
    // zeros in huge page 1; 1000..1100 spans the zero huge pages 1 (placed already) and 2;
    // 2000..2100 ends region 0 (huge page 3) and starts region 1 (its huge page 0).
    let placed = (c.prefetched_pages, c.prefetch_present_pages, c.stage_panics);
    assert_eq!(placed, (5 * 512, 512, 0), "{c:?}");
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

#[test]
fn an_all_zero_loading_set_batch_longer_than_2mib_is_placed_in_pieces() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut bytes = SnapshotFile::random(dir.path(), "tmp", 16 * MIB, 0.3, 44).bytes;
    bytes[100 * PAGE..1124 * PAGE].fill(0);
    let snap = SnapshotFile::from_bytes(dir.path(), "fn.mem", bytes);
    // A zero batch of 1024 pages (4 MiB), as a loading-set file may hold, then a copy batch.
    let batches = vec![
        Batch { first_page: 100, pages: 1024, kind: BatchKind::Zero, priority: 0.0 },
        Batch { first_page: 2000, pages: 64, kind: BatchKind::Copy, priority: 1.0 },
    ];
    let plan = Plan::background(batches, None);
    let stamp = FileStamp::at(&snap.path).expect("stat the memory file").digest();
    let ls = dir.path().join("fn.ls");
    let read = |offset: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&snap.bytes[usize_of(offset)..usize_of(offset) + buf.len()]);
        Ok(())
    };
    LoadingSet::write(&ls, SnapshotIdentity::of(&snap.bytes), stamp, &plan, read).expect("write loading set");
    let args = ["--loading-set", ls.to_str().expect("utf-8"), "--prefetch", "union"];
    let server = ServerProcess::start(&[("fn", &snap.path)], &args);
    let vmm = FakeVmm::attach(&server.socket("fn"), snap.bytes.len()).expect("attach");
    wait_for_prefetch_done(&server);
    vmm.touch_all(3, false);
    vmm.assert_matches(&snap.bytes);
    drop(vmm);
    server.wait_for_log("VM ended", 1);
    let c = server.stats().vms[0].counters.clone();
    assert_eq!((c.prefetched_pages, c.loading_set_pages, c.stage_panics), (1024 + 64, 64, 0), "{c:?}");
}
