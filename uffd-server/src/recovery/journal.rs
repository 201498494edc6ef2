//! The per-VM journal: what a successor needs to take a VM back after this process is gone.
//!
//! One file per attached VM in the journal directory (tmpfs: it must outlive the process, not
//! the machine — the VMs do not outlive the machine either). The first line is the VM's
//! [`JournalHeader`], written under a random temp name and renamed into place, so a reader
//! never sees half of it; each later line is one range the VMM removed, appended with a single
//! `write` before anything is placed after it. A process killed mid-append leaves at most a
//! last line without its newline, which readers ignore: that REMOVE had not been acted on.
//! The file is removed when the VM ends; a VM whose journal could not be kept is never
//! recovered (a missing REMOVE would serve snapshot bytes where the guest expects zeros).
//!
//! Beside each journal, its events file ([`super::events_file`]): the buffer the fault loop
//! reads the uffd into. A REMOVE read but not appended yet when the process died is there, and
//! a reader adds it to the journal's.

use super::events_file::{self, EventsFile};
use crate::addr::{FileOffset, HostAddr, PageSize};
use crate::memory::regions::Region;
use prefetch::identity::SnapshotIdentity;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Version of the journal's lines; a journal of another version is not recovered.
pub const JOURNAL_FORMAT: u32 = 1;

const SUFFIX: &str = ".journal";

/// Everything about a VM that a successor cannot learn from the VMM itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalHeader {
    /// [`JOURNAL_FORMAT`].
    pub format: u32,
    /// The snapshot it was restored from, and which bytes that name held then.
    pub snapshot: String,
    /// The snapshot's identity: a successor serving other bytes under the name must not serve
    /// this VM.
    pub identity: SnapshotIdentity,
    /// The VMM's pid, and its start time (clock ticks after boot, `/proc/PID/stat`): together
    /// they name one process even after the pid is reused.
    pub peer_pid: i32,
    /// See `peer_pid`.
    pub peer_start_ticks: u64,
    /// The uffd's (device, inode): the VMM's copy is found by it, and only it is taken.
    pub uffd: (u64, u64),
    /// The regions, as host address, size, file offset and page size in bytes.
    pub regions: Vec<[u64; 4]>,
}

impl JournalHeader {
    /// The regions, as the handshake gave them (validated again by the successor).
    pub fn regions(&self) -> Result<Vec<Region>, JournalError> {
        self.regions
            .iter()
            .map(|&[host, size, offset, page]| {
                let page_size = PageSize::from_bytes(page).ok_or(JournalError::Invalid("a region's page size"))?;
                Ok(Region { host: HostAddr(host), size, file_offset: FileOffset(offset), page_size })
            })
            .collect()
    }

    /// The regions in the header's form.
    pub fn encode_regions(regions: &[Region]) -> Vec<[u64; 4]> {
        regions.iter().map(|r| [r.host.0, r.size, r.file_offset.0, r.page_size.bytes()]).collect()
    }

    /// The journal's file name: one VMM's one uffd.
    fn file_name(&self) -> String {
        format!("vm-{}-{}{SUFFIX}", self.peer_pid, self.uffd.1)
    }
}

/// A journal line after the header.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    /// `[start, end)` host addresses the VMM removed.
    Removed([u64; 2]),
}

/// Why a journal could not be written or read.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum JournalError {
    #[error("journal directory {0}: {1}")]
    Dir(PathBuf, String),
    #[error("journal {0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("journal {path}, line {line}: {why}")]
    Parse { path: PathBuf, line: usize, why: String },
    #[error("journal {path} is of format {found}, this server reads {JOURNAL_FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("journal header: invalid {0}")]
    Invalid(&'static str),
}

/// The journal directory.
#[derive(Clone, Debug)]
pub struct JournalDir {
    dir: PathBuf,
}

impl JournalDir {
    /// Creates the directory (0700) or checks the one there: ours, writable by nobody else, not
    /// a symlink — whoever could write a journal could make a successor serve a process.
    pub fn open(dir: &Path) -> Result<JournalDir, JournalError> {
        crate::sockets::prepare_dir(dir, crate::sockets::Access::Owner)
            .map_err(|e| JournalError::Dir(dir.into(), e.to_string()))?;
        Ok(JournalDir { dir: dir.into() })
    }

    /// Where the journals are.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Starts the journal of a VM attaching now: its events file, then its header in place,
    /// each atomically.
    pub fn create(&self, header: &JournalHeader) -> Result<VmJournal, JournalError> {
        let path = self.dir.join(header.file_name());
        let events_path = events_file::path_beside(&path);
        let events = EventsFile::create(&self.dir, &events_path).map_err(|e| JournalError::Io(events_path, e))?;
        let io_err = |e| JournalError::Io(path.clone(), e);
        let mut line = serde_json::to_vec(header).map_err(|e| io_err(io::Error::other(e)))?;
        line.push(b'\n');
        // Replaces the journal of an earlier VM with the same pid and uffd inode: that VM
        // ended (its VMM's uffd is gone), and a journal left behind would be stale.
        let file = super::create_whole(&self.dir, &path, &line).map_err(io_err)?;
        Ok(VmJournal { path, file: Some(file), events })
    }

    /// Opens the journal of a VM taken over from a predecessor, to append to it, and its
    /// events file to read into (made anew if the predecessor had none).
    pub fn reopen(&self, path: &Path) -> Result<VmJournal, JournalError> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| JournalError::Io(path.into(), e))?;
        let events_path = events_file::path_beside(path);
        let events = match EventsFile::open(&events_path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => EventsFile::create(&self.dir, &events_path),
            opened => opened,
        }
        .map_err(|e| JournalError::Io(events_path, e))?;
        Ok(VmJournal { path: path.into(), file: Some(file), events })
    }

    /// Removes the journal at `path` (of a VM that is gone) and its events file.
    pub fn discard(&self, path: &Path) {
        discard(path);
    }

    /// Reads the journal at `path`.
    pub fn read(&self, path: &Path) -> Result<JournalRead, JournalError> {
        read(path)
    }

    /// Every journal in the directory, read (a file that cannot be read is reported with its
    /// error); temp files of a write cut short, and events files without a journal, are removed.
    pub fn scan(&self) -> Result<Vec<ScannedJournal>, JournalError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| JournalError::Io(self.dir.clone(), e))?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let cut_short = name.starts_with(".vm-") && name.ends_with(".tmp");
            let orphan =
                || events_file::is_events_file(&path) && !path.with_extension(SUFFIX.trim_start_matches('.')).exists();
            if cut_short || orphan() {
                let _ = std::fs::remove_file(&path);
            } else if name.ends_with(SUFFIX) {
                let read = read(&path);
                found.push((path, read));
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }
}

/// A journal file found by [`JournalDir::scan`], and what reading it came to.
pub type ScannedJournal = (PathBuf, Result<JournalRead, JournalError>);

/// A journal as read back.
#[derive(Debug)]
pub struct JournalRead {
    /// The VM.
    pub header: JournalHeader,
    /// The ranges its VMM removed, in the order they were journaled.
    pub removed: Vec<(HostAddr, HostAddr)>,
    /// Ranges removed that are in the VM's events file and not in its journal: read by a
    /// process that died before journaling them. To be journaled before the next read into
    /// the events file overwrites them.
    pub read_not_journaled: Vec<(HostAddr, HostAddr)>,
}

/// The journal first: an events file alone is never read.
fn discard(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(events_file::path_beside(path));
}

fn read(path: &Path) -> Result<JournalRead, JournalError> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| JournalError::Io(path.into(), e))?;
    let mut text = String::new();
    io::Read::read_to_string(&mut file, &mut text).map_err(|e| JournalError::Io(path.into(), e))?;
    // Only complete lines count: a last line without its newline was cut by a kill.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    let mut lines = complete.lines().enumerate();
    let parse_error = |line: usize, why: String| JournalError::Parse { path: path.into(), line: line + 1, why };
    let (_, first) = lines.next().ok_or_else(|| parse_error(0, "no header line".into()))?;
    let header: JournalHeader = serde_json::from_str(first).map_err(|e| parse_error(0, e.to_string()))?;
    if header.format != JOURNAL_FORMAT {
        return Err(JournalError::Format { path: path.into(), found: header.format });
    }
    let mut removed = Vec::new();
    for (index, line) in lines {
        match serde_json::from_str(line).map_err(|e| parse_error(index, e.to_string()))? {
            Line::Removed([start, end]) => removed.push((HostAddr(start), HostAddr(end))),
        }
    }
    let events_path = events_file::path_beside(path);
    let mut read_not_journaled =
        events_file::removed_ranges(&events_path).map_err(|e| JournalError::Io(events_path, e))?.unwrap_or_default();
    read_not_journaled.retain(|range| !removed.contains(range));
    read_not_journaled.dedup();
    Ok(JournalRead { header, removed, read_not_journaled })
}

/// One VM's journal, open for appending, with its events file.
#[derive(Debug)]
pub struct VmJournal {
    path: PathBuf,
    /// None once a write failed: the file is gone and nothing more is written.
    file: Option<File>,
    events: EventsFile,
}

impl VmJournal {
    /// Appends a removed range. On failure the journal is deleted — a successor must never
    /// recover this VM without the range — and the error returned.
    pub fn note_removed(&mut self, start: HostAddr, end: HostAddr) -> Result<(), JournalError> {
        let mut line =
            serde_json::to_vec(&Line::Removed([start.0, end.0])).map_err(|e| self.fail(io::Error::other(e)))?;
        line.push(b'\n');
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        // One write: a line either is in the file whole, or (killed mid-way) lacks its newline.
        match file.write(&line) {
            Ok(n) if n == line.len() => Ok(()),
            Ok(_) => Err(self.fail(io::Error::other("short write"))),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Whether the journal is still kept (no write failed).
    pub fn is_kept(&self) -> bool {
        self.file.is_some()
    }

    /// The buffer to read the VM's uffd into: its events file.
    pub fn read_buffer(&mut self) -> &mut [u8] {
        self.events.read_buffer()
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The VM ended: its journal goes.
    pub fn remove(mut self) {
        self.delete();
    }

    fn fail(&mut self, e: io::Error) -> JournalError {
        self.delete();
        JournalError::Io(self.path.clone(), e)
    }

    fn delete(&mut self) {
        self.file = None;
        discard(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(pid: i32) -> JournalHeader {
        JournalHeader {
            format: JOURNAL_FORMAT,
            snapshot: "fn".into(),
            identity: SnapshotIdentity { len: 1 << 20, fingerprint: 7 },
            peer_pid: pid,
            peer_start_ticks: 42,
            uffd: (9, 1234),
            regions: vec![[0x7f00_0000_0000, 1 << 20, 0, 4096]],
        }
    }

    #[test]
    fn a_journal_reads_back_with_its_removed_ranges_and_a_cut_line_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = JournalDir::open(&tmp.path().join("journal")).unwrap();
        let mut journal = dir.create(&header(10)).unwrap();
        journal.note_removed(HostAddr(0x1000), HostAddr(0x3000)).unwrap();
        journal.note_removed(HostAddr(0x8000), HostAddr(0x9000)).unwrap();
        // A kill in the middle of an append: no newline.
        std::fs::OpenOptions::new().append(true).open(journal.path()).unwrap().write_all(b"{\"removed\":[1").unwrap();
        let found = dir.scan().unwrap();
        assert_eq!(found.len(), 1);
        let read = found[0].1.as_ref().unwrap();
        assert_eq!(read.header, header(10));
        assert_eq!(read.removed, vec![(HostAddr(0x1000), HostAddr(0x3000)), (HostAddr(0x8000), HostAddr(0x9000))]);
        assert_eq!(read.header.regions().unwrap()[0].size, 1 << 20);
        journal.remove();
        assert!(dir.scan().unwrap().is_empty());
    }

    /// A REMOVE as the kernel writes it into the read buffer (`struct uffd_msg`).
    fn remove_msg(start: u64, end: u64) -> [u8; 32] {
        let mut msg = [0u8; 32];
        msg[0] = 0x15; // UFFD_EVENT_REMOVE
        msg[8..16].copy_from_slice(&start.to_ne_bytes());
        msg[16..24].copy_from_slice(&end.to_ne_bytes());
        msg
    }

    #[test]
    fn a_remove_read_and_not_journaled_is_found_in_the_events_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = JournalDir::open(&tmp.path().join("journal")).unwrap();
        let mut journal = dir.create(&header(14)).unwrap();
        // An older read's REMOVE, journaled; the last read's, not (the process died).
        journal.read_buffer()[..32].copy_from_slice(&remove_msg(0x1000, 0x3000));
        journal.note_removed(HostAddr(0x1000), HostAddr(0x3000)).unwrap();
        journal.read_buffer()[32..64].copy_from_slice(&remove_msg(0x8000, 0xa000));
        let path = journal.path().to_path_buf();
        drop(journal); // killed: nothing more is written
        let read = dir.read(&path).unwrap();
        assert_eq!(read.removed, vec![(HostAddr(0x1000), HostAddr(0x3000))]);
        assert_eq!(read.read_not_journaled, vec![(HostAddr(0x8000), HostAddr(0xa000))]);
        // The successor reads into the same file: what was in it must be journaled first.
        let mut reopened = dir.reopen(&path).unwrap();
        assert_eq!(reopened.read_buffer()[32..64], remove_msg(0x8000, 0xa000), "the same file, mapped again");
        reopened.remove();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "journal and events file are gone");
    }

    #[test]
    fn an_events_file_without_its_journal_is_cleaned_up() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = JournalDir::open(&tmp.path().join("journal")).unwrap();
        let journal = dir.create(&header(15)).unwrap();
        // Killed between the events file and the header: the events file is alone.
        std::fs::remove_file(journal.path()).unwrap();
        assert!(dir.scan().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the lone events file is removed");
    }

    #[test]
    fn a_damaged_or_foreign_journal_is_an_error_naming_the_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = JournalDir::open(&tmp.path().join("journal")).unwrap();
        let journal = dir.create(&header(11)).unwrap();
        std::fs::OpenOptions::new().append(true).open(journal.path()).unwrap().write_all(b"garbage\n").unwrap();
        let mut newer = header(12);
        newer.format = 99;
        dir.create(&newer).unwrap();
        std::fs::write(dir.path().join(".vm-abc.tmp"), b"half").unwrap();
        let found = dir.scan().unwrap();
        let errors: Vec<String> = found.iter().map(|(_, r)| r.as_ref().unwrap_err().to_string()).collect();
        assert!(errors[0].contains("vm-11-1234.journal, line 2"), "{}", errors[0]);
        assert!(errors[1].contains("format 99"), "{}", errors[1]);
        assert!(!dir.path().join(".vm-abc.tmp").exists(), "a cut header write is cleaned up");
    }

    #[test]
    fn a_symlinked_journal_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = JournalDir::open(&tmp.path().join("journal")).unwrap();
        let target = tmp.path().join("elsewhere");
        std::fs::write(&target, serde_json::to_string(&header(13)).unwrap() + "\n").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("vm-13-1.journal")).unwrap();
        let found = dir.scan().unwrap();
        assert!(found[0].1.is_err(), "a symlink is refused");
        assert!(dir.reopen(&dir.path().join("vm-13-1.journal")).is_err());
    }
}
