//! The guest's fixed memory map and CPU state.
//!
//! kvm_pvm runs guest ring-3 code natively and emulates ring 0 slowly (~5 µs per loop
//! iteration), so the guest has no kernel: the VMM puts the CPU straight into long mode at
//! CPL3 — identity-mapped page tables with 2 MiB pages marked user-accessible, a 64-bit
//! ring-3 code segment, IOPL 3 so that `out` reaches the VMM — and the guest's work runs
//! there. Nothing takes interrupts; any exception ends the guest (a triple fault: shutdown).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

/// Guest-physical map of the first MiB (the VMM's structures); the guest's data starts at 1 MiB.
pub const GDT: u64 = 0x1000;
/// The task-state segment.
pub const TSS: u64 = 0x1800;
/// The top-level page table.
pub const PML4: u64 = 0x2000;
/// The page-directory pointer table.
pub const PDPT: u64 = 0x3000;
/// Up to eight page directories (0x4000..0xc000): 8 GiB of guest-physical space identity-mapped.
pub const PD: u64 = 0x4000;
/// The init program (runtime init, then READY).
pub const CODE: u64 = 0x10000;
/// Free for the VMM to pass arguments (e.g. an invocation's page list), up to `STACK_BOTTOM`.
pub const MAILBOX: u64 = 0x20000;
/// The stack grows down from `STACK_TOP` to here.
pub const STACK_BOTTOM: u64 = 0x70000;
/// The initial stack pointer.
pub const STACK_TOP: u64 = 0x80000;
/// The guest's data (its heap) starts here.
pub const DATA: u64 = 0x10_0000;
/// The highest guest-physical address (exclusive) the page tables can map.
pub const MAX_GUEST_ADDR: u64 = 8 << 30;

const MIB2: u64 = 2 << 20;
/// Present | writable | user.
const TABLE: u64 = 0x7;
/// Present | writable | user | 2 MiB page.
const LARGE_PAGE: u64 = 0x87;

/// The page tables (identity map of `[0, top)`, `top` ≤ 8 GiB: the MMIO gap is mapped too, it
/// is simply never touched) and the GDT, as (guest address, bytes).
pub fn boot_structures(top: u64) -> Vec<(u64, Vec<u8>)> {
    let qwords = |values: &[u64]| values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let gigs = top.min(MAX_GUEST_ADDR).div_ceil(1 << 30);
    let pdpt: Vec<u64> = (0..gigs).map(|g| (PD + g * 0x1000) | TABLE).collect();
    let pds: Vec<u64> = (0..gigs * 512).map(|i| (i * MIB2) | LARGE_PAGE).collect();
    // null, kernel code, kernel data, user code (64-bit, DPL 3), user data (DPL 3), TSS (2 slots)
    let tss_low = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xff) << 56);
    let gdt = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00af_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
        tss_low,
        TSS >> 32,
    ];
    vec![(PML4, qwords(&[PDPT | TABLE])), (PDPT, qwords(&pdpt)), (PD, qwords(&pds)), (GDT, qwords(&gdt))]
}

fn segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode, paging on, and CPL3 segments (selectors of the GDT above, RPL 3).
pub fn set_cpl3_long_mode(sregs: &mut kvm_sregs) {
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
    sregs.efer = 0x500; // LMA | LME
    sregs.cs = segment(0x1b, 0xb, 1, 0);
    let data = segment(0x23, 0x3, 0, 1);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: 0x28,
        type_: 11, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    };
}

/// vCPUs the memory map has room for (a mailbox and a stack each).
pub const MAX_VCPUS: u64 = 2;
const STACK_BYTES: u64 = (STACK_TOP - STACK_BOTTOM) / MAX_VCPUS;
/// Each vCPU's share of the mailbox, in bytes.
pub const MAILBOX_BYTES: u64 = (STACK_BOTTOM - MAILBOX) / MAX_VCPUS;

/// Where vCPU `vcpu` finds its arguments.
pub fn mailbox(vcpu: u64) -> u64 {
    MAILBOX + vcpu * MAILBOX_BYTES
}

/// Registers to start at `rip` on vCPU `vcpu`'s stack, with IOPL 3 (`out` allowed at CPL3).
pub fn cpl3_regs(rip: u64, vcpu: u64) -> kvm_regs {
    kvm_regs { rip, rsp: STACK_TOP - vcpu * STACK_BYTES, rflags: 0x3002, ..Default::default() }
}
