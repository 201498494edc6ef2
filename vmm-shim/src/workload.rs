//! The guest's workload: programs assembled for CPL3 (iced-x86's assembler: readable, checked
//! when built) and the working sets they touch, deterministic from a seed.
//!
//! - *Runtime init* (`init_program`): fills `init` bytes of the heap (from `guest::DATA`) with
//!   xorshift64 output, like an interpreter's heap after start-up, and leaves the rest zero;
//!   then signals [`PORT_READY`]: the snapshot point.
//! - *Invocation* (`invoke_program`): for each guest address in a list the VMM puts in the
//!   mailbox (`rdi` = list, `rsi` = count), reads the qword there into a checksum and, for
//!   every fourth page, writes the running checksum into the page's second qword (a write
//!   fault, content the checksum never reads). After each page it computes: `rdx` rounds of
//!   xorshift64 on the checksum (the function's own work, which background prefetch can
//!   overlap with). Signals [`PORT_STARTED`] first. Reports the checksum with two `out`s to
//!   [`PORT_RESULT`] (low, high) and signals [`PORT_DONE`]. The host computes the same fold
//!   from the memory file ([`fold`]): a wrong page served to the guest is a wrong checksum.

use crate::guest::DATA;
use crate::image::{ImageSpec, Runtime};
use iced_x86::code_asm::*;
use serde::{Deserialize, Serialize};

/// Runtime init is done: the snapshot is taken here.
pub const PORT_READY: u16 = 0x10;
/// An invocation's checksum (two 32-bit halves).
pub const PORT_RESULT: u16 = 0x11;
/// An invocation is done.
pub const PORT_DONE: u16 = 0x12;
/// The invocation's first instruction: lets the VMM time "first guest instruction".
pub const PORT_STARTED: u16 = 0x13;
const PAGE: u64 = 4096;
/// Working sets are made of runs of this many contiguous pages (heaps have locality).
const CHUNK_PAGES: u64 = 8;

/// The checksum an invocation computes: `sum = rotl(sum, 5) ^ value` over the values in order,
/// each step followed by `rounds` rounds of xorshift64 on `sum`.
pub fn fold(values: impl IntoIterator<Item = u64>, rounds: u64) -> u64 {
    values.into_iter().fold(0, |sum, v| (0..rounds).fold(sum.rotate_left(5) ^ v, |x, _| xorshift(x)))
}

/// xorshift64: the guest's init generator (the host mirrors it to check a snapshot).
pub fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// What the guest does; every knob settable, with presets.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Guest memory size.
    pub mem_mib: u64,
    /// MiB of heap written by runtime init.
    pub init_mib: u64,
    /// Pages one invocation touches.
    pub ws_pages: u64,
    /// Fraction of an invocation's working set shared by all inputs.
    pub shared_fraction: f64,
    /// Rounds of xorshift64 the invocation computes after each page it touches (~2.5 ns each
    /// here): the function's work, between memory accesses as in a real function.
    pub compute_rounds: u64,
    /// Seeds the heap's contents and the working sets' order.
    pub seed: u64,
    /// The heap is a runtime image ([`crate::image`]) instead of xorshift noise; `init_mib` is
    /// then the image's size.
    pub image: Option<ImageSpec>,
}

impl Workload {
    /// `hello` (tiny), `python-like` (37 MiB heap, as measured for Python by SnapFaaS),
    /// `node-like` (40 MiB): heaps of xorshift noise, the incompressible worst case.
    /// `python-image` and `node-image`: heaps that are a real runtime's memory
    /// ([`crate::image`]), of function `function` (0: the runtime alone). None computes: an
    /// invocation is pure memory access unless `compute_rounds` is set.
    pub fn preset(name: &str, function: u16) -> Option<Workload> {
        let (mem_mib, init_mib, ws_pages, runtime) = match name {
            "hello" => (64, 4, 256, None),
            "python-like" => (128, 37, 4096, None),
            "node-like" => (256, 40, 6144, None),
            "python-image" => (128, 0, 2048, Some(Runtime::Python)),
            "node-image" => (256, 0, 4096, Some(Runtime::Node)),
            _ => return None,
        };
        let image = runtime.map(|runtime| ImageSpec { runtime, function });
        Some(Workload { mem_mib, init_mib, ws_pages, shared_fraction: 0.7, compute_rounds: 0, seed: 1, image })
    }

    /// Guest memory size in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }

    /// Guest addresses input `input` touches, in order: the shared chunks in a fixed order
    /// (a few swapped per input), input-specific chunks inserted at input-specific places.
    pub fn invocation_pages(&self, input: u64) -> Vec<u64> {
        let heap_chunks = ((self.init_mib << 20) / PAGE / CHUNK_PAGES).max(1);
        let want = crate::usize_of(self.ws_pages.div_ceil(CHUNK_PAGES).min(heap_chunks));
        let mut order: Vec<u64> = (0..heap_chunks).collect();
        shuffle(&mut order, self.seed);
        let shared = crate::share(want, self.shared_fraction);
        let (common, rest) = order.split_at(shared);
        let mut chunks = common.to_vec();
        let mut rng = self.seed ^ input.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut pool = rest.to_vec();
        for _ in shared..want {
            if pool.is_empty() {
                break;
            }
            rng = xorshift(rng);
            let pick = pool.swap_remove(below(rng, pool.len()));
            rng = xorshift(rng);
            chunks.insert(below(rng, chunks.len() + 1), pick);
        }
        for _ in 0..chunks.len() / 16 {
            // Partly shuffled order: a few swaps per input.
            rng = xorshift(rng);
            let (a, b) = (below(rng, chunks.len()), below(rng >> 32, chunks.len()));
            chunks.swap(a, b);
        }
        chunks.iter().flat_map(|c| (c * CHUNK_PAGES..(c + 1) * CHUNK_PAGES).map(|p| DATA + p * PAGE)).collect()
    }
}

fn shuffle(values: &mut [u64], seed: u64) {
    let mut rng = seed | 1;
    for i in (1..values.len()).rev() {
        rng = xorshift(rng);
        values.swap(i, below(rng, i + 1));
    }
}

/// A random index below `n` (> 0) from random bits `rng`.
fn below(rng: u64, n: usize) -> usize {
    crate::usize_of(rng % n as u64)
}

/// Runtime init: `rdi` = first address, `rsi` = qwords to write, `rdx` = seed (non-zero).
pub fn init_program(at: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut next = a.create_label();
    let mut ready = a.create_label();
    a.mov(rax, rdx)?;
    a.test(rsi, rsi)?;
    a.jz(ready)?;
    a.set_label(&mut next)?;
    xorshift_in_place(&mut a, rax, rcx)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.add(rdi, 8)?;
    a.dec(rsi)?;
    a.jnz(next)?;
    a.set_label(&mut ready)?;
    a.mov(dx, PORT_READY as u32)?;
    a.out(dx, al)?;
    spin(&mut a)?;
    a.assemble(at)
}

/// An invocation: `rdi` = list of guest addresses, `rsi` = count, `rdx` = compute rounds per page.
pub fn invoke_program(at: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut next = a.create_label();
    let mut skip_write = a.create_label();
    let mut compute = a.create_label();
    let mut computed = a.create_label();
    let mut report = a.create_label();
    a.mov(r10, rdx)?;
    a.mov(dx, PORT_STARTED as u32)?;
    a.out(dx, al)?;
    a.xor(r8, r8)?;
    a.xor(r9, r9)?; // index
    a.test(rsi, rsi)?;
    a.jz(report)?;
    a.set_label(&mut next)?;
    a.mov(rax, qword_ptr(rdi))?;
    a.mov(rdx, qword_ptr(rax))?;
    a.rol(r8, 5)?;
    a.xor(r8, rdx)?;
    a.mov(rcx, r10)?;
    a.test(rcx, rcx)?;
    a.jz(computed)?;
    a.set_label(&mut compute)?;
    xorshift_in_place(&mut a, r8, r11)?;
    a.dec(rcx)?;
    a.jnz(compute)?;
    a.set_label(&mut computed)?;
    a.test(r9, 3)?;
    a.jnz(skip_write)?;
    a.mov(qword_ptr(rax + 8), r8)?;
    a.set_label(&mut skip_write)?;
    a.inc(r9)?;
    a.add(rdi, 8)?;
    a.dec(rsi)?;
    a.jnz(next)?;
    a.set_label(&mut report)?;
    a.mov(dx, PORT_RESULT as u32)?;
    a.mov(eax, r8d)?;
    a.out(dx, eax)?;
    a.mov(rax, r8)?;
    a.shr(rax, 32)?;
    a.out(dx, eax)?;
    a.mov(dx, PORT_DONE as u32)?;
    a.out(dx, al)?;
    spin(&mut a)?;
    a.assemble(at)
}

/// xorshift64 of `x` in place, `scratch` clobbered: x ^= x << 13; x ^= x >> 7; x ^= x << 17.
fn xorshift_in_place(a: &mut CodeAssembler, x: AsmRegister64, scratch: AsmRegister64) -> Result<(), IcedError> {
    for (shift_left, by) in [(true, 13), (false, 7), (true, 17)] {
        a.mov(scratch, x)?;
        if shift_left {
            a.shl(scratch, by)?;
        } else {
            a.shr(scratch, by)?;
        }
        a.xor(x, scratch)?;
    }
    Ok(())
}

/// Never reached: the VMM stops the vCPU at the signal before.
fn spin(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut here = a.create_label();
    a.set_label(&mut here)?;
    a.jmp(here)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_folds_compute_rounds_after_each_value() {
        assert_eq!(fold([3, 5], 0), 3u64.rotate_left(5) ^ 5);
        assert_eq!(fold([3, 5], 2), xorshift(xorshift(xorshift(xorshift(3)).rotate_left(5) ^ 5)));
    }

    #[test]
    fn working_sets_share_their_core_and_differ_by_input() {
        let w = Workload { shared_fraction: 0.7, ..Workload::preset("python-like", 0).expect("preset") };
        let (a, b) = (w.invocation_pages(1), w.invocation_pages(2));
        assert_eq!(a.len(), 4096);
        assert_eq!(a, w.invocation_pages(1), "deterministic");
        let common = a.iter().filter(|p| b.contains(p)).count();
        assert!((2800..=3400).contains(&common), "about 70% shared: {common}");
        let heap_end = DATA + (37 << 20);
        assert!(a.iter().all(|&p| (DATA..heap_end).contains(&p) && p % PAGE == 0));
        let stable = Workload { shared_fraction: 1.0, ..w };
        let set = |v: Vec<u64>| v.into_iter().collect::<std::collections::BTreeSet<_>>();
        assert_eq!(set(stable.invocation_pages(1)), set(stable.invocation_pages(2)));
    }
}
