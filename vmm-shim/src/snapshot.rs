//! `vmm-shim snapshot`: boot the guest, run its runtime init to READY, and save it as
//! Firecracker does: a memory file with the guest's regions back to back (written sparse: zero
//! pages are holes) and a small versioned state file.

use crate::guest::{boot_structures, cpl3_regs, CODE, DATA};
use crate::memory::{x86_layout, Backing, GuestMemory};
use crate::vm::{Exit, Vm, VmError};
use crate::workload::{init_program, invoke_program, Workload, PORT_READY};
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Where the invocation program lives (the init program is at `CODE`).
pub const INVOKE: u64 = CODE + 0x1000;
/// The state file's first eight bytes.
pub const STATE_MAGIC: [u8; 8] = *b"VMMSHIM\0";
/// 4: the workload's `image`.
pub const STATE_VERSION: u32 = 4;

/// What a restore needs besides memory: the workload and the vCPU state at READY.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// The function the guest runs.
    pub workload: Workload,
    /// rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8..r15, rip, rflags at READY.
    pub regs: [u64; 18],
    /// cr0, cr3, cr4, efer at READY. The segment registers are the guest model's
    /// (`guest::set_cpl3_long_mode`): a CPL3 guest cannot change them.
    pub control: [u64; 4],
}

/// Why a snapshot could not be taken or read.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum SnapshotError {
    #[error("guest memory: {0}")]
    Memory(io::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("assembling the guest: {0}")]
    Assemble(String),
    #[error("the guest did not reach READY: it stopped with {0:?}")]
    NotReady(Exit),
    #[error("writing {0}: {1}")]
    Write(String, io::Error),
    #[error("state file {0}: {1}")]
    State(String, String),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error("the runtime image is {image_mib} MiB: it does not fit a {mem_mib} MiB guest's heap")]
    ImageTooLarge { image_mib: u64, mem_mib: u64 },
}

/// Boots `workload` to READY and writes `dir/mem` and `dir/state`.
pub fn take(workload: &Workload, dir: &Path) -> Result<VmState, SnapshotError> {
    let mut workload = *workload;
    let len = crate::usize_of(workload.mem_bytes());
    let layout = x86_layout(len);
    let memory = GuestMemory::map_regions(&layout, 0, Backing::Anonymous).map_err(SnapshotError::Memory)?;
    let top = layout.iter().map(|r| r.guest_addr + r.size).max().unwrap_or(0);
    for (at, bytes) in boot_structures(top as u64) {
        memory.write_at(crate::usize_of(at), &bytes).map_err(SnapshotError::Memory)?;
    }
    let assemble = |e: iced_x86::IcedError| SnapshotError::Assemble(e.to_string());
    let (code, invoke) = (init_program(CODE).map_err(assemble)?, invoke_program(INVOKE).map_err(assemble)?);
    memory.write_at(crate::usize_of(CODE), &code).map_err(SnapshotError::Memory)?;
    memory.write_at(crate::usize_of(INVOKE), &invoke).map_err(SnapshotError::Memory)?;
    let mut vm = Vm::new(&memory)?;
    let vcpu = vm.vcpu(0);
    let mut regs = cpl3_regs(CODE, 0);
    let mut heap_bytes = (workload.init_mib << 20).min(len as u64 - DATA);
    if let Some(spec) = workload.image {
        // The runtime image is the heap: init writes nothing more.
        let heap = crate::image::guest_heap(spec)?;
        let image_mib = (heap.len() as u64).div_ceil(1 << 20);
        if DATA + (image_mib << 20) > len as u64 {
            return Err(SnapshotError::ImageTooLarge { image_mib, mem_mib: workload.mem_mib });
        }
        memory.write_at(crate::usize_of(DATA), &heap).map_err(SnapshotError::Memory)?;
        (workload.init_mib, heap_bytes) = (image_mib, 0);
    }
    (regs.rdi, regs.rsi, regs.rdx) = (DATA, heap_bytes / 8, workload.seed | 1);
    vcpu.set_regs(&regs)?;
    match vcpu.run()? {
        Exit::Out { port: PORT_READY, .. } => {}
        other => return Err(SnapshotError::NotReady(other)),
    }
    let r = vcpu.regs()?;
    let sregs = vcpu.sregs()?;
    let control = [sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer];
    let regs = [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
        r.rip, r.rflags,
    ];
    drop(vm);
    std::fs::create_dir_all(dir).map_err(|e| SnapshotError::Write(dir.display().to_string(), e))?;
    write_memory_file(&memory, &dir.join("mem"))?;
    let state = VmState { workload, regs, control };
    write_state(&dir.join("state"), &state)?;
    Ok(state)
}

/// Regions back to back; zero pages are left as holes (a sparse file), written atomically.
/// Only resident pages are looked at: the rest of fresh anonymous memory is zero.
fn write_memory_file(memory: &GuestMemory, path: &Path) -> Result<(), SnapshotError> {
    let err = |e| SnapshotError::Write(path.display().to_string(), e);
    let tmp = temp_file_beside(path).map_err(err)?;
    let file = tmp.as_file();
    file.set_len(memory.len() as u64).map_err(err)?;
    for (i, region) in memory.regions.iter().enumerate() {
        let resident = memory.resident_pages(i).map_err(SnapshotError::Memory)?;
        for (p, page) in memory.region_bytes(i).chunks(4096).enumerate() {
            if resident[p] && page.iter().any(|&b| b != 0) {
                file.write_all_at(page, (region.file_offset + p * 4096) as u64).map_err(err)?;
            }
        }
    }
    persist(tmp, path).map_err(err)
}

fn write_state(path: &Path, state: &VmState) -> Result<(), SnapshotError> {
    let err = |e: String| SnapshotError::State(path.display().to_string(), e);
    let mut bytes = STATE_MAGIC.to_vec();
    bytes.extend_from_slice(&STATE_VERSION.to_le_bytes());
    bytes.extend(postcard::to_stdvec(state).map_err(|e| err(e.to_string()))?);
    let mut tmp = temp_file_beside(path).map_err(|e| err(e.to_string()))?;
    tmp.write_all(&bytes).map_err(|e| err(e.to_string()))?;
    persist(tmp, path).map_err(|e| err(e.to_string()))
}

/// A file to fill and then [`persist`] as `path`: in the same directory, under a random name,
/// created exclusively (a name an attacker could guess, or a symlink planted there, is never
/// opened).
fn temp_file_beside(path: &Path) -> io::Result<tempfile::NamedTempFile> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    tempfile::Builder::new().prefix(".snapshot.").suffix(".tmp").tempfile_in(dir)
}

/// Makes `tmp` durable and renames it to `path`: readers see the old file or the new one.
fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> io::Result<()> {
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Reads `dir/state`; a wrong magic, version or encoding is named.
pub fn read_state(path: &Path) -> Result<VmState, SnapshotError> {
    let err = |e: String| SnapshotError::State(path.display().to_string(), e);
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if bytes.len() < 12 || bytes[..8] != STATE_MAGIC {
        return Err(err("not a vmm-shim state file".into()));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != STATE_VERSION {
        return Err(err(format!("version {version} is not supported (this build reads {STATE_VERSION})")));
    }
    postcard::from_bytes(&bytes[12..]).map_err(|e| err(format!("corrupt: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_written_under_a_fresh_name_and_a_planted_symlink_is_not_followed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").expect("victim");
        // Where an older build wrote its temp file: a symlink planted there must not be written through.
        std::os::unix::fs::symlink(&victim, dir.path().join("state.tmp")).expect("symlink");
        let state = VmState {
            workload: Workload::preset("python-image", 3).expect("preset"),
            regs: [7; 18],
            control: [1, 2, 3, 4],
        };
        let path = dir.path().join("state");
        write_state(&path, &state).expect("write");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"keep");
        let back = read_state(&path).expect("read");
        assert_eq!(back, state);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        names.sort();
        assert_eq!(names, ["state", "state.tmp", "victim"], "no temp file is left behind");
    }
}
