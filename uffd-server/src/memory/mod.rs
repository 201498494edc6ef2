//! A VM's memory and placing bytes into it: where each region sits ([`regions`]), which host
//! pieces hold a file range ([`pieces`]), one placement path for every caller ([`placer`]), and
//! the only userfaultfd ioctls ([`uffd_io`]).

pub mod pieces;
pub mod placer;
pub mod regions;
pub mod uffd_io;
