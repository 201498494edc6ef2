//! Runtime images: guest heaps built from the memory of a real `python3` or `node` process, so
//! that snapshots compress and deduplicate as a language runtime's memory does (xorshift noise
//! does neither).
//!
//! How an image is made: the runtime is started on the host with address randomisation off
//! (`setarch -R`, and `--random-seed` for V8, `PYTHONHASHSEED=0` for Python), imports its
//! function's modules and builds its function's data, then says `ready` and waits. Every
//! readable mapping (`/proc/PID/maps`: the interpreter, its libraries, heap, stacks, anonymous
//! arenas) that the runtime touched is read from `/proc/PID/mem` and laid into the guest heap
//! page-aligned, in address order: a file's mapping whole, anonymous memory from its first to
//! its last resident page (`/proc/PID/pagemap`) with pages never touched left zero. An image
//! depends on the runtime and its files, not on what the page cache happens to hold.
//!
//! A *function* is the runtime plus an import set and a small app. It is snapshotted as if after
//! restoring the runtime's snapshot: its heap starts as the runtime's image, a mapping the
//! runtime had (same start address, which randomisation being off makes stable) is written over
//! the runtime's copy in place, and what is new (mappings, growth) goes after the runtime's
//! image. Functions therefore share the runtime's layout, as guests restored from one snapshot do.

use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};

const PAGE: u64 = 4096;
/// A mapping larger than this is only read up to it (V8 reserves gigabytes it never touches).
const MAX_MAPPING: u64 = 256 << 20;

/// Which runtime an image is taken from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Runtime {
    /// CPython 3 (`python3`).
    Python,
    /// Node.js (`node`).
    Node,
}

/// A runtime, and the function on top of it (0: the runtime alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// The runtime.
    pub runtime: Runtime,
    /// The function: an import set and an app; 0 is the bare runtime after start-up.
    pub function: u16,
}

/// One mapping's bytes, from its first to its last resident page.
#[derive(Debug)]
struct Segment {
    /// Its first byte's address in the process.
    start: u64,
    bytes: Vec<u8>,
}

/// Modules each Python function imports (function N uses entry (N - 1) mod len, and N scales
/// the data its app builds).
const PYTHON_IMPORTS: &[&str] = &[
    "json, re",
    "collections, itertools, functools, json",
    "decimal, fractions, statistics",
    "email.message, email.parser",
    "http.client, urllib.parse",
    "xml.etree.ElementTree",
    "sqlite3",
    "asyncio",
    "csv, io, datetime",
    "hashlib, hmac, base64",
];

const NODE_REQUIRES: &[&str] = &[
    "http",
    "crypto",
    "zlib",
    "url",
    "events,stream",
    "fs,path",
    "util,os",
    "dns,net",
    "querystring",
    "assert,buffer",
];

impl ImageSpec {
    /// The command that starts this runtime and function, printing `ready` when it is set up.
    fn command(&self) -> Command {
        let n = u64::from(self.function);
        let mut command = Command::new("setarch");
        command.arg("-R");
        match self.runtime {
            Runtime::Python => {
                let mut script = String::from("import sys, os\n");
                if self.function > 0 {
                    let imports = PYTHON_IMPORTS[pick(n, PYTHON_IMPORTS.len())];
                    script += &format!("import {imports}\n");
                    script += &format!("data = {{('k%d' % i): [i, str(i) * 3] for i in range({})}}\n", 2000 * n);
                }
                script += "print('ready', flush=True)\nsys.stdin.read()\n";
                command.args(["python3", "-c", &script]).env("PYTHONHASHSEED", "0");
            }
            Runtime::Node => {
                let mut script = String::new();
                if self.function > 0 {
                    for module in NODE_REQUIRES[pick(n, NODE_REQUIRES.len())].split(',') {
                        script += &format!("require('{module}');\n");
                    }
                    script += &format!(
                        "globalThis.data = Array.from({{length: {}}}, (_, i) => ({{k: 'k' + i, v: [i, String(i).repeat(3)]}}));\n",
                        2000 * n
                    );
                }
                script += "console.log('ready');\nprocess.stdin.resume();\n";
                command.args(["node", "--random-seed=1", "-e", &script]);
            }
        }
        command
    }
}

fn pick(function: u64, len: usize) -> usize {
    crate::usize_of((function - 1) % len as u64)
}

/// Why an image could not be taken.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum ImageError {
    #[error("cannot start {runtime:?} (is it installed? `./x setup` installs python3 and nodejs): {source}")]
    Start { runtime: Runtime, source: io::Error },
    #[error("{runtime:?} did not get ready: {detail}")]
    NotReady { runtime: Runtime, detail: String },
    #[error("reading the memory of {runtime:?} (pid {pid}): {source}")]
    Read { runtime: Runtime, pid: u32, source: io::Error },
}

/// The guest heap bytes of `spec`: the runtime's image, with the function's laid over it.
pub fn guest_heap(spec: ImageSpec) -> Result<Vec<u8>, ImageError> {
    let runtime = capture(ImageSpec { function: 0, ..spec })?;
    let mut layout = Vec::new();
    let mut heap = Vec::new();
    for segment in &runtime {
        layout.push((segment.start, segment.bytes.len(), heap.len()));
        append_page_aligned(&mut heap, &segment.bytes);
    }
    if spec.function == 0 {
        return Ok(heap);
    }
    for segment in capture(spec)? {
        let same = layout.iter().find(|(start, _, _)| *start == segment.start);
        let in_place = same.map_or(0, |&(_, len, _)| len.min(segment.bytes.len()));
        if let Some(&(_, _, at)) = same {
            heap[at..at + in_place].copy_from_slice(&segment.bytes[..in_place]);
        }
        append_page_aligned(&mut heap, &segment.bytes[in_place..]);
    }
    Ok(heap)
}

fn append_page_aligned(heap: &mut Vec<u8>, bytes: &[u8]) {
    heap.extend_from_slice(bytes);
    heap.resize(crate::usize_of((heap.len() as u64).next_multiple_of(PAGE)), 0);
}

/// Starts the runtime, waits for `ready`, reads its memory and lets it exit.
fn capture(spec: ImageSpec) -> Result<Vec<Segment>, ImageError> {
    with_ready(spec, read_segments)
}

/// Starts the runtime, waits for `ready`, runs `read` on its pid and lets it exit.
fn with_ready<T>(spec: ImageSpec, read: impl FnOnce(u32) -> io::Result<T>) -> Result<T, ImageError> {
    let runtime = spec.runtime;
    let mut child = spec
        .command()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Start { runtime, source })?;
    let result = wait_ready(&mut child, runtime)
        .and_then(|()| read(child.id()).map_err(|source| ImageError::Read { runtime, pid: child.id(), source }));
    drop(child.stdin.take()); // end of input: the runtime exits
    if child.wait().is_err() {
        child.kill().ok();
    }
    result
}

fn wait_ready(child: &mut Child, runtime: Runtime) -> Result<(), ImageError> {
    let mut line = String::new();
    let stdout = child.stdout.take().ok_or_else(|| ImageError::NotReady { runtime, detail: "no stdout".into() })?;
    BufReader::new(stdout).read_line(&mut line).map_err(|e| ImageError::NotReady { runtime, detail: e.to_string() })?;
    if line.trim() == "ready" {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut stderr).ok();
    }
    Err(ImageError::NotReady { runtime, detail: format!("printed {line:?}, stderr: {}", stderr.trim()) })
}

/// Every readable mapping of `pid` that it touched, in address order: a file's mapping whole (up
/// to the file's end), anonymous memory from its first to its last resident page.
///
/// Which pages of a file's mapping are mapped depends on what the page cache holds (fault-around
/// maps the cached pages near a fault, in folios of whatever size they were read in), so an
/// image trimmed to them would change with the cache. What anonymous memory holds is what the
/// runtime touched; pages it never touched are left zero, as in a guest.
fn read_segments(pid: u32) -> io::Result<Vec<Segment>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut segments = Vec::new();
    for line in maps.lines() {
        let Some(mapping) = Mapping::parse(line) else { continue };
        // [vvar]/[vsyscall] are not readable through /proc/PID/mem; skip what is not readable.
        if !mapping.readable || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (start, end) = (mapping.start, mapping.end.min(mapping.start + MAX_MAPPING));
        let present = present_pages(&pagemap, start, end)?;
        let (Some(first), Some(last)) = (present.iter().position(|&p| p), present.iter().rposition(|&p| p)) else {
            continue;
        };
        let file_pages = mapping.file_bytes().map(|bytes| crate::usize_of(bytes.min(end - start).div_ceil(PAGE)));
        let (first, last) = file_pages.filter(|&pages| pages > last).map_or((first, last), |pages| (0, pages - 1));
        let first_byte = start + first as u64 * PAGE;
        let mut bytes = vec![0u8; (last + 1 - first) * crate::usize_of(PAGE)];
        if mem.read_exact_at(&mut bytes, first_byte).is_err() {
            continue;
        }
        if file_pages.is_none() {
            for (page, resident) in bytes.chunks_mut(crate::usize_of(PAGE)).zip(&present[first..]) {
                if !resident {
                    page.fill(0);
                }
            }
        }
        segments.push(Segment { start: first_byte, bytes });
    }
    Ok(segments)
}

/// One line of `/proc/PID/maps`.
struct Mapping<'a> {
    start: u64,
    end: u64,
    readable: bool,
    /// Where in its file the mapping starts.
    offset: u64,
    /// The file mapped, if it is one (anonymous memory has none, or a `[name]`).
    file: Option<&'a str>,
}

impl<'a> Mapping<'a> {
    fn parse(line: &'a str) -> Option<Mapping<'a>> {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let readable = fields.next()?.starts_with('r');
        let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
        let file = fields.nth(2).filter(|path| path.starts_with('/'));
        Some(Mapping {
            start: u64::from_str_radix(start, 16).ok()?,
            end: u64::from_str_radix(end, 16).ok()?,
            readable,
            offset,
            file,
        })
    }

    /// How many bytes of the mapping its file backs, for a file that is still there.
    fn file_bytes(&self) -> Option<u64> {
        let len = std::fs::metadata(self.file?).ok()?.len();
        Some(len.saturating_sub(self.offset))
    }
}

/// Which pages of `[start, end)` are resident, from `/proc/PID/pagemap` (bit 63: present,
/// bit 62: swapped).
fn present_pages(pagemap: &std::fs::File, start: u64, end: u64) -> io::Result<Vec<bool>> {
    let mut entries = vec![0u8; crate::usize_of((end - start) / PAGE * 8)];
    pagemap.read_exact_at(&mut entries, start / PAGE * 8)?;
    let present = |entry: &[u8]| u64::from_le_bytes(entry.try_into().unwrap_or_default()) & (3 << 62) != 0;
    Ok(entries.chunks(8).map(present).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_python_function_shares_the_runtime_layout() {
        let runtime = guest_heap(ImageSpec { runtime: Runtime::Python, function: 0 }).expect("runtime image");
        let function = guest_heap(ImageSpec { runtime: Runtime::Python, function: 3 }).expect("function image");
        assert!(runtime.len() > 4 << 20, "a python process maps more than 4 MiB: {}", runtime.len());
        assert!(function.len() >= runtime.len());
        let pages = |b: &[u8]| b.chunks(4096).map(<[u8]>::to_vec).collect::<Vec<_>>();
        let (r, f) = (pages(&runtime), pages(&function));
        let same = r.iter().zip(&f).filter(|(a, b)| a == b).count();
        // The interpreter and its libraries are the same bytes at the same place.
        assert!(same * 2 > r.len(), "{same} of {} runtime pages unchanged in the function", r.len());
        assert!(f.iter().any(|p| p.iter().any(|&b| b != 0)));
    }

    #[test]
    fn an_image_does_not_depend_on_what_the_page_cache_holds() {
        let spec = ImageSpec { runtime: Runtime::Python, function: 0 };
        let warm = guest_heap(spec).expect("image with the runtime's files cached");
        // Drop the runtime's files from the page cache (what other processes map stays).
        let maps = with_ready(spec, |pid| std::fs::read_to_string(format!("/proc/{pid}/maps"))).expect("runtime");
        for path in maps.lines().filter_map(|line| Mapping::parse(line)?.file) {
            let file = std::fs::File::open(path).expect("mapped file opens");
            let dont_need = nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED;
            nix::fcntl::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, dont_need).expect("fadvise");
        }
        let cold = guest_heap(spec).expect("image after the cache was dropped");
        assert_eq!(cold.len(), warm.len(), "the layout moved");
        let pages = warm.len() / 4096;
        let differ = warm.chunks(4096).zip(cold.chunks(4096)).filter(|(a, b)| a != b).count();
        // Two runs' anonymous memory differs in ~2% of pages (reference counts and such); a layout
        // moved by a page would differ in most pages after it.
        assert!(differ * 20 < pages, "{differ} of {pages} pages differ");
    }
}
