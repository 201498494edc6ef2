//! Firecracker's UFFD handshake: one message on a Unix stream socket carrying a JSON array of
//! guest regions and the userfaultfd as an SCM_RIGHTS ancillary fd.
//!
//! Everything here is untrusted input. Each refusal names what was wrong (the field, the region
//! index) so that a VMM author can fix their side from one log line; the caller closes that one
//! connection and the server goes on serving everyone else.

use crate::addr::{FileOffset, HostAddr, PageSize};
use crate::memory::regions::Region;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde_json::Value;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Largest handshake accepted. Firecracker's own example handler reads at most 1 KiB; a VM with
/// hundreds of regions would still fit in 64 KiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Most fds one SCM_RIGHTS message can carry (Linux `SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// A handshake as received: the VMM's regions (unvalidated against the snapshot) and its uffd.
#[derive(Debug)]
pub struct Handshake {
    /// The regions in the VMM's order.
    pub regions: Vec<Region>,
    /// The VM's userfaultfd.
    pub uffd: OwnedFd,
    /// Which userfaultfd it is: every uffd has an inode of its own, so two fds with the same
    /// identity are the same uffd.
    pub uffd_identity: (u64, u64),
}

/// `UFFD_FEATURE_EVENT_REMOVE`: without it, ranges the guest gives back (balloon, free-page
/// reporting) would be served again from the snapshot instead of as zeros.
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;

/// Why a handshake was refused; the message names the field or region.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum HandshakeError {
    #[error("no handshake message before the timeout")]
    Timeout,
    #[error("receiving the handshake message failed: {0}")]
    Receive(nix::Error),
    #[error("empty handshake: the connection closed before any message")]
    Empty,
    #[error("handshake message is larger than {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
    #[error("the handshake's ancillary data was truncated (more than one file descriptor?)")]
    ControlTruncated,
    #[error("handshake carried no file descriptor: the userfaultfd must come as SCM_RIGHTS")]
    NoFd,
    #[error("handshake carried {0} file descriptors; expected exactly one, the userfaultfd")]
    TooManyFds(usize),
    #[error("the handshake's file descriptor is not a userfaultfd (it is {0})")]
    NotUffd(String),
    #[error("the userfaultfd was created without UFFD_FEATURE_EVENT_REMOVE (features {0:#x}): ranges the guest gives back would be served from the snapshot again")]
    NoEventRemove(u64),
    #[error("cannot inspect the userfaultfd: {0}")]
    Inspect(String),
    #[error("handshake JSON is invalid: {0}")]
    InvalidJson(#[from] serde_json::Error),
    #[error("handshake JSON must be an array of regions, got {0}")]
    NotAnArray(&'static str),
    #[error("region {index}: must be a JSON object")]
    RegionNotObject { index: usize },
    #[error("region {index}: field `{field}` is missing")]
    MissingField { index: usize, field: &'static str },
    #[error("region {index}: field `{field}` must be an unsigned integer, got {value}")]
    NotUnsigned { index: usize, field: &'static str, value: String },
    #[error("region {index}: neither `page_size` nor `page_size_kib` is present")]
    MissingPageSize { index: usize },
    #[error("region {index}: `page_size` ({page_size}) and `page_size_kib` ({page_size_kib}) disagree")]
    PageSizeMismatch { index: usize, page_size: u64, page_size_kib: u64 },
    #[error("region {index}: page size {bytes} is not supported (only 4096 and 2097152)")]
    UnsupportedPageSize { index: usize, bytes: u64 },
}

/// Receives and parses one handshake from `stream`. The read timeout set on `stream` bounds it.
pub fn receive(stream: &UnixStream) -> Result<Handshake, HandshakeError> {
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
    let (mut len, fds) = receive_with_fds(stream.as_raw_fd(), &mut buf)?;
    let uffd = match fds.len() {
        0 => return Err(HandshakeError::NoFd),
        1 => fds.into_iter().next().ok_or(HandshakeError::NoFd)?,
        n => return Err(HandshakeError::TooManyFds(n)),
    };
    check_is_userfaultfd(&uffd)?;
    let uffd_identity = check_features(&uffd)?;
    // One sendmsg of a large message can arrive in several pieces (the fds come with the
    // first): read on while the JSON is merely incomplete.
    let regions = loop {
        match parse_regions(&buf[..len]) {
            Err(HandshakeError::InvalidJson(e)) if e.is_eof() && len < MAX_MESSAGE_BYTES => {
                match std::io::Read::read(&mut &*stream, &mut buf[len..]) {
                    Ok(0) => return Err(HandshakeError::InvalidJson(e)),
                    Ok(n) => len += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Err(HandshakeError::Timeout),
                    Err(e) => {
                        return Err(HandshakeError::Receive(nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0))))
                    }
                }
            }
            Err(HandshakeError::InvalidJson(e)) if e.is_eof() => return Err(HandshakeError::TooLarge),
            other => break other?,
        }
    };
    Ok(Handshake { regions, uffd, uffd_identity })
}

/// One `recvmsg`: Firecracker sends the whole handshake in a single `sendmsg`.
fn receive_with_fds(fd: RawFd, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), HandshakeError> {
    let mut iov = [IoSliceMut::new(buf)];
    // Room for every fd one message can carry (the kernel's SCM_MAX_FD): with less, a peer
    // sending more would truncate the control data, and the fds received before the cut
    // could not be owned and closed (nix refuses to parse a truncated buffer).
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let msg = match recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
        Ok(msg) => msg,
        Err(nix::errno::Errno::EAGAIN) => return Err(HandshakeError::Timeout),
        Err(e) => return Err(HandshakeError::Receive(e)),
    };
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(HandshakeError::Receive)? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: SCM_RIGHTS installed these fds in our table for us alone; owning them at
            // once guarantees that extra or refused fds are closed, never leaked.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(HandshakeError::ControlTruncated);
    }
    let len = msg.bytes;
    if len == 0 && fds.is_empty() {
        return Err(HandshakeError::Empty);
    }
    Ok((len, fds))
}

/// A uffd is an anonymous inode named `[userfaultfd]`, whether made by the syscall or by
/// /dev/userfaultfd. Checking the name refuses pipes, files and sockets before any ioctl.
fn check_is_userfaultfd(fd: &OwnedFd) -> Result<(), HandshakeError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("unknown: {e}"));
    if link == "anon_inode:[userfaultfd]" {
        Ok(())
    } else {
        Err(HandshakeError::NotUffd(link))
    }
}

/// Checks the uffd's features (`/proc/self/fdinfo`: `API:\tapi:features:ioctls`, hex) and
/// returns its identity (device, inode).
fn check_features(fd: &OwnedFd) -> Result<(u64, u64), HandshakeError> {
    let inspect = |e: &dyn std::fmt::Display| HandshakeError::Inspect(e.to_string());
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).map_err(|e| inspect(&e))?;
    let features = info
        .lines()
        .find_map(|line| line.strip_prefix("API:"))
        .and_then(|api| api.trim().split(':').nth(1))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or_else(|| inspect(&"no API line in its fdinfo"))?;
    if features & UFFD_FEATURE_EVENT_REMOVE == 0 {
        return Err(HandshakeError::NoEventRemove(features));
    }
    let stat = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| inspect(&e))?;
    Ok((stat.st_dev, stat.st_ino))
}

/// Parses the JSON region list. Unknown fields are ignored: newer Firecracker versions may add
/// some, and refusing them would break compatibility for nothing.
pub fn parse_regions(json: &[u8]) -> Result<Vec<Region>, HandshakeError> {
    let value: Value = serde_json::from_slice(json)?;
    let Value::Array(items) = value else {
        return Err(HandshakeError::NotAnArray(json_kind(&value)));
    };
    items.iter().enumerate().map(|(index, item)| parse_region(index, item)).collect()
}

fn parse_region(index: usize, item: &Value) -> Result<Region, HandshakeError> {
    let Value::Object(fields) = item else {
        return Err(HandshakeError::RegionNotObject { index });
    };
    let field = |name: &'static str| -> Result<Option<u64>, HandshakeError> {
        match fields.get(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| HandshakeError::NotUnsigned {
                index,
                field: name,
                value: v.to_string(),
            }),
        }
    };
    let required = |name: &'static str| field(name)?.ok_or(HandshakeError::MissingField { index, field: name });
    let host = required("base_host_virt_addr")?;
    let size = required("size")?;
    let offset = required("offset")?;
    // `page_size_kib` is deprecated and, despite its name, holds bytes; old VMMs send only it.
    let bytes = match (field("page_size")?, field("page_size_kib")?) {
        (Some(page_size), Some(page_size_kib)) if page_size != page_size_kib => {
            return Err(HandshakeError::PageSizeMismatch { index, page_size, page_size_kib })
        }
        (Some(bytes), _) | (None, Some(bytes)) => bytes,
        (None, None) => return Err(HandshakeError::MissingPageSize { index }),
    };
    let page_size = PageSize::from_bytes(bytes).ok_or(HandshakeError::UnsupportedPageSize { index, bytes })?;
    Ok(Region { host: HostAddr(host), size, file_offset: FileOffset(offset), page_size })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_firecracker_regions_with_either_page_size_field() {
        let json = br#"[
            {"base_host_virt_addr": 140000000000000, "size": 8192, "offset": 0, "page_size": 4096, "page_size_kib": 4096},
            {"base_host_virt_addr": 140000000100000, "size": 2097152, "offset": 8192, "page_size_kib": 2097152, "future": 1}
        ]"#;
        let regions = parse_regions(json).expect("valid");
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].page_size, PageSize::Base);
        assert_eq!(regions[1].page_size, PageSize::Huge);
        assert_eq!(regions[1].file_offset, FileOffset(8192));
    }

    #[test]
    fn names_the_field_that_is_wrong() {
        let err = |json: &str| parse_regions(json.as_bytes()).unwrap_err().to_string();
        assert!(err(r#"{"size": 1}"#).contains("must be an array of regions, got an object"));
        assert!(err(r#"[7]"#).contains("region 0: must be a JSON object"));
        assert!(err(r#"[{"size": 4096, "offset": 0, "page_size": 4096}]"#)
            .contains("region 0: field `base_host_virt_addr` is missing"));
        assert!(err(r#"[{"base_host_virt_addr": 0, "size": -1, "offset": 0, "page_size": 4096}]"#)
            .contains("region 0: field `size` must be an unsigned integer, got -1"));
        assert!(err(r#"[{"base_host_virt_addr": 0, "size": 4096, "offset": 0}]"#)
            .contains("neither `page_size` nor `page_size_kib`"));
        assert!(err(r#"[{"base_host_virt_addr": 0, "size": 4096, "offset": 0, "page_size": 8192}]"#)
            .contains("page size 8192 is not supported"));
        assert!(err(
            r#"[{"base_host_virt_addr": 0, "size": 4096, "offset": 0, "page_size": 4096, "page_size_kib": 2097152}]"#
        )
        .contains("disagree"));
        assert!(err("[{").contains("handshake JSON is invalid"));
    }
}
