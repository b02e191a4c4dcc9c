//! An image's `/etc/passwd` and `/etc/group`, read from a read-only view of its rootfs (the
//! mounts containerd's snapshotter returns for a `View` of the image's top layer), for
//! [`crate::run::user`].
//!
//! A one-layer view is a bind mount of the layer's directory: the files are read from it in
//! place. A view of several layers is an overlay of read-only lower directories: it is mounted
//! read-only (no upper directory, so nothing can be written) on a private directory for the
//! read, which lets the kernel apply whiteouts and opaque directories, then unmounted.
//!
//! The image is not trusted: `etc`, `etc/passwd` and `etc/group` are opened without following
//! symbolic links (a link would otherwise be followed on the host, outside the image), only
//! regular files are read, and at most [`MAX_ACCOUNTS_FILE`] bytes of each.

use crate::run::user::ImageAccounts;
use containerd_client::types::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::io::{self, Read as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// No real passwd or group file is near this; a larger one is read up to this size.
pub const MAX_ACCOUNTS_FILE: u64 = 4 << 20;

/// Reads the two files from the view `mounts`, mounting an overlay on a new directory under
/// `scratch` if needed.
pub fn read_accounts(mounts: &[Mount], scratch: &Path) -> io::Result<ImageAccounts> {
    let [view] = mounts else {
        return Err(io::Error::other(format!(
            "expected one mount for an image view, got {}",
            mounts.len()
        )));
    };
    match view.r#type.as_str() {
        "bind" | "rbind" => read_from(Path::new(&view.source)),
        "overlay" => {
            std::fs::create_dir_all(scratch)?;
            let target = scratch.join(format!("view-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir(&target)?;
            let options: Vec<&str> = view
                .options
                .iter()
                .map(String::as_str)
                .filter(|o| o.starts_with("lowerdir="))
                .collect();
            let mounted = mount(
                Some("overlay"),
                &target,
                Some("overlay"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(options.join(",").as_str()),
            );
            let read = match mounted {
                Ok(()) => {
                    let read = read_from(&target);
                    if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
                        tracing::warn!(path = %target.display(), error = %e, "unmounting an image view failed");
                    }
                    read
                }
                Err(e) => Err(io::Error::other(format!(
                    "mounting the image view at {}: {e}",
                    target.display()
                ))),
            };
            let _ = std::fs::remove_dir(&target);
            read
        }
        other => Err(io::Error::other(format!(
            "an image view mounted as {other:?} cannot be read"
        ))),
    }
}

/// Reads `etc/passwd` and `etc/group` under `root` (absent files are `None`).
pub fn read_from(root: &Path) -> io::Result<ImageAccounts> {
    let etc = root.join("etc");
    match std::fs::symlink_metadata(&etc) {
        Ok(m) if m.is_dir() => {}
        // No /etc, or one that is not a directory (a link is not followed): no accounts.
        Ok(_) => return Ok(ImageAccounts::default()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ImageAccounts::default()),
        Err(e) => return Err(e),
    }
    Ok(ImageAccounts {
        passwd: read_regular(&etc.join("passwd"))?,
        group: read_regular(&etc.join("group"))?,
    })
}

fn read_regular(path: &PathBuf) -> io::Result<Option<String>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // O_NOFOLLOW on a link: ELOOP. Not a file of the image's own.
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => return Ok(None),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    file.take(MAX_ACCOUNTS_FILE).read_to_end(&mut bytes)?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_files_and_skips_links_and_absent_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir(root.join("etc")).expect("etc");
        std::fs::write(
            root.join("etc/passwd"),
            "app:x:1000:1000::/home/app:/bin/sh\n",
        )
        .expect("passwd");
        let accounts = read_from(root).expect("read");
        assert_eq!(
            accounts.passwd.as_deref(),
            Some("app:x:1000:1000::/home/app:/bin/sh\n")
        );
        assert_eq!(accounts.group, None);

        // A link to a host file is not followed.
        std::fs::write(root.join("host-secret"), "root:x:0:0::/secret:/bin/sh\n").expect("host");
        std::os::unix::fs::symlink(root.join("host-secret"), root.join("etc/group")).expect("link");
        assert_eq!(read_from(root).expect("read").group, None);

        // /etc itself a link: nothing is read through it.
        let other = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(root.join("etc"), other.path().join("etc")).expect("link");
        assert_eq!(
            read_from(other.path()).expect("read"),
            ImageAccounts::default()
        );
    }

    #[test]
    fn a_one_layer_view_is_read_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("etc");
        std::fs::write(dir.path().join("etc/group"), "g:x:5:\n").expect("group");
        let view = Mount {
            r#type: "bind".to_owned(),
            source: dir.path().display().to_string(),
            target: String::new(),
            options: vec!["ro".to_owned(), "rbind".to_owned()],
        };
        let accounts = read_accounts(&[view], dir.path()).expect("read");
        assert_eq!(accounts.group.as_deref(), Some("g:x:5:\n"));
    }
}
