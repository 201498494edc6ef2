//! A KVM VM with its vCPUs over guest memory mapped by the VMM, each region at its
//! guest-physical address (`memory::x86_layout`: the MMIO gap above 3 GiB, as Firecracker).

use crate::guest;
use crate::memory::GuestMemory;
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

/// A KVM failure.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum VmError {
    #[error("cannot open /dev/kvm or create the VM: {0}")]
    Create(kvm_ioctls::Error),
    #[error("cannot add guest memory region {index}: {source}")]
    Memory { index: usize, source: kvm_ioctls::Error },
    #[error("cannot set up the vCPU: {0}")]
    Vcpu(kvm_ioctls::Error),
    #[error("KVM_RUN failed: {0}")]
    Run(kvm_ioctls::Error),
    #[error("{0} guest memory regions are more than KVM has slots for")]
    TooManyRegions(usize),
}

/// Why the vCPU stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `out` to `port` with the value (1, 2 or 4 bytes, zero-extended).
    Out {
        /// The I/O port.
        port: u16,
        /// The value written.
        value: u32,
    },
    /// A triple fault: the guest hit an exception (it has no handlers).
    Shutdown,
    /// Any other exit, as KVM named it.
    Other(String),
}

/// A KVM VM with its vCPUs.
pub struct Vm {
    _vm: VmFd,
    vcpus: Vec<Vcpu>,
}

/// One vCPU; each can run on a thread of its own.
pub struct Vcpu {
    fd: VcpuFd,
}

impl Vm {
    /// A VM over `memory` with one vCPU in CPL3 long mode (see [`guest`]).
    pub fn new(memory: &GuestMemory) -> Result<Vm, VmError> {
        Self::with_vcpus(memory, 1)
    }

    /// A VM over `memory` with `count` vCPUs, all in CPL3 long mode.
    pub fn with_vcpus(memory: &GuestMemory, count: u8) -> Result<Vm, VmError> {
        let vm = Kvm::new().and_then(|kvm| kvm.create_vm()).map_err(VmError::Create)?;
        for (index, region) in memory.regions.iter().enumerate() {
            let slot = kvm_userspace_memory_region {
                slot: u32::try_from(index).map_err(|_| VmError::TooManyRegions(memory.regions.len()))?,
                guest_phys_addr: region.guest_addr as u64,
                memory_size: region.size as u64,
                userspace_addr: region.addr as u64,
                flags: 0,
            };
            // SAFETY: the region is mapped for as long as `memory` lives, which the caller keeps
            // beyond this VM (its fields drop the VM first); KVM only accesses it while running.
            unsafe { vm.set_user_memory_region(slot) }.map_err(|source| VmError::Memory { index, source })?;
        }
        let mut vcpus = Vec::new();
        for id in 0..count {
            let fd = vm.create_vcpu(u64::from(id)).map_err(VmError::Vcpu)?;
            let mut sregs = fd.get_sregs().map_err(VmError::Vcpu)?;
            guest::set_cpl3_long_mode(&mut sregs);
            fd.set_sregs(&sregs).map_err(VmError::Vcpu)?;
            vcpus.push(Vcpu { fd });
        }
        Ok(Vm { _vm: vm, vcpus })
    }

    /// vCPU `index`.
    pub fn vcpu(&mut self, index: usize) -> &mut Vcpu {
        &mut self.vcpus[index]
    }

    /// Every vCPU.
    pub fn vcpus(&mut self) -> &mut [Vcpu] {
        &mut self.vcpus
    }
}

impl Vcpu {
    /// The special registers.
    pub fn sregs(&self) -> Result<kvm_sregs, VmError> {
        self.fd.get_sregs().map_err(VmError::Vcpu)
    }

    /// Sets the special registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), VmError> {
        self.fd.set_sregs(sregs).map_err(VmError::Vcpu)
    }

    /// The general registers.
    pub fn regs(&self) -> Result<kvm_regs, VmError> {
        self.fd.get_regs().map_err(VmError::Vcpu)
    }

    /// Sets the general registers.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<(), VmError> {
        self.fd.set_regs(regs).map_err(VmError::Vcpu)
    }

    /// Runs the vCPU until its next exit.
    pub fn run(&mut self) -> Result<Exit, VmError> {
        match self.fd.run().map_err(VmError::Run)? {
            VcpuExit::IoOut(port, data) => {
                let mut bytes = [0u8; 4];
                bytes[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                Ok(Exit::Out { port, value: u32::from_le_bytes(bytes) })
            }
            VcpuExit::Shutdown => Ok(Exit::Shutdown),
            other => Ok(Exit::Other(format!("{other:?}"))),
        }
    }
}
