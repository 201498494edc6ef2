//! The buffer a VM's fault loop reads its uffd events into: a shared mapping of a file beside
//! the VM's journal, so that what a `read` took off the uffd outlives the process that took it.
//!
//! Why: the kernel counts a REMOVE delivered when it is read, and lets the VMM's `madvise` go
//! on to drop the pages. A process killed between that `read` and the journal append loses
//! the REMOVE, and a successor would serve snapshot bytes where the guest expects zeros. That
//! window is not the µs of an append: the `read` wakes the VMM's thread, which may preempt the
//! reader on a busy CPU and hold it there for milliseconds (`tests/restart.rs` hit it with 16
//! VMs on 2 cores). Reading into this file closes it: `read(2)` takes an event off the queue
//! and copies it into the buffer in one syscall, and a kill cannot land between the two, so
//! every event read is either still queued or in the file. A successor adds the REMOVEs it
//! finds here to the journal's; adding one twice changes nothing, since a removed range stays
//! removed for the VM's life.
//!
//! The pages are written once and locked (`mlock`), so the kernel's copy never faults: a copy
//! that faulted while the process is being killed could fail and lose the event. On tmpfs (the
//! journal directory's place) a written page stays writable; elsewhere writeback could make
//! the copy fault again.

use crate::addr::HostAddr;
use crate::memory::uffd_io::{UffdEvent, MSG_LEN};
use memmap2::MmapMut;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// Events read at once.
pub const EVENTS_PER_READ: usize = 64;

/// The file's size: one page, holding the read buffer.
const FILE_LEN: usize = 4096;

const _: () = assert!(EVENTS_PER_READ * MSG_LEN <= FILE_LEN);

/// One VM's read buffer, mapped from its file.
#[derive(Debug)]
pub struct EventsFile {
    map: MmapMut,
}

impl EventsFile {
    /// A zeroed file at `path` (written under a random name in `dir` and renamed there, so a
    /// reader never sees part of it), mapped and locked.
    pub(super) fn create(dir: &Path, path: &Path) -> io::Result<EventsFile> {
        Self::map(&super::create_whole(dir, path, &[0u8; FILE_LEN])?)
    }

    /// The file at `path` of a VM taken over, mapped and locked; it must be one this server
    /// wrote (its size), and not a symlink.
    pub(super) fn open(path: &Path) -> io::Result<EventsFile> {
        let file = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
        if file.metadata()?.len() != FILE_LEN as u64 {
            return Err(io::Error::other(format!("{} is not {FILE_LEN} bytes long", path.display())));
        }
        Self::map(&file)
    }

    fn map(file: &std::fs::File) -> io::Result<EventsFile> {
        // SAFETY: the file is this server's own (created or checked above, in a directory only
        // it may write); nothing else truncates it while it is mapped, so the mapping stays
        // backed. Its bytes are only ever read as plain bytes.
        let mut map = unsafe { MmapMut::map_mut(file)? };
        // Write every page once, so that the kernel's copy into it never takes a write fault.
        for page in map.chunks_mut(4096) {
            page[0] = std::hint::black_box(page[0]);
        }
        if let Err(e) = map.lock() {
            static WARNED: Once = Once::new();
            WARNED.call_once(|| tracing::warn!("cannot lock the events files in memory ({e}): under memory pressure a REMOVE read as the server is killed could be lost"));
        }
        Ok(EventsFile { map })
    }

    /// The buffer to `read` the uffd into.
    pub fn read_buffer(&mut self) -> &mut [u8] {
        &mut self.map[..EVENTS_PER_READ * MSG_LEN]
    }
}

/// The ranges removed (REMOVE, UNMAP) among the events in the file at `path`: those of the
/// last read, and older ones the reads since did not overwrite (all journaled already, and
/// harmless to add again). None if there is no such file (a journal of an older server).
pub(super) fn removed_ranges(path: &Path) -> io::Result<Option<Vec<(HostAddr, HostAddr)>>> {
    let bytes = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) {
        Ok(mut file) => {
            let mut bytes = Vec::with_capacity(FILE_LEN);
            io::Read::read_to_end(&mut file, &mut bytes)?;
            bytes
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if bytes.len() != FILE_LEN {
        return Err(io::Error::other(format!("{} is {} bytes long, not {FILE_LEN}", path.display(), bytes.len())));
    }
    let ranges = bytes
        .chunks_exact(MSG_LEN)
        .filter_map(UffdEvent::decode)
        .filter_map(|event| match event {
            UffdEvent::Remove { start, end } | UffdEvent::Unmap { start, end } => Some((start, end)),
            _ => None,
        })
        .collect();
    Ok(Some(ranges))
}

const EXTENSION: &str = "events";

/// Where the events file of the journal at `journal` is.
pub(super) fn path_beside(journal: &Path) -> PathBuf {
    journal.with_extension(EXTENSION)
}

/// Whether `path` names an events file.
pub(super) fn is_events_file(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == EXTENSION)
}
