//! Guest programs, assembled for CPL3 (iced-x86's assembler: readable, and checked at build).
//!
//! `checksum_pages`: for each guest address in a list (`rdi` = list, `rsi` = count), reads the
//! qword there and folds it into a checksum; reports it as two `out`s to [`PORT_RESULT`] (low,
//! then high half) and signals [`PORT_DONE`]. The host computes the same fold from the memory
//! file ([`fold`]): a wrong page served to the guest is a wrong checksum.

use iced_x86::code_asm::*;

pub const PORT_RESULT: u16 = 0x11;
pub const PORT_DONE: u16 = 0x12;

/// The checksum the guest computes: `sum = rotl(sum, 5) ^ value` over the values in order.
pub fn fold(values: impl IntoIterator<Item = u64>) -> u64 {
    values.into_iter().fold(0, |sum, v| sum.rotate_left(5) ^ v)
}

/// Machine code of the checksum loop, to be placed at guest address `at`.
pub fn checksum_pages(at: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut next = a.create_label();
    let mut report = a.create_label();
    a.xor(r8, r8)?;
    a.test(rsi, rsi)?;
    a.jz(report)?;
    a.set_label(&mut next)?;
    a.mov(rax, qword_ptr(rdi))?;
    a.mov(rdx, qword_ptr(rax))?;
    a.rol(r8, 5)?;
    a.xor(r8, rdx)?;
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
    let mut spin = a.create_label();
    a.set_label(&mut spin)?;
    a.jmp(spin)?; // never reached: the VMM stops at DONE
    a.assemble(at)
}
