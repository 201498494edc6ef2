//! Waiting for a VM's events in a blocking `read` of its uffd, one syscall less per fault than
//! `epoll_wait` and a `read` (experiment 4: on one CPU the wait is most of what the fault loop
//! costs over a raw loop).
//!
//! The uffd says nothing when its VMM dies, and nothing when the server asks its VMs to stop:
//! a thread blocked in its `read` would wait for ever. So one watcher thread, for the whole
//! server, watches each blocked VM's epoll set (its VMM socket, pidfd and the stop signal; the
//! uffd is taken out of it meanwhile) and interrupts the VM's `read` with a signal when it
//! turns ready. The loop then looks at its epoll set as usual.
//!
//! The signal can come just before the `read` starts, where it would be lost: the reader
//! says it is about to read (`in_read`) and then looks at `interrupted`; the watcher sets
//! `interrupted` and then looks at `in_read`, and signals again until the read has returned.
//! One of the two always sees the other.
//!
//! A REMOVE read this way is as safe in a crash as one read after `epoll_wait`: the events
//! are read into the VM's events file (`crate::recovery::events_file`).

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// The signal that interrupts a blocked `read` (its handler does nothing; installed without
/// `SA_RESTART`, so the `read` returns `EINTR`).
const INTERRUPT: Signal = Signal::SIGUSR2;

/// How long the watcher keeps signalling a reader whose `read` has not returned.
const SIGNAL_FOR: Duration = Duration::from_secs(1);

/// The server's watcher: started when the first VM blocks in a `read`.
struct Watcher {
    epoll: Epoll,
    readers: Mutex<HashMap<u64, Arc<Reader>>>,
    next_key: AtomicU64,
}

/// One blocked VM thread, as the watcher knows it.
#[derive(Debug)]
struct Reader {
    /// The thread, while it is registered (None once it deregistered: never signal it then).
    thread: Mutex<Option<libc::pthread_t>>,
    in_read: AtomicBool,
    interrupted: AtomicBool,
}

/// A VM thread registered to block in `read`: deregistered when dropped.
#[derive(Debug)]
pub struct BlockedRead {
    key: u64,
    reader: Arc<Reader>,
    /// A copy of the VM's epoll set's fd: what the watcher's set holds.
    watched: OwnedFd,
}

extern "C" fn on_interrupt(_: libc::c_int) {}

fn watcher() -> Option<&'static Watcher> {
    static WATCHER: OnceLock<Option<Watcher>> = OnceLock::new();
    WATCHER
        .get_or_init(|| {
            let handler = SigAction::new(SigHandler::Handler(on_interrupt), SaFlags::empty(), SigSet::empty());
            // SAFETY: the handler does nothing, so it is async-signal-safe; INTERRUPT is used for
            // nothing else in this process.
            if let Err(e) = unsafe { nix::sys::signal::sigaction(INTERRUPT, &handler) } {
                tracing::warn!("cannot install the read interrupt ({e}); VMs wait in epoll");
                return None;
            }
            let epoll = match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
                Ok(epoll) => epoll,
                Err(e) => {
                    tracing::warn!("cannot start the read watcher ({e}); VMs wait in epoll");
                    return None;
                }
            };
            Some(Watcher { epoll, readers: Mutex::default(), next_key: AtomicU64::new(0) })
        })
        .as_ref()
}

fn start_watching(watcher: &'static Watcher) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let watch = move || loop {
            let mut events = [EpollEvent::empty(); 64];
            let ready = match watcher.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(ready) => ready,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("the read watcher failed ({e}); blocked VMs may not learn that their VMM ended");
                    return;
                }
            };
            let readers: Vec<Arc<Reader>> = {
                let registered = watcher.lock();
                events[..ready].iter().filter_map(|event| registered.get(&event.data()).cloned()).collect()
            };
            interrupt(&readers);
        };
        if let Err(e) = std::thread::Builder::new().name("read-watch".into()).spawn(watch) {
            tracing::error!("cannot start the read watcher: {e}");
        }
    });
}

impl Watcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Reader>>> {
        self.readers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Makes the readers' `read`s return (or not start), signalling each until it has: all at
/// once (a server stopping interrupts every idle VM together).
fn interrupt(readers: &[Arc<Reader>]) {
    for reader in readers {
        reader.interrupted.store(true, Ordering::SeqCst);
    }
    let deadline = Instant::now() + SIGNAL_FOR;
    loop {
        let mut reading = false;
        for reader in readers.iter().filter(|reader| reader.in_read.load(Ordering::SeqCst)) {
            reading = true;
            let thread = reader.thread.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(thread) = *thread {
                // Registered, so the thread is alive: it deregisters (under this lock) before it ends.
                let _ = nix::sys::pthread::pthread_kill(thread, INTERRUPT);
            }
        }
        if !reading || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

impl BlockedRead {
    /// Registers the calling thread, whose epoll set `epoll` (without the uffd) the watcher
    /// watches from now on. None if blocking reads cannot be interrupted here.
    pub fn register(epoll: BorrowedFd<'_>) -> Option<BlockedRead> {
        let watcher = watcher()?;
        start_watching(watcher);
        let watched = match epoll.try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("cannot watch a VM for its blocking read ({e}); it waits in epoll");
                return None;
            }
        };
        let key = watcher.next_key.fetch_add(1, Ordering::Relaxed);
        let reader = Arc::new(Reader {
            thread: Mutex::new(Some(nix::sys::pthread::pthread_self())),
            in_read: AtomicBool::new(false),
            interrupted: AtomicBool::new(false),
        });
        watcher.lock().insert(key, Arc::clone(&reader));
        let ready = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLONESHOT, key);
        if let Err(e) = watcher.epoll.add(&watched, ready) {
            tracing::warn!("cannot watch a VM for its blocking read ({e}); it waits in epoll");
            watcher.lock().remove(&key);
            return None;
        }
        Some(BlockedRead { key, reader, watched })
    }

    /// Whether the watcher interrupted this thread (its epoll set has something to say).
    pub fn interrupted(&self) -> bool {
        self.reader.interrupted.load(Ordering::SeqCst)
    }

    /// A blocking `read` of `uffd` into `buf`: the bytes read, or EINTR once interrupted.
    pub fn read(&self, uffd: BorrowedFd<'_>, buf: &mut [u8]) -> nix::Result<usize> {
        self.reader.in_read.store(true, Ordering::SeqCst);
        let read =
            if self.interrupted() { Err(nix::errno::Errno::EINTR) } else { nix::unistd::read(uffd.as_raw_fd(), buf) };
        self.reader.in_read.store(false, Ordering::SeqCst);
        read
    }
}

impl Drop for BlockedRead {
    fn drop(&mut self) {
        *self.reader.thread.lock().unwrap_or_else(PoisonError::into_inner) = None;
        if let Some(watcher) = watcher() {
            watcher.lock().remove(&self.key);
            let _ = watcher.epoll.delete(&self.watched);
        }
    }
}
