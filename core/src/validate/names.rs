//! The syntax of names users give: env keys, image names and tags, registry hosts.

pub fn is_env_key(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && chars.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// `[host[:port]/]path` where path components are lowercase alphanumerics joined by `.`, `_`,
/// `__` or `-`, as the distribution spec defines repository names.
pub fn is_image_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 {
        let first = parts[0];
        let looks_like_host = first.contains('.') || first.contains(':') || first == "localhost";
        if looks_like_host {
            if !is_host(first) {
                return false;
            }
            parts.remove(0);
        }
    }
    !parts.is_empty() && parts.iter().all(|p| is_path_component(p))
}

pub fn is_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok());
    let host_ok = !host.is_empty()
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    port_ok && host_ok
}

fn is_path_component(p: &str) -> bool {
    let bytes = p.as_bytes();
    if bytes.is_empty() {
        return false;
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut prev_sep = false;
    for &b in bytes {
        if alnum(b) {
            prev_sep = false;
        } else if matches!(b, b'.' | b'_' | b'-') {
            // `__` is allowed, other doubled separators are not (except runs of `-`).
            if prev_sep && b != b'-' && b != b'_' {
                return false;
            }
            prev_sep = true;
        } else {
            return false;
        }
    }
    true
}

pub fn is_image_tag(tag: &str) -> bool {
    if let Some(hex) = tag.strip_prefix("sha256:") {
        return hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit());
    }
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}
