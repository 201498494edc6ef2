//! Test harness: the real `uffd-server` binary as a child process, random snapshot files, and a
//! test VMM that behaves as Firecracker does towards the server.

pub mod fake_vmm;
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
