//! A userfaultfd lazy-restore memory server for microVM snapshots.
//!
//! A VMM attaches guest memory over a Unix socket with Firecracker's UFFD handshake; the server
//! serves every page fault from snapshot memory held in RAM. Data flow, one module each:
//! [`handshake`] → [`regions`] → [`fault_loop`] → page source ([`snapshot`], shared through the
//! [`store`]); [`uffd_io`] is the only module that issues userfaultfd ioctls.

pub mod addr;
pub mod control;
pub mod fault_loop;
pub mod handshake;
pub mod placer;
pub mod regions;
pub mod removed;
pub mod server;
pub mod snapshot;
pub mod stats;
pub mod store;
pub mod uffd_io;
