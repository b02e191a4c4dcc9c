//! Knowing, without deleting the task, that containerd's shim has written all of a run's output.
//!
//! The shim opens the run's `stdout` and `stderr` files for writing when the task is created and
//! copies the process's pipes into them; it closes each file once its pipe reports end of file
//! (every process of the container has ended or closed it) and the last bytes are written
//! (measured on containerd 1.6: after the exit, before `Delete`, the shim holds neither file).
//! Deleting the task waits for the same thing, but costs a `runc delete` on the run's way to
//! being reported ended. So the supervisor watches both files for their writer's close
//! (inotify `IN_CLOSE_WRITE`; the agent only ever reads these files once the task exists) and,
//! once both are closed after the exit, reads them to the end and reports the exit; the task is
//! deleted during cleanup. When the watch cannot be set up, or the closes do not come in time,
//! the supervisor deletes the task first, as before.

use std::collections::HashSet;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::runtime::OutputFiles;

/// A watch for the writer's close of a run's output files. Dropping it closes the inotify
/// instance, which blocks for the kernel's SRCU grace period (milliseconds): drop it off the
/// async threads when that matters.
pub struct OutputClosed {
    inotify: Arc<Inotify>,
    open: HashSet<WatchDescriptor>,
}

impl OutputClosed {
    /// Watches `files`. Call right after the task is created: the shim has them open then, and
    /// the process cannot have run yet.
    pub fn watch(files: &OutputFiles) -> io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mut open = HashSet::new();
        for path in [&files.stdout, &files.stderr] {
            open.insert(inotify.add_watch(path.as_path(), AddWatchFlags::IN_CLOSE_WRITE)?);
        }
        Ok(Self {
            inotify: Arc::new(inotify),
            open,
        })
    }

    /// Waits until every watched file was closed by a writer, at most `limit`. True when all
    /// were.
    pub async fn wait(&mut self, limit: Duration) -> bool {
        // Real time: this waits on the kernel, not on timers.
        let deadline = std::time::Instant::now() + limit;
        loop {
            match self.inotify.read_events() {
                Ok(events) => {
                    for event in events {
                        if event.mask.contains(AddWatchFlags::IN_CLOSE_WRITE) {
                            self.open.remove(&event.wd);
                        }
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(_) => return false,
            }
            if self.open.is_empty() {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            // Until the next event or the deadline, off the async threads.
            let inotify = self.inotify.clone();
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let waited = tokio::task::spawn_blocking(move || {
                let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, timeout)
            })
            .await;
            if !matches!(waited, Ok(Ok(_))) {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &std::path::Path) -> OutputFiles {
        let files = OutputFiles {
            stdout: dir.join("stdout"),
            stderr: dir.join("stderr"),
        };
        std::fs::write(&files.stdout, "").expect("stdout");
        std::fs::write(&files.stderr, "").expect("stderr");
        files
    }

    #[tokio::test]
    async fn both_files_closed_by_their_writer_is_seen_and_reading_is_not_a_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = files(dir.path());
        let out = std::fs::OpenOptions::new()
            .append(true)
            .open(&files.stdout)
            .expect("open");
        let err = std::fs::OpenOptions::new()
            .append(true)
            .open(&files.stderr)
            .expect("open");
        let mut closed = OutputClosed::watch(&files).expect("watch");
        // A reader opening and closing them (the log pump) is no writer's close.
        drop(std::fs::read(&files.stdout).expect("read"));
        assert!(!closed.wait(Duration::from_millis(50)).await);
        drop(out);
        assert!(
            !closed.wait(Duration::from_millis(50)).await,
            "stderr still open"
        );
        drop(err);
        assert!(closed.wait(Duration::from_secs(5)).await);
        // Stays true.
        assert!(closed.wait(Duration::from_millis(1)).await);
    }

    #[tokio::test]
    async fn a_close_before_the_wait_still_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = files(dir.path());
        let writers: Vec<std::fs::File> = [&files.stdout, &files.stderr]
            .iter()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(p)
                    .expect("open")
            })
            .collect();
        let mut closed = OutputClosed::watch(&files).expect("watch");
        drop(writers);
        assert!(closed.wait(Duration::from_secs(5)).await);
    }
}
