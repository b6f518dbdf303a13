//! Which files some process still holds open for writing, read from `/proc/*/fd`.
//!
//! A recorder that pauses keeps its file open; the file must not be settled however long it
//! stays quiet. Descriptors are matched by device and inode (not by path, which differs across
//! mount namespaces), and the access mode comes from `/proc/PID/fdinfo/FD`. A process whose
//! descriptors cannot be read (another user, without `CAP_SYS_PTRACE`/`CAP_DAC_READ_SEARCH`) is
//! counted in [`Scan::unreadable`] so the caller can warn.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The result of one pass over `/proc`.
#[derive(Debug, Default)]
pub struct Scan {
    /// `(dev, ino)` of the targets that are open for writing.
    pub open: HashSet<(u64, u64)>,
    /// Processes whose descriptors could not be read.
    pub unreadable: usize,
}

/// Looks up which of `targets` (`(dev, ino)`) are open for writing by any process.
pub fn open_for_write(targets: &HashSet<(u64, u64)>) -> Scan {
    open_for_write_in(Path::new("/proc"), targets)
}

fn open_for_write_in(proc_root: &Path, targets: &HashSet<(u64, u64)>) -> Scan {
    let mut scan = Scan::default();
    if targets.is_empty() {
        return scan;
    }
    let Ok(procs) = std::fs::read_dir(proc_root) else {
        scan.unreadable += 1;
        return scan;
    };
    for proc_entry in procs.flatten() {
        let name = proc_entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let fd_dir = proc_root.join(pid).join("fd");
        let fds = match std::fs::read_dir(&fd_dir) {
            Ok(fds) => fds,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                scan.unreadable += 1;
                continue;
            }
            // The process exited meanwhile.
            Err(_) => continue,
        };
        for fd in fds.flatten() {
            let fd_path = fd.path();
            // Cheap filter first: sockets, pipes and anonymous inodes are not files. A link
            // we may not read means this process's files cannot be seen at all.
            match std::fs::read_link(&fd_path) {
                Ok(target) if target.is_absolute() => {}
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    scan.unreadable += 1;
                    break;
                }
                _ => continue,
            }
            let meta = match std::fs::metadata(&fd_path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    scan.unreadable += 1;
                    break;
                }
                Err(_) => continue,
            };
            if !targets.contains(&(meta.dev(), meta.ino())) {
                continue;
            }
            let info = proc_root.join(pid).join("fdinfo").join(fd.file_name());
            if writable_fd(&info) {
                scan.open.insert((meta.dev(), meta.ino()));
            }
        }
    }
    scan
}

/// Reads the `flags:` line (octal) of an fdinfo file; unreadable counts as writable, so a file
/// is kept back rather than taken on a guess.
fn writable_fd(info: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(info) else {
        return true;
    };
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("flags:") {
            return match u32::from_str_radix(v.trim(), 8) {
                Ok(flags) => {
                    let mode = flags & libc::O_ACCMODE as u32;
                    mode == libc::O_WRONLY as u32 || mode == libc::O_RDWR as u32
                }
                Err(_) => true,
            };
        }
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sees_own_writer_and_ignores_readers() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("w");
        let r = dir.path().join("r");
        let mut wf = std::fs::File::create(&w).unwrap();
        wf.write_all(b"x").unwrap();
        std::fs::write(&r, b"y").unwrap();
        let _rf = std::fs::File::open(&r).unwrap();
        let id = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.dev(), m.ino())
        };
        let targets: HashSet<_> = [id(&w), id(&r)].into_iter().collect();
        let scan = open_for_write(&targets);
        assert!(scan.open.contains(&id(&w)));
        assert!(!scan.open.contains(&id(&r)));
        drop(wf);
        let scan = open_for_write(&targets);
        assert!(!scan.open.contains(&id(&w)));
    }
}
