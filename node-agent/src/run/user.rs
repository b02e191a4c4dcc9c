//! The user a run's process runs as, from the image's `USER` and the image's own `/etc/passwd`
//! and `/etc/group`, by the rules Docker (runc's `GetExecUser`) applies:
//!
//! - `USER` is `user`, `user:group`, `uid`, `uid:gid` or a mix; empty means root (`0`).
//! - A user name must be in `/etc/passwd`; a numeric uid need not be (then its gid is 0 and its
//!   home `/`). A group name must be in `/etc/group`; a numeric gid need not be.
//! - Without an explicit group the primary gid is the passwd entry's, and the supplementary
//!   groups are every `/etc/group` entry that lists the user's name. With an explicit group
//!   there are none.
//! - The home directory is the passwd entry's (`/` without one); the spec sets `HOME` from it
//!   when neither the image nor the run sets `HOME`.
//!
//! Pure: the caller reads the two files (see `runtime::ContainerRuntime::image_accounts`).

/// `/etc/passwd` and `/etc/group` of an image, as far as they exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageAccounts {
    pub passwd: Option<String>,
    pub group: Option<String>,
}

/// Who the process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, in `/etc/group` order, without the primary gid.
    pub additional_gids: Vec<u32>,
    pub home: String,
}

impl ExecUser {
    pub fn root() -> ExecUser {
        ExecUser {
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            home: "/root".to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("the image's USER {user:?} names user {name:?}, which its /etc/passwd does not have")]
    NoSuchUser { user: String, name: String },
    #[error("the image's USER {user:?} names group {name:?}, which its /etc/group does not have")]
    NoSuchGroup { user: String, name: String },
    #[error("the image's USER {user:?} is not `user[:group]`: {problem}")]
    Malformed { user: String, problem: &'static str },
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

/// `name:password:uid:gid:gecos:home:shell`; lines that do not parse are skipped, as libc does.
fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        let _gecos = f.next();
        let home = f.next().unwrap_or("");
        Some(PasswdEntry {
            name,
            uid,
            gid,
            home,
        })
    })
}

/// `name:password:gid:member,member`.
fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let gid = f.next()?.parse().ok()?;
        let members = f
            .next()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .collect();
        Some(GroupEntry { name, gid, members })
    })
}

/// Resolves `image_user` (the image config's `User`, possibly absent) against `accounts`.
pub fn resolve(image_user: Option<&str>, accounts: &ImageAccounts) -> Result<ExecUser, UserError> {
    let spec = image_user.map(str::trim).unwrap_or("");
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let malformed = |problem| UserError::Malformed {
        user: spec.to_owned(),
        problem,
    };
    if group_part.is_some_and(|g| g.is_empty() || g.contains(':')) {
        return Err(malformed("the group after ':' is empty or has another ':'"));
    }
    let user_part = if user_part.is_empty() {
        if group_part.is_some() {
            return Err(malformed("no user before ':'"));
        }
        "0"
    } else {
        user_part
    };
    let passwd = accounts.passwd.as_deref().unwrap_or("");
    let numeric_uid = user_part.parse::<u32>().ok();
    // A name, or a number, as the first entry that matches it (as runc's first match wins).
    let entry = passwd_entries(passwd).find(|e| match numeric_uid {
        Some(uid) => e.uid == uid,
        None => e.name == user_part,
    });
    let (uid, mut gid, home, name) = match (&entry, numeric_uid) {
        (Some(e), _) => (e.uid, e.gid, e.home.to_owned(), Some(e.name)),
        (None, Some(uid)) => (uid, 0, "/".to_owned(), None),
        (None, None) => {
            return Err(UserError::NoSuchUser {
                user: spec.to_owned(),
                name: user_part.to_owned(),
            })
        }
    };
    let groups = accounts.group.as_deref().unwrap_or("");
    let mut additional_gids = Vec::new();
    match group_part {
        Some(g) => {
            gid = match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => {
                    group_entries(groups)
                        .find(|e| e.name == g)
                        .ok_or_else(|| UserError::NoSuchGroup {
                            user: spec.to_owned(),
                            name: g.to_owned(),
                        })?
                        .gid
                }
            };
        }
        None => {
            if let Some(name) = name {
                for e in group_entries(groups) {
                    if e.members.contains(&name)
                        && e.gid != gid
                        && !additional_gids.contains(&e.gid)
                    {
                        additional_gids.push(e.gid);
                    }
                }
            }
        }
    }
    let home = if home.is_empty() {
        "/".to_owned()
    } else {
        home
    };
    Ok(ExecUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # a comment\n\
                          app:x:1000:1000:App:/home/app:/bin/sh\n\
                          svc:x:1001:1001::/srv:/bin/false\n\
                          broken line\n\
                          nohome:x:1002:1002::::\n";
    const GROUP: &str = "root:x:0:\n\
                         app:x:1000:\n\
                         svc:x:1001:\n\
                         extra:x:2000:app\n\
                         more:x:2001:svc, app\n\
                         again:x:2000:app\n";

    fn accounts() -> ImageAccounts {
        ImageAccounts {
            passwd: Some(PASSWD.to_owned()),
            group: Some(GROUP.to_owned()),
        }
    }

    fn user(uid: u32, gid: u32, extra: &[u32], home: &str) -> ExecUser {
        ExecUser {
            uid,
            gid,
            additional_gids: extra.to_vec(),
            home: home.to_owned(),
        }
    }

    #[test]
    fn a_name_takes_its_ids_home_and_supplementary_groups() {
        assert_eq!(
            resolve(Some("app"), &accounts()),
            Ok(user(1000, 1000, &[2000, 2001], "/home/app"))
        );
    }

    #[test]
    fn an_explicit_group_replaces_the_primary_gid_and_drops_supplementary_groups() {
        assert_eq!(
            resolve(Some("app:svc"), &accounts()),
            Ok(user(1000, 1001, &[], "/home/app"))
        );
        assert_eq!(
            resolve(Some("app:4321"), &accounts()),
            Ok(user(1000, 4321, &[], "/home/app"))
        );
        assert_eq!(
            resolve(Some("1001:extra"), &accounts()),
            Ok(user(1001, 2000, &[], "/srv"))
        );
    }

    #[test]
    fn numbers_need_no_entry_and_a_known_number_takes_its_entry() {
        assert_eq!(
            resolve(Some("4242"), &accounts()),
            Ok(user(4242, 0, &[], "/"))
        );
        assert_eq!(
            resolve(Some("4242:4343"), &accounts()),
            Ok(user(4242, 4343, &[], "/"))
        );
        assert_eq!(
            resolve(Some("1000"), &accounts()),
            Ok(user(1000, 1000, &[2000, 2001], "/home/app"))
        );
        assert_eq!(
            resolve(Some("4242"), &ImageAccounts::default()),
            Ok(user(4242, 0, &[], "/"))
        );
    }

    #[test]
    fn no_user_is_root_with_roots_home() {
        assert_eq!(resolve(None, &accounts()), Ok(user(0, 0, &[], "/root")));
        assert_eq!(
            resolve(Some(" "), &accounts()),
            Ok(user(0, 0, &[], "/root"))
        );
        // An image without /etc/passwd: root with home /.
        assert_eq!(
            resolve(None, &ImageAccounts::default()),
            Ok(user(0, 0, &[], "/"))
        );
        assert_eq!(
            resolve(Some("nohome"), &accounts()),
            Ok(user(1002, 1002, &[], "/"))
        );
    }

    #[test]
    fn unknown_names_and_malformed_users_fail_instead_of_running_as_root() {
        assert_eq!(
            resolve(Some("ghost"), &accounts()),
            Err(UserError::NoSuchUser {
                user: "ghost".into(),
                name: "ghost".into()
            })
        );
        assert!(matches!(
            resolve(Some("app"), &ImageAccounts::default()),
            Err(UserError::NoSuchUser { .. })
        ));
        assert!(matches!(
            resolve(Some("app:ghosts"), &accounts()),
            Err(UserError::NoSuchGroup { .. })
        ));
        for bad in ["app:", ":app", "a:b:c"] {
            assert!(
                matches!(
                    resolve(Some(bad), &accounts()),
                    Err(UserError::Malformed { .. })
                ),
                "{bad}"
            );
        }
    }
}
