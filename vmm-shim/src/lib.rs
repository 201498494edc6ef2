//! A minimal KVM VMM for restores served by `uffd-server`: guest memory (`memory`), the
//! Firecracker `Uffd` memory backend (`uffd_backend`), a guest that runs its work at CPL3
//! (`guest`: kvm_pvm here emulates ring 0 slowly, runs ring 3 natively) and the vCPU (`vm`).

#![warn(missing_docs)]

pub mod guest;
pub mod image;
pub mod memory;
pub mod restore;
pub mod snapshot;
pub mod uffd_backend;
pub mod vm;
pub mod workload;

// Guest addresses and lengths are u64 in KVM's structures and usize in this process's memory:
// they are the same width on the 64-bit hosts KVM x86 guests run on.
const _: () = assert!(usize::BITS == u64::BITS, "vmm-shim needs a 64-bit host");

/// A guest address or length as an index into this process's memory (lossless: asserted above).
#[allow(clippy::cast_possible_truncation)]
pub const fn usize_of(value: u64) -> usize {
    value as usize
}

/// `fraction` (clamped to 0..=1) of `count`, rounded.
pub fn share(count: usize, fraction: f64) -> usize {
    let share = (count as f64 * fraction.clamp(0.0, 1.0)).round();
    // In 0..=count after the clamp, so the cast loses nothing.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let share = share as usize;
    share.min(count)
}
