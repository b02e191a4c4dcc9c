//! A run's uploaded files (`RunSpec.files`). Before the container is created each one is
//! written to the run's private host directory, `<state dir>/runs/<run id>/files/<n>` (the
//! directory 0700, the file with the run's `mode`), and the OCI spec gets a read-only bind mount
//! of it at its path in the container (runc creates the missing parent directories and the
//! mount point in the run's own snapshot). The directory goes at cleanup, after the container;
//! the rest of the journal directory follows once the scheduler has the exit.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use berth_core::codes::ErrorCode;
use berth_proto::v1::RunFile;
use oci_spec::runtime::{Mount, Spec};

/// The subdirectory of a run's journal directory holding its files.
pub const FILES_DIR: &str = "files";
/// Mount options of every uploaded file: read-only (also for root: writes fail with EROFS), no
/// set-uid binaries, no device nodes. Executable, so an uploaded script can be run.
pub const MOUNT_OPTIONS: [&str; 4] = ["rbind", "ro", "nosuid", "nodev"];

/// Why a run's files could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// the scheduler sent a path that is not absolute and normalised (it validates them)
    #[error("uploaded file {index} has an unusable path {path:?}: {problem}")]
    BadPath {
        index: usize,
        path: String,
        problem: String,
    },
    /// writing a file or its directory failed
    #[error("writing uploaded files at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl FilesError {
    /// The machine-readable `error_code` reported to the scheduler.
    pub fn error_code(&self) -> ErrorCode {
        ErrorCode::FilesFailed
    }
}

/// One file ready to be mounted: where it is on the host and where it goes in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMount {
    pub source: PathBuf,
    pub destination: PathBuf,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `files` under `run_dir/files/`, each owned by `owner` (the run's uid and gid, so a
/// non-root image user can read a 0600 file), and returns their mounts, in order. Nothing is
/// created for a run without files. The directory must not exist yet (the journal directory
/// is new).
pub fn write_files(
    run_dir: &Path,
    files: &[RunFile],
    owner: (u32, u32),
) -> Result<Vec<FileMount>, FilesError> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    for (index, f) in files.iter().enumerate() {
        if let Some(problem) = berth_core::validate::file_path_problem(&f.path) {
            return Err(FilesError::BadPath {
                index,
                path: f.path.clone(),
                problem,
            });
        }
    }
    let dir = run_dir.join(FILES_DIR);
    DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(io_error(&dir))?;
    let mut mounts = Vec::with_capacity(files.len());
    for (index, f) in files.iter().enumerate() {
        let source = dir.join(index.to_string());
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&source)
            .map_err(io_error(&source))?;
        file.write_all(&f.content).map_err(io_error(&source))?;
        std::os::unix::fs::fchown(&file, Some(owner.0), Some(owner.1))
            .map_err(io_error(&source))?;
        // Set after writing: the requested mode may forbid writing (0o444, even 0).
        std::fs::set_permissions(&source, Permissions::from_mode(f.mode & 0o777))
            .map_err(io_error(&source))?;
        mounts.push(FileMount {
            source,
            destination: PathBuf::from(&f.path),
        });
    }
    Ok(mounts)
}

/// Adds a read-only bind mount per file to `spec`, after its other mounts.
pub fn add_mounts(spec: &mut Spec, mounts: &[FileMount]) {
    if mounts.is_empty() {
        return;
    }
    let mut all = spec.mounts().clone().unwrap_or_default();
    for m in mounts {
        let mut mount = Mount::default();
        mount.set_destination(m.destination.clone());
        mount.set_typ(Some("bind".to_string()));
        mount.set_source(Some(m.source.clone()));
        mount.set_options(Some(MOUNT_OPTIONS.iter().map(|o| o.to_string()).collect()));
        all.push(mount);
    }
    spec.set_mounts(Some(all));
}

/// Removes the run's files (missing is fine). Called at cleanup, once the container is gone.
pub fn remove_files(run_id: &str, run_dir: &Path) {
    let dir = run_dir.join(FILES_DIR);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => tracing::debug!(run_id, "uploaded files removed"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(run_id, path = %dir.display(), %error, "removing uploaded files failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn file(path: &str, content: &[u8], mode: u32) -> RunFile {
        RunFile {
            path: path.to_string(),
            content: content.to_vec(),
            mode,
        }
    }

    #[test]
    fn files_are_written_private_with_their_mode_and_mounted_read_only() {
        let run_dir = tempfile::tempdir().expect("tempdir");
        let files = [
            file("/etc/berth/config.json", b"{\"a\":1}", 0o444),
            file("/work/a/b/run.sh", b"#!/bin/sh\necho hi\n", 0o755),
            file("/secret", b"", 0),
        ];
        // Owned by the run's user (the tests run as root, so any owner can be given).
        let mounts = write_files(run_dir.path(), &files, (1234, 5678)).expect("write");
        let dir = run_dir.path().join(FILES_DIR);
        assert_eq!(std::fs::metadata(&dir).expect("dir").mode() & 0o777, 0o700);
        for (i, (m, f)) in mounts.iter().zip(&files).enumerate() {
            assert_eq!(m.source, dir.join(i.to_string()));
            assert_eq!(m.destination, PathBuf::from(&f.path));
            let meta = std::fs::metadata(&m.source).expect("file");
            assert_eq!(meta.mode() & 0o7777, f.mode, "{}", f.path);
            assert_eq!((meta.uid(), meta.gid()), (1234, 5678), "{}", f.path);
            assert_eq!(std::fs::read(&m.source).expect("read"), f.content);
        }

        let mut spec = Spec::default();
        let before = spec.mounts().clone().unwrap_or_default().len();
        add_mounts(&mut spec, &mounts);
        let json = serde_json::to_value(&spec).expect("json");
        let all = json["mounts"].as_array().expect("mounts");
        assert_eq!(all.len(), before + 3);
        let last = &all[before + 1];
        assert_eq!(last["destination"], "/work/a/b/run.sh");
        assert_eq!(last["type"], "bind");
        assert_eq!(last["options"], serde_json::json!(MOUNT_OPTIONS));

        remove_files("r", run_dir.path());
        assert!(!dir.exists());
        remove_files("r", run_dir.path());
    }

    #[test]
    fn a_run_without_files_gets_no_directory_and_bad_paths_are_refused() {
        let run_dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            write_files(run_dir.path(), &[], (0, 0)).expect("none"),
            vec![]
        );
        assert!(!run_dir.path().join(FILES_DIR).exists());
        let err = write_files(
            run_dir.path(),
            &[file("/a/../../etc/passwd", b"x", 0o644)],
            (0, 0),
        )
        .expect_err("refused");
        assert_eq!(err.error_code(), ErrorCode::FilesFailed);
        assert!(!run_dir.path().join(FILES_DIR).exists());
    }
}
