//! `vmm-shim restore`: a snapshot restored with memory from one of three backends, then
//! invocations, each checksum checked against the memory file — a wrong page served to the
//! guest fails the restore, loudly.

use crate::guest::{cpl3_regs, mailbox, MAILBOX_BYTES, MAX_VCPUS};
use crate::memory::{x86_layout, Backing, GuestMemory};
use crate::snapshot::{read_state, SnapshotError, INVOKE};
use crate::uffd_backend::UffdAttachment;
use crate::vm::{Exit, Vcpu, Vm, VmError};
use crate::workload::{fold, Workload, PORT_DONE, PORT_RESULT, PORT_STARTED};
use serde::Serialize;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Where guest memory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MemBackend {
    /// Anonymous memory served by a uffd memory server (Firecracker's `Uffd` backend).
    Uffd,
    /// MAP_PRIVATE of the memory file (Firecracker's `File` backend).
    File,
    /// The whole memory file read into memory before the guest runs (SnapFaaS).
    Copy,
}

/// One invocation as timed and checked.
#[derive(Debug, Serialize)]
pub struct Invocation {
    /// The input it ran on.
    pub input: u64,
    /// The vCPU it ran on.
    pub vcpu: u64,
    /// Pages it touched.
    pub pages: usize,
    /// Its duration, from its first instruction to DONE.
    pub us: f64,
    /// Page faults the vCPU thread took during the invocation (minor + major, getrusage).
    pub faults: u64,
    /// The checksum the guest computed (checked against the memory file).
    pub checksum: u64,
}

/// A restore, phase by phase (`vmm-shim restore --json`).
#[derive(Debug, Serialize)]
pub struct RestoreReport {
    /// The memory backend used.
    pub backend: MemBackend,
    /// Guest memory size.
    pub mem_mib: u64,
    /// Mapping guest memory (for `copy`, the whole read).
    pub memory_us: f64,
    /// The Firecracker handshake with the memory server (`uffd` only).
    pub handshake_us: f64,
    /// The VMM's own load time before the vCPUs (`--vmm-load-ms`).
    pub vmm_load_us: f64,
    /// Creating the VM and its vCPUs.
    pub vm_create_us: f64,
    /// From the start of the restore until the first invocation's first instruction ran.
    pub first_instruction_us: f64,
    /// Every invocation, in order.
    pub invocations: Vec<Invocation>,
    /// The guest heap right after the first invocation (`uffd` backend, one vCPU).
    pub heap: Option<HeapUse>,
    /// The whole restore.
    pub total_us: f64,
}

/// Heap pages in the guest's memory after its first invocation, against those it touched:
/// with the `uffd` backend, resident means placed by the server, so the difference is what it
/// placed for nothing (prefetch, and fault-around neighbours) — the memory a policy costs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct HeapUse {
    /// Heap pages (guest-physical ≥ `DATA`) resident (`mincore`).
    pub resident_pages: u64,
    /// Heap pages the invocation touched.
    pub touched_pages: u64,
    /// Resident heap pages the invocation did not touch.
    pub untouched_resident_pages: u64,
}

/// Counts the heap pages resident in `memory` and how many of them `input`'s invocation touched.
fn heap_use(memory: &GuestMemory, workload: &Workload, input: u64) -> io::Result<HeapUse> {
    let page = crate::memory::PAGE as u64;
    let touched: std::collections::HashSet<u64> =
        workload.invocation_pages(input).iter().map(|addr| addr / page).collect();
    let mut heap = HeapUse { resident_pages: 0, touched_pages: touched.len() as u64, untouched_resident_pages: 0 };
    for (index, region) in memory.regions.iter().enumerate() {
        for (offset, resident) in memory.resident_pages(index)?.into_iter().enumerate() {
            let guest_page = (region.guest_addr / crate::memory::PAGE + offset) as u64;
            if resident && guest_page * page >= crate::guest::DATA {
                heap.resident_pages += 1;
                heap.untouched_resident_pages += u64::from(!touched.contains(&guest_page));
            }
        }
    }
    Ok(heap)
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum RestoreError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("memory file {0}: {1}")]
    MemoryFile(String, io::Error),
    #[error("guest memory ({backend:?} backend): {source}")]
    Memory { backend: MemBackend, source: io::Error },
    #[error("--mem-backend uffd needs --uffd-socket")]
    NoSocket,
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("invocation of input {input} touches {pages} pages; the mailbox holds {max}")]
    TooManyPages { input: u64, pages: usize, max: usize },
    #[error("invocation of input {input} stopped with {exit:?} before DONE")]
    GuestStopped { input: u64, exit: Exit },
    #[error("invocation of input {input}: the guest computed {got:#018x}, the memory file says {expected:#018x}: a wrong page was served")]
    WrongChecksum { input: u64, got: u64, expected: u64 },
}

/// What to restore and how.
pub struct RestoreOptions<'a> {
    /// Where guest memory comes from.
    pub backend: MemBackend,
    /// The memory server's socket (`uffd` backend).
    pub socket: Option<&'a Path>,
    /// The inputs to invoke the function on, in order.
    pub inputs: &'a [u64],
    /// A guest-physical range (bytes) dropped with MADV_DONTNEED after each invocation.
    pub balloon: Option<(u64, u64)>,
    /// vCPUs running invocations at once (inputs dealt round-robin); 1 or 2.
    pub vcpus: u8,
    /// How long the VMM's own snapshot load takes between guest memory and the vCPUs (see
    /// `vmm-shim restore --vmm-load-ms`); zero: the vCPUs are created at once.
    pub vmm_load: Duration,
}

/// Restores the snapshot in `dir` and runs its invocations, checking each checksum.
pub fn restore(dir: &Path, options: &RestoreOptions<'_>) -> Result<RestoreReport, RestoreError> {
    let RestoreOptions { backend, socket, inputs, balloon, vcpus, vmm_load } = *options;
    if vcpus == 0 || u64::from(vcpus) > MAX_VCPUS || (vcpus > 1 && balloon.is_some()) {
        return Err(RestoreError::Options(format!(
            "--vcpus {vcpus}: 1..={MAX_VCPUS} vCPUs, and --balloon-range only with one"
        )));
    }
    let started = Instant::now();
    let state = read_state(&dir.join("state"))?;
    let mem_path = dir.join("mem");
    let file_err = |e| RestoreError::MemoryFile(mem_path.display().to_string(), e);
    let file = std::fs::File::open(&mem_path).map_err(file_err)?;
    let len = crate::usize_of(state.workload.mem_bytes());
    let mem_err = |source| RestoreError::Memory { backend, source };
    let layout = x86_layout(len);
    let mut handshake_started = None;
    let (memory, attachment) = match backend {
        MemBackend::Uffd => {
            let memory = GuestMemory::map_regions(&layout, 0, Backing::Anonymous).map_err(mem_err)?;
            handshake_started = Some(Instant::now());
            let attachment = UffdAttachment::attach(socket.ok_or(RestoreError::NoSocket)?, &memory).map_err(mem_err)?;
            (memory, Some(attachment))
        }
        MemBackend::File => (GuestMemory::map_regions(&layout, 0, Backing::File(&file)).map_err(mem_err)?, None),
        MemBackend::Copy => {
            let memory = GuestMemory::map_regions(&layout, 0, Backing::Anonymous).map_err(mem_err)?;
            memory.fill_from_file(&file).map_err(file_err)?;
            (memory, None)
        }
    };
    let handshake_us = handshake_started.map_or(0.0, micros);
    let memory_us = micros(started) - handshake_us;
    // What a real VMM does here (restore devices and vCPU state) is not modelled, only its
    // duration: the memory server may already be placing pages.
    let load_started = Instant::now();
    std::thread::sleep(vmm_load);
    let vmm_load_us = micros(load_started);
    let vm_started = Instant::now();
    let mut vm = Vm::with_vcpus(&memory, vcpus)?;
    // The vCPU state at READY: control registers from the state file (the segments are the
    // guest model's), and the general registers (each invocation then sets its entry point).
    for vcpu in vm.vcpus() {
        let mut sregs = vcpu.sregs()?;
        [sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer] = state.control;
        vcpu.set_sregs(&sregs)?;
        let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags] = state.regs;
        let regs = kvm_bindings::kvm_regs {
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
            rsp,
            rbp,
            r8,
            r9,
            r10,
            r11,
            r12,
            r13,
            r14,
            r15,
            rip,
            rflags,
        };
        vcpu.set_regs(&regs)?;
    }
    let vm_create_us = micros(vm_started);
    let mut invocations = Vec::new();
    let mut first_instruction = None;
    let mut heap = None;
    if vcpus == 1 {
        // Ranges that read as zeros now (anonymous memory after a balloon; a file mapping
        // re-reads the file instead).
        let mut zeroed: Vec<(u64, u64)> = Vec::new();
        for &input in inputs {
            let (invocation, started_at) = invoke(vm.vcpu(0), 0, &memory, &state.workload, input)?;
            first_instruction.get_or_insert(started_at);
            if heap.is_none() && backend == MemBackend::Uffd {
                heap = Some(heap_use(&memory, &state.workload, input).map_err(mem_err)?);
            }
            invocations.push((invocation, zeroed.clone()));
            if let Some((start, len)) = balloon {
                memory.dontneed(crate::usize_of(start), crate::usize_of(len)).map_err(mem_err)?;
                if backend != MemBackend::File {
                    zeroed.push((start, len));
                }
            }
        }
    } else {
        // Each vCPU on its own thread, inputs dealt round-robin: concurrent faults on one uffd.
        let (memory, workload) = (&memory, &state.workload);
        let results: Vec<Result<Vec<(Invocation, Instant)>, RestoreError>> = std::thread::scope(|scope| {
            let threads: Vec<_> = vm
                .vcpus()
                .iter_mut()
                .enumerate()
                .map(|(index, vcpu)| {
                    let mine: Vec<u64> = inputs.iter().copied().skip(index).step_by(usize::from(vcpus)).collect();
                    scope.spawn(move || {
                        mine.iter().map(|&input| invoke(vcpu, index as u64, memory, workload, input)).collect()
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|_| Err(RestoreError::Options("a vCPU thread panicked".into()))))
                .collect()
        });
        for result in results {
            for (invocation, started_at) in result? {
                first_instruction = Some(first_instruction.map_or(started_at, |f: Instant| f.min(started_at)));
                invocations.push((invocation, Vec::new()));
            }
        }
        invocations.sort_by_key(|(i, _)| i.input);
    }
    let first_instruction_us = first_instruction.map_or(0.0, |t| t.duration_since(started).as_secs_f64() * 1e6);
    let total_us = micros(started);
    // Drop order matters: the vCPU, then the attachment (hang up, wait for the server), then memory.
    drop(vm);
    drop(attachment);
    drop(memory);
    // Checked after the guest ran: reading the memory file earlier would warm the page cache
    // for the backends that read it (the File backend, an on-disk server).
    for (invocation, zeroed) in &invocations {
        let expected = expected_checksum(&file, &state.workload, invocation.input, zeroed).map_err(file_err)?;
        if invocation.checksum != expected {
            return Err(RestoreError::WrongChecksum { input: invocation.input, got: invocation.checksum, expected });
        }
    }
    let invocations = invocations.into_iter().map(|(invocation, _)| invocation).collect();
    Ok(RestoreReport {
        backend,
        mem_mib: state.workload.mem_mib,
        memory_us,
        handshake_us,
        vmm_load_us,
        vm_create_us,
        first_instruction_us,
        invocations,
        heap,
        total_us,
    })
}

fn invoke(
    vcpu: &mut Vcpu,
    index: u64,
    memory: &GuestMemory,
    workload: &Workload,
    input: u64,
) -> Result<(Invocation, Instant), RestoreError> {
    let pages = workload.invocation_pages(input);
    let max = crate::usize_of(MAILBOX_BYTES / 8);
    if pages.len() > max {
        return Err(RestoreError::TooManyPages { input, pages: pages.len(), max });
    }
    let list: Vec<u8> = pages.iter().flat_map(|p| p.to_le_bytes()).collect();
    memory
        .write_at(crate::usize_of(mailbox(index)), &list)
        .map_err(|source| RestoreError::Memory { backend: MemBackend::Uffd, source })?;
    let started = Instant::now();
    let faults_before = thread_faults();
    let ran =
        run_invocation(vcpu, index, INVOKE, pages.len() as u64, workload.compute_rounds).map_err(|e| match e {
            RunError::Vm(e) => RestoreError::Vm(e),
            RunError::Stopped(exit) => RestoreError::GuestStopped { input, exit },
        })?;
    let us = micros(started);
    let faults = thread_faults().saturating_sub(faults_before);
    Ok((
        Invocation { input, vcpu: index, pages: pages.len(), us, faults, checksum: ran.checksum },
        ran.first_instruction,
    ))
}

/// The checksum input `input` must compute, from the memory file (not from guest memory);
/// `zeroed` ranges read as zeros.
fn expected_checksum(file: &File, workload: &Workload, input: u64, zeroed: &[(u64, u64)]) -> io::Result<u64> {
    let mut word = [0u8; 8];
    let mut values = Vec::new();
    for page in workload.invocation_pages(input) {
        if zeroed.iter().any(|&(start, len)| (start..start + len).contains(&page)) {
            values.push(0);
            continue;
        }
        file.read_exact_at(&mut word, page)?;
        values.push(u64::from_le_bytes(word));
    }
    Ok(fold(values, workload.compute_rounds))
}

/// What an invocation reported.
pub struct Ran {
    /// The checksum the guest reported.
    pub checksum: u64,
    /// When its first instruction ran ([`PORT_STARTED`]).
    pub first_instruction: Instant,
}

/// Why an invocation did not reach DONE.
#[derive(Debug)]
pub enum RunError {
    /// KVM failed.
    Vm(VmError),
    /// The guest stopped before DONE.
    Stopped(Exit),
}

/// Runs the invocation program at `rip` on vCPU number `index` over the `count` page addresses
/// in its mailbox, computing `rounds` per page, until DONE.
pub fn run_invocation(vcpu: &mut Vcpu, index: u64, rip: u64, count: u64, rounds: u64) -> Result<Ran, RunError> {
    let mut regs = cpl3_regs(rip, index);
    (regs.rdi, regs.rsi, regs.rdx) = (mailbox(index), count, rounds);
    vcpu.set_regs(&regs).map_err(RunError::Vm)?;
    let mut first_instruction = Instant::now();
    let mut halves = Vec::new();
    loop {
        match vcpu.run().map_err(RunError::Vm)? {
            Exit::Out { port: PORT_STARTED, .. } => first_instruction = Instant::now(),
            Exit::Out { port: PORT_RESULT, value } => halves.push(u64::from(value)),
            Exit::Out { port: PORT_DONE, .. } if halves.len() == 2 => break,
            exit => return Err(RunError::Stopped(exit)),
        }
    }
    Ok(Ran { checksum: halves[0] | halves[1] << 32, first_instruction })
}

/// Page faults of the calling thread so far (KVM faults guest memory in on the vCPU thread).
fn thread_faults() -> u64 {
    // SAFETY: getrusage fills the zeroed struct it is given and touches nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_THREAD names the calling thread.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return 0;
    }
    u64::try_from(usage.ru_minflt + usage.ru_majflt).unwrap_or(0)
}

fn micros(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e6
}
