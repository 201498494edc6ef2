//! Snapshots in a real object store (Ceph RGW, S3 API): `push` from one host, restores on
//! "other hosts" (fresh servers with empty RAM and disk caches of their own) from the bucket
//! alone, real KVM guests and real userfaultfds, every byte checked.

use e2e::fake_vmm::{touch, touch_pages, FakeVmm};
use e2e::object_store::{require_s3, test_bucket, OwnRgw};
use e2e::server_process::{import_to_store, run_binary, vmm_shim_restore, workspace_binary, ServerProcess};
use e2e::snapshot_file::SnapshotFile;
use e2e::{require_kvm, require_userfaultfd};
use snapstore::bucket::Bucket;
use snapstore::store::{chunk_relative, Store};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn utf8(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn run(binary: &str, args: &[&str]) -> String {
    run_binary(binary, args).unwrap_or_else(|e| panic!("{e}"))
}

/// `vmm-shim snapshot --out DIR/NAME ARGS`: the snapshot directory.
fn guest_snapshot(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let out = dir.join(name);
    run("vmm-shim", &[&["snapshot", "--out", utf8(&out)][..], args].concat());
    out
}

fn s3_url(bucket: &Bucket) -> String {
    bucket.address().to_string()
}

/// A server of a "host" of its own: snapshot `name` from `bucket`, a fresh disk cache in
/// `cache`, and `extra` arguments; `env` for its S3 configuration (the process's when empty).
fn remote_server(bucket: &Bucket, name: &str, cache: &Path, extra: &[&str], env: &[(&str, &str)]) -> ServerProcess {
    let snapshot = format!("{name}={}/{name}", s3_url(bucket));
    let args = [&["--snapshot", &snapshot, "--disk-cache", utf8(cache)][..], extra].concat();
    ServerProcess::start_with_env("serve", &[], &args, env)
}

/// What most tests start from: a bucket of their own, a temp dir, and a random snapshot (30%
/// zero pages) imported into a store there.
struct Fixture {
    bucket: Bucket,
    url: String,
    dir: tempfile::TempDir,
    store: PathBuf,
    snap: SnapshotFile,
}

fn fixture(test: &str, name: &str, len: usize, seed: u64) -> Fixture {
    require_userfaultfd();
    let bucket = test_bucket(&require_s3(), test);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let snap = SnapshotFile::random(dir.path(), &format!("{name}.mem"), len, 0.3, seed);
    import_to_store(&store, name, &snap.path).expect("import");
    Fixture { url: s3_url(&bucket), bucket, dir, store, snap }
}

/// `uffd-server push` of `name` from `store` to `url`, with `extra` arguments: what it printed.
fn push(store: &Path, name: &str, url: &str, extra: &[&str]) -> String {
    run("uffd-server", &[&["push", "--store", utf8(store), "--name", name, "--to", url][..], extra].concat())
}

/// A VM that touches every page of snapshot `name` and compares all of its memory.
fn assert_every_byte(server: &ServerProcess, name: &str, bytes: &[u8]) {
    let vm = FakeVmm::attach(&server.socket(name), bytes.len()).expect("attach");
    vm.touch_all(2, false);
    vm.assert_matches(bytes);
}

/// The distinct chunks holding data in snapshot `name` of the store at `store`.
fn distinct_chunks(store: &Path, name: &str) -> usize {
    let manifest = Store::open(store).expect("store").read_manifest(name).expect("manifest");
    manifest.chunks.iter().flatten().collect::<std::collections::BTreeSet<_>>().len()
}

/// Asserts that `server` fetched no chunk from the bucket and read some from its disk cache
/// (`why`: where they came from).
fn assert_only_disk_cache_read(server: &ServerProcess, why: &str) {
    let remote = server.stats().remote.expect("remote counters");
    assert_eq!(remote.chunk_gets, 0, "{why}: no chunk fetched: {remote:?}");
    assert!(remote.disk_hits > 0, "{why}: chunks read from the disk cache: {remote:?}");
}

/// Runs a fake VMM touching every page of `name` as a child process: how it ended.
fn victim_vm(server: &ServerProcess, name: &str, len: usize, limit: Duration) -> std::process::ExitStatus {
    let mut victim = Command::new(workspace_binary("fake-vmm"))
        .args([utf8(&server.socket(name)), &len.to_string(), "0", "--then-exit"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run fake-vmm");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = victim.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "the VM of {name} waits on a fault:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A snapshot named on the command line loads when the server starts, in the background:
/// with the bucket up, before any VM attaches; with it down, the server serves at once.
#[test]
fn a_named_snapshot_loads_at_start_and_a_dead_bucket_does_not_hold_the_server_up() {
    let Fixture { bucket, url, dir, store, snap } = fixture("load-at-start", "s", 4 * MIB, 91);
    push(&store, "s", &url, &[]);
    let ready_us =
        |server: &ServerProcess| server.logged_number("serving ready_us", "ready_us").expect("logged when serving");
    let server = remote_server(&bucket, "s", &dir.path().join("cache-up"), &[], &[]);
    assert_eq!(server.stats().snapshots_loaded, vec!["s".to_string()], "loaded with no VM attached");
    assert_every_byte(&server, "s", &snap.bytes);
    drop(server);

    // Nothing listens on port 9: every GET of the manifest fails until the deadline (2 s).
    let dead = [("AWS_ENDPOINT_URL", "http://127.0.0.1:9")];
    let extra = ["--remote-deadline-ms", "2000"];
    let server = remote_server(&bucket, "s", &dir.path().join("cache-down"), &extra, &dead);
    let ready = ready_us(&server);
    assert!(ready < 1e6, "the server waited {ready} µs for an unreachable bucket:\n{}", server.log());
    server.wait_for_log("VMs of this snapshot will be refused until it loads", 1);
    assert!(server.stats().snapshots_loaded.is_empty());
}

#[test]
fn a_second_host_restores_from_the_bucket_alone_with_none_and_union() {
    require_kvm();
    require_userfaultfd();
    let s3 = require_s3();
    let bucket = test_bucket(&s3, "second-host");
    let dir = tempfile::tempdir().expect("temp dir");
    let snapshot = guest_snapshot(dir.path(), "py", &["--workload", "python-image", "--function", "2"]);
    let bytes = std::fs::read(snapshot.join("mem")).expect("read");
    let store = dir.path().join("store");
    import_to_store(&store, "py", &snapshot.join("mem")).expect("import");

    // Host A records a working set from its own store, and publishes both.
    let working_set = dir.path().join("py.ws");
    let recorder = ServerProcess::start_with_env(
        "record",
        &[],
        &["--store", utf8(&store), "--working-set", utf8(&working_set)],
        &[],
    );
    let uffd = ["--mem-backend", "uffd", "--uffd-socket"];
    vmm_shim_restore(&snapshot, &[&uffd[..], &[utf8(&recorder.socket("py")), "--invoke", "1"]].concat())
        .expect("record");
    recorder.wait_for_log("run merged into the working set", 1);
    let pushed = push(&store, "py", &s3_url(&bucket), &["--working-set", utf8(&working_set)]);
    assert!(pushed.contains(" uploaded (0 already there)"), "{pushed}");

    let distinct = distinct_chunks(&store, "py");
    for policy in ["none", "union"] {
        let cache = dir.path().join(format!("cache-{policy}"));
        let server = remote_server(&bucket, "py", &cache, &["--prefetch", policy], &[]);
        let socket = server.socket("py");
        // vmm-shim checks each invocation's checksum against the memory file.
        let report = vmm_shim_restore(&snapshot, &[&uffd[..], &[utf8(&socket), "--invoke", "2"]].concat())
            .unwrap_or_else(|e| panic!("{policy}: {e}\n{}", server.log()));
        assert_eq!(report["invocations"].as_array().map(Vec::len), Some(2), "{policy}: {report}");
        assert_every_byte(&server, "py", &bytes);
        let stats = server.stats();
        let remote = stats.remote.expect("remote counters");
        assert!(remote.chunk_gets > 0 && remote.failed_gets == 0, "{policy}: {remote:?}");
        // Every chunk came (the last VM touched every page), and is kept on disk (written behind).
        let deadline = Instant::now() + Duration::from_secs(20);
        while cached_chunks(&cache) < distinct && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(cached_chunks(&cache), distinct, "{policy}: every chunk fetched is kept in the disk cache");
        let prefetched: u64 = stats.vms.iter().map(|vm| vm.counters.prefetched_pages).sum();
        match policy {
            "none" => assert_eq!(prefetched, 0),
            _ => assert!(prefetched > 0, "union prefetches the published working set: {:?}", stats.vms),
        }
    }
}

#[test]
fn two_hosts_restore_at_once_one_warm_one_cold_while_a_third_pushes() {
    require_userfaultfd();
    let s3 = require_s3();
    let bucket = test_bucket(&s3, "two-hosts");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let a = SnapshotFile::random(dir.path(), "a.mem", 16 * MIB, 0.3, 71);
    let b = SnapshotFile::random(dir.path(), "b.mem", 16 * MIB, 0.3, 72);
    import_to_store(&store, "a", &a.path).expect("import a");
    import_to_store(&store, "b", &b.path).expect("import b");
    let url = s3_url(&bucket);
    push(&store, "a", &url, &[]);

    let (warm_cache, cold_cache) = (dir.path().join("warm"), dir.path().join("cold"));
    let pulled =
        run("uffd-server", &["pull", "--from", &url, "--name", "a", "--all", "--disk-cache", utf8(&warm_cache)]);
    assert!(pulled.contains(" chunks cached"), "{pulled}");
    let warm = remote_server(&bucket, "a", &warm_cache, &[], &[]);
    let cold = remote_server(&bucket, "a", &cold_cache, &[], &[]);
    std::thread::scope(|scope| {
        for server in [&warm, &cold] {
            for _ in 0..2 {
                scope.spawn(|| assert_every_byte(server, "a", &a.bytes));
            }
        }
        scope.spawn(|| push(&store, "b", &url, &[]));
    });
    assert_only_disk_cache_read(&warm, "the warm host reads its disk cache only");
    let cold_fetched = cold.stats().remote.expect("cold");
    let distinct = distinct_chunks(&store, "a") as u64;
    assert!(
        cold_fetched.chunk_gets <= distinct,
        "two VMs faulting on the same chunk cause one GET: {} GETs for {distinct} chunks",
        cold_fetched.chunk_gets
    );
    let third = remote_server(&bucket, "b", &dir.path().join("third"), &[], &[]);
    assert_every_byte(&third, "b", &b.bytes);
}

#[test]
fn a_corrupted_chunk_object_is_refused_and_never_served() {
    let Fixture { bucket, url, dir, store: store_dir, snap } = fixture("corrupt", "c", 8 * MIB, 73);
    push(&store_dir, "c", &url, &[]);
    // A well-formed chunk object, but another chunk's: its bytes do not hash to its name.
    let store = Store::open(&store_dir).expect("store");
    let ids: Vec<_> = store.read_manifest("c").expect("manifest").chunks.into_iter().flatten().collect();
    let other = std::fs::read(store.chunk_path(&ids[1])).expect("read chunk");
    bucket.put(&chunk_relative(&ids[0]), &other).expect("overwrite");

    let server = remote_server(&bucket, "c", &dir.path().join("cache"), &["--remote-deadline-ms", "1000"], &[]);
    let status = victim_vm(&server, "c", snap.bytes.len(), Duration::from_secs(30));
    assert_eq!(status.signal(), Some(libc::SIGBUS), "a memory error, never the wrong bytes: {status:?}");
    server.wait_for_log("page poisoned", 1);
    assert!(server.log().contains("does not match") || server.log().contains("hash"), "{}", server.log());
    assert!(server.stats().remote.expect("remote").failed_gets > 0);
}

#[test]
fn a_killed_push_leaves_no_manifest_without_its_chunks_and_a_rerun_completes() {
    let Fixture { bucket, url, dir, store, snap: big } = fixture("killed-push", "big", 96 * MIB, 74);
    let mut pushing = Command::new(workspace_binary("uffd-server"))
        .args(["push", "--store", utf8(&store), "--name", "big", "--to", &url, "--threads", "2"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run push");
    let deadline = Instant::now() + Duration::from_secs(60);
    while bucket.list("chunks/").expect("list").len() < 20 {
        assert!(Instant::now() < deadline && pushing.try_wait().expect("wait").is_none(), "push ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    pushing.kill().expect("kill -9");
    pushing.wait().expect("reap");
    assert!(!bucket.exists("manifests/big").expect("head"), "no manifest before all its chunks");

    let rerun = push(&store, "big", &url, &[]);
    assert!(!rerun.contains("(0 already there)"), "the chunks of the killed push are reused: {rerun}");
    let server = remote_server(&bucket, "big", &dir.path().join("cache"), &["--prefetch", "none"], &[]);
    assert_every_byte(&server, "big", &big.bytes);
}

#[test]
fn an_outage_mid_restore_is_ridden_out_within_the_deadline_and_poisons_after_it() {
    require_userfaultfd();
    let rgw = OwnRgw::start();
    let bucket = test_bucket(&rgw.config(), "outage");
    let env = rgw.env_pairs();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let remote = SnapshotFile::random(dir.path(), "r.mem", 8 * MIB, 0.3, 75);
    let local = SnapshotFile::random(dir.path(), "local.mem", 8 * MIB, 0.3, 76);
    import_to_store(&store, "r", &remote.path).expect("import");
    let push = Command::new(workspace_binary("uffd-server"))
        .args(["push", "--store", utf8(&store), "--name", "r", "--to", &s3_url(&bucket)])
        .envs(env.iter().copied())
        .output()
        .expect("push");
    assert!(push.status.success(), "{}", String::from_utf8_lossy(&push.stderr));

    // Within the deadline: the VM waits out the outage and gets every byte.
    let local_snapshot = format!("local={}", local.path.display());
    let extra = ["--prefetch", "none", "--remote-deadline-ms", "20000", "--snapshot", &local_snapshot];
    let server = remote_server(&bucket, "r", &dir.path().join("cache"), &extra, &env);
    let vm = FakeVmm::attach(&server.socket("r"), remote.bytes.len()).expect("attach");
    let pages: Vec<usize> = vm.memory.page_addrs().collect();
    touch_pages(&pages[..pages.len() / 4], 1, false);
    rgw.stop_gateway();
    std::thread::scope(|scope| {
        let rest = scope.spawn(|| touch_pages(&pages[pages.len() / 4..], 1, false));
        // A VM of a local snapshot is served meanwhile.
        assert_every_byte(&server, "local", &local.bytes);
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!rest.is_finished(), "the rest of r's chunks cannot have come while the store was down");
        rgw.start_gateway();
        rest.join().expect("touch");
    });
    vm.assert_matches(&remote.bytes);
    assert!(server.stats().remote.expect("remote").failed_gets > 0, "the outage was seen and ridden out");

    // Past the deadline: the VM gets a memory error for the pages it cannot have, not a hang.
    let short = ["--prefetch", "none", "--remote-deadline-ms", "1000"];
    let second = remote_server(&bucket, "r", &dir.path().join("cache-2"), &short, &env);
    // The snapshot loads (its manifest fetched) with a first VM, then the store goes away.
    let first = FakeVmm::attach(&second.socket("r"), remote.bytes.len()).expect("attach");
    touch(first.memory.page_addrs().next().expect("a page"), false);
    drop(first);
    rgw.stop_gateway();
    let status = victim_vm(&second, "r", remote.bytes.len(), Duration::from_secs(30));
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
    second.wait_for_log("page poisoned", 1);
}

/// A server of a fresh snapshot `name` that fetched every chunk and, never quiet, held all of
/// them back from its disk cache: the fixture, the cache's directory, and the server.
fn server_holding_back_every_chunk(test: &str, name: &str, seed: u64) -> (Fixture, PathBuf, ServerProcess) {
    let fixture = fixture(test, name, 8 * MIB, seed);
    push(&fixture.store, name, &fixture.url, &[]);
    let cache = fixture.dir.path().join("cache");
    let server = remote_server(&fixture.bucket, name, &cache, &["--disk-cache-quiet-ms", "3600000"], &[]);
    assert_every_byte(&server, name, &fixture.snap.bytes);
    let fetched = server.stats().remote.expect("remote counters");
    assert_eq!(fetched.chunk_gets, distinct_chunks(&fixture.store, name) as u64, "{fetched:?}");
    assert_eq!(cached_chunks(&cache), 0, "nothing is written while the host is not quiet");
    (fixture, cache, server)
}

/// Chunk files in the disk cache at `cache`.
fn cached_chunks(cache: &Path) -> usize {
    Store::open(cache).expect("disk cache").chunk_files().expect("list").0.len()
}

/// A server stopped by SIGTERM writes the chunks it held back before it exits: the next start
/// reads every one from disk and fetches none.
#[test]
fn chunks_held_back_from_the_disk_cache_are_written_when_the_server_stops() {
    let (Fixture { bucket, store, snap, dir: _dir, .. }, cache, mut server) =
        server_holding_back_every_chunk("stop-writes", "s", 93);
    let status = server.terminate();
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert_eq!(
        cached_chunks(&cache),
        distinct_chunks(&store, "s"),
        "every chunk written at the stop:\n{}",
        server.log()
    );
    assert!(server.log().contains("disk cache: chunks held back written"), "{}", server.log());

    let again = remote_server(&bucket, "s", &cache, &[], &[]);
    assert_every_byte(&again, "s", &snap.bytes);
    assert_only_disk_cache_read(&again, "the next start reads what the stop wrote");
}

/// A handover writes what its writer held back once the successor serves, and the successor
/// (whose index was built before) reads those files instead of fetching the chunks again.
#[test]
fn chunks_held_back_from_the_disk_cache_are_written_when_the_server_hands_over() {
    let (Fixture { store, snap, dir: _dir, .. }, cache, mut server) =
        server_holding_back_every_chunk("handover-writes", "h", 95);
    let status = server.take_over();
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert_eq!(cached_chunks(&cache), distinct_chunks(&store, "h"), "the predecessor wrote them:\n{}", server.log());
    assert!(server.log().contains("disk cache: chunks held back written"), "{}", server.log());
    assert_every_byte(&server, "h", &snap.bytes);
    assert_only_disk_cache_read(&server, "the successor reads what its predecessor wrote");
}

/// `pull` pre-warming the disk cache of a host whose server already runs (it indexed the cache
/// when it started): the server finds the pulled chunks when it needs them and fetches none.
#[test]
fn a_pull_into_a_running_servers_disk_cache_is_used_without_a_restart() {
    let Fixture { bucket, url, dir, store, snap } = fixture("pull-live", "w", 8 * MIB, 94);
    push(&store, "w", &url, &[]);
    let cache = dir.path().join("cache");
    let server = remote_server(&bucket, "w", &cache, &[], &[]);
    let pulled = run("uffd-server", &["pull", "--from", &url, "--name", "w", "--all", "--disk-cache", utf8(&cache)]);
    assert!(pulled.contains(" chunks cached"), "{pulled}");
    assert_every_byte(&server, "w", &snap.bytes);
    assert_only_disk_cache_read(&server, "every chunk from the disk cache pulled meanwhile");
}

#[test]
fn a_damaged_pack_chunk_is_refused_and_fetched_on_its_own() {
    let Fixture { bucket, url, dir, store, snap } = fixture("damaged-pack", "p", 8 * MIB, 77);
    // A working set of every page (a VM that touched them all), published with its pack.
    let working_set = dir.path().join("p.ws");
    let recorder = ServerProcess::start_with_env(
        "record",
        &[],
        &["--store", utf8(&store), "--working-set", utf8(&working_set)],
        &[],
    );
    assert_every_byte(&recorder, "p", &snap.bytes);
    recorder.wait_for_log("run merged into the working set", 1);
    push(&store, "p", &url, &["--working-set", utf8(&working_set)]);
    let mut pack = bucket.get("packs/p", snapstore::bucket::Lane::Background).expect("get").expect("a pack");
    let index =
        snapstore::pack::decode_index(&pack[..snapstore::pack::index_len(&pack).expect("index")]).expect("index");
    let damaged = index.entries[3];
    let at = usize::try_from(damaged.offset + damaged.len).expect("offset") - 10;
    pack[at] ^= 0x10;
    bucket.put("packs/p", &pack).expect("put");

    let server = remote_server(&bucket, "p", &dir.path().join("cache"), &["--prefetch", "union"], &[]);
    assert_every_byte(&server, "p", &snap.bytes);
    assert!(server.log().contains("fetching the working-set pack"), "{}", server.log());
    assert!(server.log().contains(&format!("chunk {}", damaged.id)), "the damaged chunk is named:\n{}", server.log());
    let remote = server.stats().remote.expect("remote");
    assert!(remote.chunk_gets >= 1, "the refused chunk came on its own: {remote:?}");
}

#[test]
fn two_hosts_learning_at_once_lose_no_run_and_a_third_prefetches_both() {
    let Fixture { bucket, url, dir, store, snap } = fixture("learning", "l", 8 * MIB, 78);
    push(&store, "l", &url, &[]);

    // Hosts A and B record at once, each a VM touching its half of the memory.
    let hosts: Vec<ServerProcess> = ["a", "b"]
        .iter()
        .map(|host| {
            let snapshot = format!("l={url}/l");
            let ws = dir.path().join(format!("{host}.ws"));
            let cache = dir.path().join(format!("cache-{host}"));
            let args = ["--snapshot", &snapshot, "--disk-cache", utf8(&cache), "--working-set", utf8(&ws)];
            ServerProcess::start_with_env("record", &[], &args, &[])
        })
        .collect();
    let (len, pages) = (snap.bytes.len(), snap.bytes.len() / 4096);
    std::thread::scope(|scope| {
        for (half, host) in hosts.iter().enumerate() {
            scope.spawn(move || {
                let vm = FakeVmm::attach(&host.socket("l"), len).expect("attach");
                let addrs: Vec<usize> = vm.memory.page_addrs().collect();
                touch_pages(&addrs[half * pages / 2..(half + 1) * pages / 2], 1, false);
            });
        }
    });
    for host in &hosts {
        host.wait_for_log("learned pages published for other hosts", 1);
    }
    let manifest = Store::open(&store).expect("store").read_manifest("l").expect("manifest");
    let policy = snapstore::bucket::RetryPolicy::default();
    let (set, runs) = snapstore::shared_set::merged(&bucket, "l", &manifest.identity, &policy)
        .expect("merge")
        .expect("a working set");
    assert_eq!((set.runs, runs.len()), (2, 2), "both hosts' runs, none lost");
    assert_eq!(set.pages.len(), pages, "the two halves together");

    // A third host prefetches what both learned.
    let reader = remote_server(&bucket, "l", &dir.path().join("cache-c"), &["--prefetch", "union"], &[]);
    assert!(reader.log().contains("published_runs=2"), "{}", reader.log());
    assert_every_byte(&reader, "l", &snap.bytes);
    let prefetched: u64 = reader.stats().vms.iter().map(|vm| vm.counters.prefetched_pages).sum();
    assert!(prefetched > 0);

    let compacted = run("uffd-server", &["compact", "--from", &url, "--name", "l"]);
    assert!(compacted.contains("2 published runs folded"), "{compacted}");
    let (set, runs) = snapstore::shared_set::merged(&bucket, "l", &manifest.identity, &policy)
        .expect("merge")
        .expect("a working set");
    assert_eq!((set.runs, runs.len(), set.pages.len()), (2, 0, pages), "folded into the base, run objects gone");
}
