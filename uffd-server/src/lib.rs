//! A userfaultfd lazy-restore memory server for microVM snapshots.
//!
//! A VMM attaches guest memory over a Unix socket with Firecracker's UFFD handshake; the server
//! serves every page fault from snapshots it holds, and prefetches a learned working set ahead
//! of the guest. Data flow, one module each (`docs/design.md` draws it):
//!
//! - [`server`] accepts connections (one socket per snapshot) and runs each VM on a thread;
//! - [`vm`]: [`vm::handshake`] → [`memory::regions`] → [`vm::fault_loop`], which drives the stages
//!   [`vm::demand`], [`vm::prefetcher`] and [`vm::learner`];
//! - [`memory`]: a file range becomes host [`memory::pieces`], placed by one
//!   [`memory::placer`] through [`memory::uffd_io`], the only module issuing uffd ioctls;
//! - [`source`]: where bytes come from ([`source::PageSource`]: RAM, disk, a loading-set
//!   batch), shared through the [`source::store`];
//! - [`plan_cache`] keeps each snapshot's plan, [`registry`] every VM's record, [`control`]
//!   answers `stats`, [`metrics`] serves Prometheus, [`stats`] defines the counters and
//!   histograms, [`config`] the configuration, [`sockets`] who can reach the server;
//! - [`recovery`]: each VM journaled, and taken back by a successor after a crash or handover.

#![warn(missing_docs)]

pub mod addr;
pub mod config;
pub mod control;
pub mod log_limit;
pub mod memory;
pub mod metrics;
pub mod plan_cache;
pub mod recovery;
pub mod registry;
pub mod server;
pub mod sockets;
pub mod source;
pub mod stats;
pub mod vm;
