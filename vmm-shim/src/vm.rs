//! A KVM VM with one vCPU over guest memory mapped by the VMM. Guest-physical addresses are
//! file offsets: regions back to back from 0, as Firecracker lays out guests below 3 GiB.

use crate::guest;
use crate::memory::GuestMemory;
use kvm_bindings::{kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm or create the VM: {0}")]
    Create(kvm_ioctls::Error),
    #[error("cannot add guest memory region {index}: {source}")]
    Memory { index: usize, source: kvm_ioctls::Error },
    #[error("cannot set up the vCPU: {0}")]
    Vcpu(kvm_ioctls::Error),
    #[error("KVM_RUN failed: {0}")]
    Run(kvm_ioctls::Error),
}

/// Why the vCPU stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `out` to `port` with the value (1, 2 or 4 bytes, zero-extended).
    Out {
        port: u16,
        value: u32,
    },
    /// A triple fault: the guest hit an exception (it has no handlers).
    Shutdown,
    Other(String),
}

pub struct Vm {
    _vm: VmFd,
    vcpu: VcpuFd,
}

impl Vm {
    /// A VM over `memory`, its vCPU in CPL3 long mode (see [`guest`]).
    pub fn new(memory: &GuestMemory) -> Result<Vm, VmError> {
        let vm = Kvm::new().and_then(|kvm| kvm.create_vm()).map_err(VmError::Create)?;
        for (index, region) in memory.regions.iter().enumerate() {
            let slot = kvm_userspace_memory_region {
                slot: index as u32,
                guest_phys_addr: region.file_offset as u64,
                memory_size: region.size as u64,
                userspace_addr: region.addr as u64,
                flags: 0,
            };
            // SAFETY: the region is mapped for as long as `memory` lives, which the caller keeps
            // beyond this VM (its fields drop the VM first); KVM only accesses it while running.
            unsafe { vm.set_user_memory_region(slot) }.map_err(|source| VmError::Memory { index, source })?;
        }
        let vcpu = vm.create_vcpu(0).map_err(VmError::Vcpu)?;
        let mut sregs = vcpu.get_sregs().map_err(VmError::Vcpu)?;
        guest::set_cpl3_long_mode(&mut sregs);
        vcpu.set_sregs(&sregs).map_err(VmError::Vcpu)?;
        Ok(Vm { _vm: vm, vcpu })
    }

    pub fn regs(&self) -> Result<kvm_regs, VmError> {
        self.vcpu.get_regs().map_err(VmError::Vcpu)
    }

    pub fn set_regs(&self, regs: &kvm_regs) -> Result<(), VmError> {
        self.vcpu.set_regs(regs).map_err(VmError::Vcpu)
    }

    /// Runs the vCPU until its next exit.
    pub fn run(&mut self) -> Result<Exit, VmError> {
        match self.vcpu.run().map_err(VmError::Run)? {
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
