//! A test VMM process that attaches to uffd-server and touches its guest memory slowly, page by
//! page, until it is killed: the victim of the "VMM killed mid-restore" test.
//! Usage: fake-vmm SOCKET SNAPSHOT_BYTES DELAY_US

use e2e::fake_vmm::{touch, FakeVmm};
use std::io::Write;
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 4, "usage: fake-vmm SOCKET SNAPSHOT_BYTES DELAY_US");
    let len: usize = args[2].parse()?;
    let delay = Duration::from_micros(args[3].parse()?);
    let vmm = FakeVmm::attach(args[1].as_ref(), len)?;
    for (i, addr) in vmm.memory.page_addrs().enumerate() {
        touch(addr, false);
        if i == 0 {
            println!("touching");
            std::io::stdout().flush()?;
        }
        std::thread::sleep(delay);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
