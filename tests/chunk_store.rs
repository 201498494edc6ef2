//! The chunk store end to end: `uffd-server import` → `serve --store` → real KVM guests and
//! real userfaultfds, every byte checked against the memory file it was imported from.

use e2e::fake_vmm::FakeVmm;
use e2e::server_process::{import_to_store, run_binary, vmm_shim_restore, workspace_binary, ServerProcess};
use e2e::snapshot_file::{Rng, SnapshotFile};
use e2e::{require_kvm, require_userfaultfd};
use snapstore::store::Store;
use snapstore::ChunkId;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn run(binary: &str, args: &[&str]) -> String {
    run_binary(binary, args).unwrap_or_else(|e| panic!("{e}"))
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// `vmm-shim snapshot --out DIR/NAME ARGS`: the snapshot directory.
fn guest_snapshot(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let out = dir.join(name);
    run("vmm-shim", &[&["snapshot", "--out", utf8(&out)][..], args].concat());
    out
}

fn import(store: &Path, name: &str, memfile: &Path) -> String {
    import_to_store(store, name, memfile).unwrap_or_else(|e| panic!("{e}"))
}

/// A VM that touches every page of snapshot `name` and compares all of its memory.
fn assert_every_byte(server: &ServerProcess, name: &str, memfile: &Path) {
    let bytes = std::fs::read(memfile).expect("read memory file");
    let vm = FakeVmm::attach(&server.socket(name), bytes.len()).expect("attach");
    vm.touch_all(2, false);
    vm.assert_matches(&bytes);
}

#[test]
fn random_python_and_node_image_guests_are_served_from_the_store_byte_for_byte() {
    require_kvm();
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let presets: [(&str, &[&str]); 3] = [
        ("random", &["--workload", "python-like"]),
        ("python", &["--workload", "python-image", "--function", "2"]),
        ("node", &["--workload", "node-image", "--function", "1"]),
    ];
    let store = dir.path().join("store");
    let mut snapshots = Vec::new();
    for (name, args) in presets {
        let snapshot = guest_snapshot(dir.path(), name, args);
        import(&store, name, &snapshot.join("mem"));
        snapshots.push((name, snapshot));
    }
    let stats = snapstore::maintain::stats(&Store::open(&store).expect("store")).expect("stats");
    let compression = |name: &str| {
        let usage = &stats.snapshots[name];
        usage.unique as f64 / usage.stored as f64
    };
    assert!(compression("random") < 1.05, "xorshift noise does not compress: {:?}", stats.snapshots["random"]);
    for runtime in ["python", "node"] {
        assert!(compression(runtime) > 2.0, "{runtime} memory compresses: {:?}", stats.snapshots[runtime]);
    }
    run("uffd-server", &["store", "verify", "--store", utf8(&store)]);

    let server = ServerProcess::start_store(&store, &[]);
    for (name, snapshot) in &snapshots {
        let socket = server.socket(name);
        // vmm-shim checks each invocation's checksum against the memory file.
        let report =
            vmm_shim_restore(snapshot, &["--mem-backend", "uffd", "--uffd-socket", utf8(&socket), "--invoke", "2"])
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report["invocations"].as_array().map(Vec::len), Some(2), "{name}: {report}");
        assert_every_byte(&server, name, &snapshot.join("mem"));
    }
}

#[test]
fn two_snapshots_sharing_chunks_serve_eight_vms_each_holding_each_chunk_once() {
    require_kvm();
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let functions: Vec<(String, Vec<u8>)> = ["3", "4"]
        .iter()
        .map(|function| {
            let name = format!("fn{function}");
            let snapshot = guest_snapshot(dir.path(), &name, &["--workload", "python-image", "--function", function]);
            import(&store, &name, &snapshot.join("mem"));
            (name, std::fs::read(snapshot.join("mem")).expect("read"))
        })
        .collect();
    let stats = snapstore::maintain::stats(&Store::open(&store).expect("store")).expect("stats");
    let each: u64 = stats.snapshots.values().map(|usage| usage.unique).sum();
    assert!(stats.total.unique * 20 < each * 17, "functions of one runtime share chunks: {stats:?}");

    let server = ServerProcess::start_store(&store, &[]);
    std::thread::scope(|scope| {
        for vm in 0..16 {
            let (name, bytes) = &functions[vm % 2];
            let server = &server;
            scope.spawn(move || {
                let vmm = FakeVmm::attach(&server.socket(name), bytes.len()).expect("attach");
                vmm.touch_all(1, vm % 4 == 0);
                vmm.assert_matches(bytes);
            });
        }
    });
    let stats = server.stats();
    assert_eq!(stats.vms.len(), 16);
    let per_snapshot: u64 = stats.resident_by_snapshot.iter().map(|(_, bytes)| bytes).sum();
    assert!(
        stats.snapshot_resident_bytes * 20 < per_snapshot * 17,
        "shared chunks are held once: {} bytes held, {per_snapshot} if each snapshot had its own",
        stats.snapshot_resident_bytes
    );
}

/// A snapshot of `len` bytes of noise (30% zero pages) whose first `shared` bytes are `base`'s.
fn sibling(dir: &Path, name: &str, base: &[u8], shared: usize, seed: u64) -> SnapshotFile {
    let mut bytes = SnapshotFile::random(dir, name, base.len(), 0.3, seed).bytes;
    bytes[..shared].copy_from_slice(&base[..shared]);
    SnapshotFile::from_bytes(dir, name, bytes)
}

/// Chunk ids snapshot `name` names that `other` does not.
fn own_chunks(store: &Store, name: &str, other: &str) -> Vec<ChunkId> {
    let theirs = store.read_manifest(other).expect("manifest").chunks;
    let mut own: Vec<ChunkId> = store
        .read_manifest(name)
        .expect("manifest")
        .chunks
        .into_iter()
        .flatten()
        .filter(|id| !theirs.contains(&Some(*id)))
        .collect();
    own.dedup();
    own
}

fn flip_a_bit(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read chunk");
    let at = bytes.len() - 100;
    bytes[at] ^= 0x04;
    std::fs::write(path, bytes).expect("write chunk");
}

#[test]
fn a_corrupt_chunk_is_never_served_a_good_copy_is_and_other_vms_go_on() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let store_dir = dir.path().join("store");
    let a = SnapshotFile::random(dir.path(), "a.mem", 8 * MIB, 0.3, 91);
    let b = sibling(dir.path(), "b.mem", &a.bytes, 4 * MIB, 92);
    let c = SnapshotFile::random(dir.path(), "c.mem", 8 * MIB, 0.3, 93);
    for (name, snap) in [("a", &a), ("b", &b), ("c", &c)] {
        import(&store_dir, name, &snap.path);
    }
    let store = Store::open(&store_dir).expect("store");

    // c: one chunk flipped, one truncated, one missing. Detected by verify, never served.
    let bad = own_chunks(&store, "c", "a");
    flip_a_bit(&store.chunk_path(&bad[0]));
    let truncated = std::fs::read(store.chunk_path(&bad[1])).expect("read");
    std::fs::write(store.chunk_path(&bad[1]), &truncated[..truncated.len() / 2]).expect("truncate");
    std::fs::remove_file(store.chunk_path(&bad[2])).expect("remove");
    let verify = Command::new(workspace_binary("uffd-server"))
        .args(["store", "verify", "--store", utf8(&store_dir)])
        .output()
        .expect("run verify");
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(!verify.status.success());
    for id in &bad[..3] {
        assert!(complaints.contains(&id.hex()), "verify names chunk {id}:\n{complaints}");
    }

    let server = ServerProcess::start_store(&store_dir, &[]);
    server.wait_for_log("chunk not served", 3);
    // A VM of c touching every page meets a bad chunk: a memory error, never other bytes.
    let mut victim = Command::new(workspace_binary("fake-vmm"))
        .args([utf8(&server.socket("c")), &c.bytes.len().to_string(), "0", "--then-exit"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run fake-vmm");
    // Meanwhile a VM of a is served whole.
    assert_every_byte(&server, "a", &a.path);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = victim.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the VM of c waits on a fault:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
    server.wait_for_log("page poisoned", 1);

    // A chunk b shares with a, corrupted on disk after a loaded it: b, reloaded, gets a's good copy.
    let shared = store.read_manifest("b").expect("manifest").chunks[0].expect("data chunk");
    flip_a_bit(&store.chunk_path(&shared));
    let manifest = store.manifest_path("b").expect("path");
    let copy = manifest.with_extension("copy");
    std::fs::copy(&manifest, &copy).expect("copy manifest");
    std::fs::rename(&copy, &manifest).expect("replace manifest"); // a new inode: b loads again
    assert_every_byte(&server, "b", &b.path);
    server.wait_for_log("loading it again", 1);
}

#[test]
fn a_killed_import_leaves_a_consistent_store_and_the_next_import_completes() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let store_dir = dir.path().join("store");
    let kept = SnapshotFile::random(dir.path(), "kept.mem", 4 * MIB, 0.3, 94);
    import(&store_dir, "kept", &kept.path);
    let big = SnapshotFile::random(dir.path(), "big.mem", 256 * MIB, 0.3, 95);
    let store = Store::open(&store_dir).expect("store");
    let before = store.chunk_files().expect("list").0.len();
    let mut importing = Command::new(workspace_binary("uffd-server"))
        .args(["import", "--store", utf8(&store_dir), "--name", "big", utf8(&big.path)])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run import");
    // Killed once it has written some chunks, long before its 4096 chunks are done.
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.chunk_files().expect("list").0.len() < before + 20 {
        assert!(Instant::now() < deadline && importing.try_wait().expect("wait").is_none(), "import ended early");
        std::thread::sleep(Duration::from_millis(2));
    }
    importing.kill().expect("kill -9");
    importing.wait().expect("reap");
    assert_eq!(store.names().expect("names"), vec!["kept".to_string()], "no manifest of a killed import");
    run("uffd-server", &["store", "verify", "--store", utf8(&store_dir)]);
    let gc = run("uffd-server", &["store", "gc", "--store", utf8(&store_dir)]);
    assert!(!gc.starts_with("removed 0 "), "the orphans are collected: {gc}");
    assert_eq!(store.chunk_files().expect("list").0.len(), before, "only kept's chunks are left");

    import(&store_dir, "big", &big.path);
    run("uffd-server", &["store", "verify", "--store", utf8(&store_dir)]);
    let server = ServerProcess::start_store(&store_dir, &[]);
    assert_every_byte(&server, "big", &big.path);
    assert_every_byte(&server, "kept", &kept.path);
}

#[test]
fn gc_never_removes_a_chunk_a_manifest_names_even_while_a_vm_is_served() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let store_dir = dir.path().join("store");
    let a = SnapshotFile::random(dir.path(), "a.mem", 8 * MIB, 0.3, 96);
    let b = sibling(dir.path(), "b.mem", &a.bytes, 4 * MIB, 97);
    import(&store_dir, "a", &a.path);
    import(&store_dir, "b", &b.path);
    let store = Store::open(&store_dir).expect("store");
    let only_b = own_chunks(&store, "b", "a");
    assert!(!only_b.is_empty());

    let server = ServerProcess::start_store(&store_dir, &[]);
    let vm = FakeVmm::attach(&server.socket("a"), a.bytes.len()).expect("attach");
    let pages: Vec<usize> = vm.memory.page_addrs().collect();
    let mut rng = Rng::new(98);
    let half: Vec<usize> = pages.iter().copied().filter(|_| rng.next_u64().is_multiple_of(2)).collect();
    e2e::fake_vmm::touch_pages(&half, 1, false);

    store.remove_manifest("b").expect("remove b");
    let gc = run("uffd-server", &["store", "gc", "--store", utf8(&store_dir)]);
    assert!(gc.starts_with(&format!("removed {} unreferenced chunks", only_b.len())), "{gc}");
    run("uffd-server", &["store", "verify", "--store", utf8(&store_dir)]);
    vm.touch_all(2, false);
    vm.assert_matches(&a.bytes);
    drop(vm);
    drop(server);
    // From disk again, cold: every chunk of a is still there.
    let server = ServerProcess::start_store(&store_dir, &[]);
    assert_every_byte(&server, "a", &a.path);
}
