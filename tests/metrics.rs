//! The Prometheus endpoint: its numbers against what the test did, its text checked by
//! `promtool check metrics`, and a real Prometheus server (Debian's package, on loopback)
//! scraping it and answering a query on the vCPU stall histogram — the chain an operator uses.

use e2e::fake_vmm::{create_uffd, send_message, FakeVmm, GuestMemory};
use e2e::require_userfaultfd;
use e2e::server_process::ServerProcess;
use e2e::snapshot_file::SnapshotFile;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// GET `path` from 127.0.0.1:`port` over HTTP/1.0: the body.
fn http_get(port: u16, path: &str, accept: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response.split_once("\r\n\r\n").map_or(String::new(), |(_, body)| body.to_string())
}

/// The server's metrics port, from its log.
fn metrics_port(server: &ServerProcess) -> u16 {
    server.wait_for_log("serving Prometheus metrics", 1);
    let log = server.log();
    let at = log.find("listen=127.0.0.1:").expect("the metrics address in the log") + "listen=127.0.0.1:".len();
    log[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().expect("a port")
}

/// `name{labels} value` lines of an exposition.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            line.rsplit_once(' ').and_then(|(name, value)| Some((name.to_string(), value.parse().ok()?)))
        })
        .collect()
}

fn start(snap: &SnapshotFile) -> (ServerProcess, u16) {
    let server =
        ServerProcess::start(&[("vm", &snap.path)], &["--fault-around", "1", "--metrics-listen", "127.0.0.1:0"]);
    let port = metrics_port(&server);
    (server, port)
}

#[test]
fn metrics_count_what_the_vms_got_and_promtool_accepts_them() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "vm.mem", 4 << 20, 0.3, 81);
    let (pages, zero) = (snap.pages() as f64, snap.zero_pages() as f64);
    let (server, port) = start(&snap);
    let before = samples(&http_get(port, "/metrics", "text/plain"));
    assert_eq!(before.get("uffd_vms_attached_total{snapshot=\"vm\"}"), Some(&0.0), "series exist from the start");

    let vmm = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
    vmm.touch_all(2, false);
    vmm.assert_matches(&snap.bytes);
    drop(vmm);
    server.wait_for_log("VM ended", 1);
    // One refused connection: a handshake that is not JSON.
    let memory = GuestMemory::map(&[4 << 20], 0, false).expect("map");
    let uffd = create_uffd(&memory).expect("uffd");
    let socket = std::os::unix::net::UnixStream::connect(server.socket("vm")).expect("connect");
    send_message(&socket, b"{not json", Some(uffd.as_raw_fd())).expect("send");
    server.wait_for_log("handshake JSON is invalid", 1);

    let text = http_get(port, "/metrics", "text/plain");
    let m = samples(&text);
    let get = |name: &str| *m.get(name).unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
    assert_eq!(get("uffd_vms_attached_total{snapshot=\"vm\"}"), 1.0);
    assert_eq!(get("uffd_vms_live{snapshot=\"vm\"}"), 0.0);
    assert_eq!(get("uffd_faults_total{snapshot=\"vm\"}"), pages);
    assert_eq!(get("uffd_pages_copied_total{snapshot=\"vm\"}"), pages - zero);
    assert_eq!(get("uffd_pages_zero_total{snapshot=\"vm\"}"), zero);
    assert_eq!(get("uffd_placed_bytes_total{snapshot=\"vm\"}"), pages * 4096.0);
    assert_eq!(get("uffd_vcpu_stall_seconds_count{snapshot=\"vm\"}"), pages, "one stall per fault");
    assert_eq!(get("uffd_fault_service_seconds_count{snapshot=\"vm\"}"), pages);
    assert!(
        get("uffd_vcpu_stall_seconds_sum{snapshot=\"vm\"}") >= get("uffd_fault_service_seconds_sum{snapshot=\"vm\"}")
    );
    assert_eq!(get("uffd_vcpu_stall_seconds_bucket{le=\"+Inf\",snapshot=\"vm\"}"), pages);
    assert_eq!(get("uffd_vms_refused_total{snapshot=\"vm\",reason=\"handshake\"}"), 1.0);
    // The per-VM view agrees, with the stall beside the faults.
    let counters = server.stats().vms[0].counters.clone();
    assert!(counters.stall_total_ms > 0.0 && counters.stall_p50_us > 0.0, "{counters:?}");

    assert_promtool_accepts(&text);
}

#[test]
fn the_chunk_pool_counts_a_shared_chunk_once_and_promtool_accepts_it() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let a = SnapshotFile::random(dir.path(), "a.mem", 4 << 20, 0.3, 82);
    let mut b_bytes = SnapshotFile::random(dir.path(), "b.raw", 4 << 20, 0.3, 83).bytes;
    b_bytes[..2 << 20].copy_from_slice(&a.bytes[..2 << 20]);
    let b = SnapshotFile::from_bytes(dir.path(), "b.mem", b_bytes);
    let store = dir.path().join("store");
    for (name, snap) in [("a", &a), ("b", &b)] {
        e2e::server_process::import_to_store(&store, name, &snap.path).expect("import");
    }
    let opened = snapstore::store::Store::open(&store).expect("store");
    let distinct: std::collections::BTreeSet<_> =
        ["a", "b"].iter().flat_map(|n| opened.read_manifest(n).expect("manifest").chunks).flatten().collect();
    let server = ServerProcess::start_store(&store, &["--metrics-listen", "127.0.0.1:0"]);
    let port = metrics_port(&server);
    let vmm = FakeVmm::attach(&server.socket("a"), a.bytes.len()).expect("attach");
    vmm.touch_all(2, false);
    vmm.assert_matches(&a.bytes);

    let text = http_get(port, "/metrics", "text/plain");
    let m = samples(&text);
    let get = |name: &str| *m.get(name).unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
    assert_eq!(get("uffd_chunk_pool_chunks"), distinct.len() as f64);
    let per_snapshot =
        get("uffd_snapshot_resident_bytes{snapshot=\"a\"}") + get("uffd_snapshot_resident_bytes{snapshot=\"b\"}");
    let pool = get("uffd_chunk_pool_bytes");
    assert!(
        pool > 0.0 && pool < per_snapshot,
        "the shared half counted once: pool {pool}, per snapshot {per_snapshot}"
    );
    assert_eq!(get("uffd_chunk_corrupt_reads_total"), 0.0);
    assert_promtool_accepts(&text);
}

/// The object-store family against what the server did: a cold start fetches every chunk
/// (held back from the disk cache while never quiet), a start after a stop reads them all from
/// the disk cache's files; promtool accepts both.
#[test]
fn the_object_store_metrics_count_fetches_and_disk_cache_reads_and_promtool_accepts_them() {
    require_userfaultfd();
    let bucket = e2e::object_store::test_bucket(&e2e::object_store::require_s3(), "metrics");
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "r.mem", 4 << 20, 0.3, 84);
    let store = dir.path().join("store");
    e2e::server_process::import_to_store(&store, "r", &snap.path).expect("import");
    let url = bucket.address().to_string();
    let store_arg = store.to_str().expect("utf-8");
    e2e::server_process::run_binary("uffd-server", &["push", "--store", store_arg, "--name", "r", "--to", &url])
        .unwrap_or_else(|e| panic!("{e}"));
    let manifest = snapstore::store::Store::open(&store).expect("store").read_manifest("r").expect("manifest");
    let distinct = manifest.chunks.iter().flatten().collect::<std::collections::BTreeSet<_>>().len() as f64;
    let snapshot = format!("r={url}/r");
    let cache = dir.path().join("cache");
    let args = [
        "--snapshot",
        &snapshot,
        "--disk-cache",
        cache.to_str().expect("utf-8"),
        "--disk-cache-quiet-ms",
        "3600000",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let scrape = |server: &ServerProcess| {
        let vmm = FakeVmm::attach(&server.socket("r"), snap.bytes.len()).expect("attach");
        vmm.touch_all(2, false);
        vmm.assert_matches(&snap.bytes);
        let text = http_get(metrics_port(server), "/metrics", "text/plain");
        assert_promtool_accepts(&text);
        (samples(&text), text)
    };

    let mut cold = ServerProcess::start_with_env("serve", &[], &args, &[]);
    let (m, text) = scrape(&cold);
    let get = |name: &str| *m.get(name).unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
    assert_eq!(get("uffd_remote_chunk_gets_total"), distinct, "every chunk fetched once");
    assert_eq!(get("uffd_remote_failed_gets_total"), 0.0);
    assert!(get("uffd_remote_chunk_bytes_total") > 0.0);
    assert_eq!(get("uffd_disk_cache_hits_total") + get("uffd_disk_cache_held_back_hits_total"), 0.0);
    assert_eq!(get("uffd_disk_cache_chunks"), 0.0, "never quiet: nothing written yet");
    assert!(get("uffd_disk_cache_held_back_bytes") > 0.0, "what was fetched is held back");
    assert_eq!(get("uffd_disk_cache_mapped_chunks"), 0.0, "nothing read from disk");
    assert!(cold.terminate().success(), "{}", cold.log());

    let warm = ServerProcess::start_with_env("serve", &[], &args, &[]);
    let (m, text) = scrape(&warm);
    let get = |name: &str| *m.get(name).unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
    assert_eq!(get("uffd_remote_chunk_gets_total"), 0.0);
    assert_eq!(get("uffd_disk_cache_hits_total"), distinct, "every chunk read from the file the stop wrote");
    assert_eq!(get("uffd_disk_cache_held_back_hits_total"), 0.0, "none was held back in this process");
    assert_eq!((get("uffd_disk_cache_chunks"), get("uffd_disk_cache_held_back_bytes")), (distinct, 0.0));
    assert_eq!(get("uffd_disk_cache_mapped_chunks"), distinct, "each hit held as its file, mapped in place");
    let stats = e2e::server_process::run_binary(
        "uffd-server",
        &["stats", "--socket-dir", warm.socket_dir.to_str().expect("utf-8")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let line = format!(
        "object store: 0 chunks fetched (0 MiB), 0 failed GETs; disk cache: {distinct} chunks read from files, 0 from those held back"
    );
    assert!(stats.contains(&line), "`uffd-server stats` says so too:\n{stats}");
}

/// `promtool check metrics` (Debian's prometheus package) accepts the exposition `text`.
fn assert_promtool_accepts(text: &str) {
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .output_with_stdin(text.as_bytes());
    assert!(promtool.status.success(), "promtool check metrics:\n{}", String::from_utf8_lossy(&promtool.stdout));
}

/// `Command::output`, feeding `input` on stdin.
trait OutputWithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output;
}

impl OutputWithStdin for std::process::Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output {
        let mut child =
            self.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap_or_else(
                |e| panic!("cannot run {:?} (./x installs Debian's prometheus package): {e}", self.get_program()),
            );
        child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
        child.wait_with_output().expect("wait")
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

#[test]
fn a_real_prometheus_scrapes_the_stall_histogram() {
    require_userfaultfd();
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = SnapshotFile::random(dir.path(), "vm.mem", 4 << 20, 0.3, 82);
    let (server, port) = start(&snap);
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: uffd\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .expect("config");
    let web = free_port();
    let prometheus = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run prometheus (./x installs Debian's prometheus package)");
    /// Stops Prometheus when the test ends, however it ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prometheus = Kill(prometheus);

    let vmm = FakeVmm::attach(&server.socket("vm"), snap.bytes.len()).expect("attach");
    vmm.touch_all(2, false);
    vmm.assert_matches(&snap.bytes);
    drop(vmm);
    server.wait_for_log("VM ended", 1);

    let query = "/api/v1/query?query=uffd_vcpu_stall_seconds_count%7Bsnapshot%3D%22vm%22%7D";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = TcpStream::connect(("127.0.0.1", web))
            .map(|_| http_get(web, query, "application/json"))
            .unwrap_or_default();
        let value = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse::<f64>().ok()));
        if value == Some(snap.pages() as f64) {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus never had the stall histogram; last answer: {body}");
        std::thread::sleep(Duration::from_millis(250));
    }
}
