//! Test harness: the real `uffd-server` binary as a child process, random snapshot files, and a
//! test VMM that behaves as Firecracker does towards the server.

pub mod fake_vmm;
pub mod fuzz_checks;
pub mod object_store;
pub mod server_process;
pub mod snapshot_file;

/// Fails loudly when the machine cannot run these tests (no silent skips): the test VMM needs a
/// userfaultfd that also reports kernel-mode faults, as Firecracker's does, which takes root
/// (or CAP_SYS_PTRACE).
pub fn require_userfaultfd() {
    if let Err(e) = userfaultfd::UffdBuilder::new().user_mode_only(false).create() {
        panic!("these tests need userfaultfd with kernel-mode faults (run as root): creating one failed: {e}");
    }
}

/// Fails loudly when the machine has no usable KVM (no silent skips): the restore tests run a
/// real vCPU.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("these tests need KVM: opening /dev/kvm failed: {e}");
    }
}

/// Makes sure `pages` 2 MiB huge pages are free, reserving more as root. Fails under CI when
/// they cannot be had; elsewhere says so and returns false.
pub fn ensure_huge_pages(pages: u64) -> bool {
    let free = || -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:").and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    };
    if free() < pages {
        let total: u64 =
            std::fs::read_to_string("/proc/sys/vm/nr_hugepages").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", (total + pages - free()).to_string());
    }
    let have = free();
    if have >= pages {
        return true;
    }
    let why = format!("{pages} free 2 MiB huge pages are needed, {have} could be reserved");
    assert!(std::env::var_os("CI").is_none(), "{why} (.ci/run reserves them as root)");
    eprintln!("SKIPPED: {why}");
    false
}

/// Aborts the whole test process if it is not disarmed in time: a test whose guest thread hangs
/// on a fault nobody answers fails, instead of hanging CI.
pub struct Watchdog {
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Watchdog {
    /// Arms a watchdog that aborts after `limit` with `what` on stderr.
    pub fn arm(limit: std::time::Duration, what: &str) -> Watchdog {
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (flag, what) = (std::sync::Arc::clone(&armed), what.to_string());
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + limit;
            while std::time::Instant::now() < deadline {
                if !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                eprintln!("WATCHDOG: {what} did not finish within {limit:?}: a fault was left unanswered");
                std::process::abort();
            }
        });
        Watchdog { armed }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.armed.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}
