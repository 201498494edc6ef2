//! A minimal KVM VMM for restores served by `uffd-server`: guest memory (`memory`), the
//! Firecracker `Uffd` memory backend (`uffd_backend`), a guest that runs its work at CPL3
//! (`guest`: kvm_pvm here emulates ring 0 slowly, runs ring 3 natively) and the vCPU (`vm`).

pub mod guest;
pub mod memory;
pub mod restore;
pub mod snapshot;
pub mod uffd_backend;
pub mod vm;
pub mod workload;
