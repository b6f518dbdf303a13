//! File-system operations confined to the watch root.
//!
//! Every open, stat and unlink of a file under the root walks the relative path one component at
//! a time from a descriptor of the root, with `O_NOFOLLOW` at every step. So a symbolic link
//! anywhere in the path — placed there before or swapped in during the walk — fails the
//! operation instead of leading outside the root, and no `..` component is ever accepted.
//! Paths are bytes (`OsStr`): non-UTF-8 names work like any other.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, Mode, OFlags};
use serde::{Deserialize, Serialize};

/// What identifies the content of a file that was read: a changed file differs in at least one
/// of these, and is then uploaded again rather than deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
}

impl Identity {
    // The stat field types differ between targets.
    #[allow(clippy::unnecessary_cast)]
    pub fn from_stat(st: &rustix::fs::Stat) -> Identity {
        Identity {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size.max(0) as u64,
            mtime_ns: (st.st_mtime as i64)
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_mtime_nsec as i64),
        }
    }

    pub fn from_metadata(m: &std::fs::Metadata) -> Identity {
        use std::os::unix::fs::MetadataExt;
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec(),
        }
    }

    pub fn mtime(&self) -> SystemTime {
        if self.mtime_ns >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_nanos(self.mtime_ns as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    }
}

/// What kind of entry a path names (symbolic links are reported, never followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

fn kind_of(st: &rustix::fs::Stat) -> Kind {
    match rustix::fs::FileType::from_raw_mode(st.st_mode) {
        rustix::fs::FileType::RegularFile => Kind::File,
        rustix::fs::FileType::Directory => Kind::Dir,
        rustix::fs::FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// The watch root, held open. If the directory at the root's path is replaced (removed and
/// created again), the next operation opens the new one: files written into the new root must
/// not be taken for gone.
#[derive(Debug)]
pub struct Root {
    path: PathBuf,
    fd: RwLock<OwnedFd>,
}

/// Why a path relative to the root was refused before touching the file system. The bytes are
/// checked as they are, not as [`Path::components`] normalises them (it drops `.` and empty
/// segments): the same path names the journal row and the object key, so `a/./b` or `a//b`
/// must not pass as `a/b`.
pub fn check_rel(rel: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = rel.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"));
    }
    let plain = !bytes.contains(&0)
        && bytes
            .split(|&b| b == b'/')
            .all(|seg| !seg.is_empty() && seg != b"." && seg != b"..");
    if !plain {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("path {:?} is not a plain relative path", rel),
        ));
    }
    Ok(())
}

impl Root {
    /// Opens the root directory. The root itself is the operator's choice and may be reached
    /// through a symbolic link; nothing below it is.
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root {
            path: path.to_path_buf(),
            fd: RwLock::new(fd),
        })
    }

    /// A descriptor of the current root directory: the one held, or, when the path now names
    /// another directory, that one (which is then held instead).
    fn current_fd(&self) -> io::Result<OwnedFd> {
        {
            let fd = self.fd.read().unwrap_or_else(|p| p.into_inner());
            if same_dir(&fd, &self.path) != Some(false) {
                return Ok(rustix::io::dup(&*fd)?);
            }
        }
        let mut fd = self.fd.write().unwrap_or_else(|p| p.into_inner());
        if same_dir(&fd, &self.path) == Some(false)
            && let Ok(new) = rustix::fs::open(
                &self.path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
        {
            tracing::warn!(root = %self.path.display(),
                "the watch root was replaced by another directory; using the new one");
            *fd = new;
        }
        Ok(rustix::io::dup(&*fd)?)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the directory that holds `rel` and returns it with the final component.
    fn open_parent<'a>(&self, rel: &'a Path) -> io::Result<(OwnedFd, &'a std::ffi::OsStr)> {
        check_rel(rel)?;
        let mut comps: Vec<&std::ffi::OsStr> = rel.iter().collect();
        let Some(name) = comps.pop() else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"));
        };
        let mut dir = self.current_fd()?;
        for c in comps {
            dir = rustix::fs::openat(
                &dir,
                c,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
        }
        Ok((dir, name))
    }

    /// Opens a regular file for reading; refuses symbolic links, devices, FIFOs and directories.
    pub fn open_file(&self, rel: &Path) -> io::Result<(File, Identity)> {
        let (dir, name) = self.open_parent(rel)?;
        let fd = rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        if kind_of(&st) != Kind::File {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok((File::from(fd), Identity::from_stat(&st)))
    }

    /// `lstat` of an entry under the root.
    pub fn stat(&self, rel: &Path) -> io::Result<(Kind, Identity)> {
        let (dir, name) = self.open_parent(rel)?;
        let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        Ok((kind_of(&st), Identity::from_stat(&st)))
    }

    /// Unlinks `rel` only if it is still the regular file `expect` describes.
    pub fn unlink_if_same(&self, rel: &Path, expect: &Identity) -> io::Result<UnlinkOutcome> {
        let (dir, name) = self.open_parent(rel)?;
        let st = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(UnlinkOutcome::Gone),
            Err(e) => return Err(e.into()),
        };
        let now = Identity::from_stat(&st);
        if kind_of(&st) != Kind::File || now != *expect {
            return Ok(UnlinkOutcome::Changed(now));
        }
        match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
            Ok(()) => Ok(UnlinkOutcome::Removed),
            Err(rustix::io::Errno::NOENT) => Ok(UnlinkOutcome::Gone),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the directory `rel` if it is empty and has not been modified for `idle`.
    /// Never removes the root itself (an empty `rel` is refused).
    pub fn rmdir_if_idle(&self, rel: &Path, idle: Duration) -> io::Result<RmdirOutcome> {
        let (dir, name) = self.open_parent(rel)?;
        let st = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(RmdirOutcome::Gone),
            Err(e) => return Err(e.into()),
        };
        if kind_of(&st) != Kind::Dir {
            return Ok(RmdirOutcome::NotEmpty);
        }
        let mtime = Identity::from_stat(&st).mtime();
        let age = SystemTime::now()
            .duration_since(mtime)
            .unwrap_or(Duration::ZERO);
        if age < idle {
            return Ok(RmdirOutcome::TooRecent(idle - age));
        }
        match rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR) {
            Ok(()) => Ok(RmdirOutcome::Removed),
            Err(rustix::io::Errno::NOTEMPTY) | Err(rustix::io::Errno::EXIST) => {
                Ok(RmdirOutcome::NotEmpty)
            }
            Err(rustix::io::Errno::NOENT) => Ok(RmdirOutcome::Gone),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the root itself is still the directory that was opened (it may have been
    /// removed and re-created under the same name).
    pub fn still_current(&self) -> bool {
        let fd = self.fd.read().unwrap_or_else(|p| p.into_inner());
        same_dir(&fd, &self.path) == Some(true)
    }
}

/// Whether `path` names the directory `fd` holds; `None` when `path` is not a directory now
/// (removed, not created again yet) or either cannot be read.
fn same_dir(fd: &OwnedFd, path: &Path) -> Option<bool> {
    let a = rustix::fs::fstat(fd.as_fd()).ok()?;
    let b = rustix::fs::stat(path).ok()?;
    if kind_of(&b) != Kind::Dir {
        return None;
    }
    Some(a.st_dev == b.st_dev && a.st_ino == b.st_ino)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnlinkOutcome {
    Removed,
    /// Already gone.
    Gone,
    /// The entry is no longer the file that was checked: it was kept.
    Changed(Identity),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmdirOutcome {
    Removed,
    Gone,
    NotEmpty,
    /// Modified too recently: try again after this long.
    TooRecent(Duration),
}

/// Reads exactly `len` bytes at `offset` (fewer only at end of file).
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads up to `len` bytes at `offset` into a new buffer (fewer only at the end of the file),
/// without first zeroing it: a small file is read whole into memory, and zeroing the buffer
/// was measurable in the small-file benchmark.
pub fn read_vec_at(file: &File, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => break,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // The spare capacity may exceed `len` (and the file have grown): keep only what was asked.
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Reads what is asked from where it is asked, and only what the file has.
    #[test]
    fn read_vec_at_reads_the_range_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(read_vec_at(&f, data.len(), 0).unwrap(), data);
        assert_eq!(read_vec_at(&f, 1000, 7).unwrap(), &data[7..1007]);
        // Past the end: what there is.
        assert_eq!(read_vec_at(&f, 500, 299_800).unwrap(), &data[299_800..]);
        assert!(read_vec_at(&f, 10, 400_000).unwrap().is_empty());
        assert!(read_vec_at(&f, 0, 0).unwrap().is_empty());
    }

    #[test]
    fn refuses_symlinks_and_dotdot() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), b"hello").unwrap();
        symlink(outside.path(), dir.path().join("link")).unwrap();
        symlink(outside.path().join("secret"), dir.path().join("d/flink")).unwrap();
        let root = Root::open(dir.path()).unwrap();

        let (_, id) = root.open_file(Path::new("d/f")).unwrap();
        assert_eq!(id.size, 5);
        assert!(root.open_file(Path::new("link/secret")).is_err());
        assert!(root.open_file(Path::new("d/flink")).is_err());
        assert!(root.open_file(Path::new("d/../d/f")).is_err());
        assert!(root.open_file(Path::new("/etc/passwd")).is_err());
        assert!(root.open_file(Path::new("d")).is_err());
        // Spellings that `Path::components` would normalise to `d/f` are refused as well, so
        // a path never names one file on disk and another in the journal or the bucket.
        for odd in ["d/./f", "./d/f", "d//f", "d/f/", "d/f/."] {
            assert!(root.open_file(Path::new(odd)).is_err(), "{odd}");
            assert!(check_rel(Path::new(odd)).is_err(), "{odd}");
        }
        assert_eq!(root.stat(Path::new("d/flink")).unwrap().0, Kind::Symlink);
        // A symlink is never removed as if it were the file.
        let (_, sid) = root.stat(Path::new("d/flink")).unwrap();
        assert!(matches!(
            root.unlink_if_same(Path::new("d/flink"), &sid).unwrap(),
            UnlinkOutcome::Changed(_)
        ));
        assert!(outside.path().join("secret").exists());
    }

    #[test]
    fn a_replaced_root_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root");
        std::fs::create_dir(&path).unwrap();
        let root = Root::open(&path).unwrap();
        assert!(root.still_current());
        std::fs::remove_dir(&path).unwrap();
        assert!(!root.still_current());
        assert_eq!(
            root.open_file(Path::new("f")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        std::fs::create_dir(&path).unwrap();
        std::fs::create_dir(path.join("d")).unwrap();
        std::fs::write(path.join("d/f"), b"new root").unwrap();
        let (_, id) = root.open_file(Path::new("d/f")).unwrap();
        assert_eq!(id.size, 8);
        assert!(root.still_current());
        assert_eq!(
            root.unlink_if_same(Path::new("d/f"), &id).unwrap(),
            UnlinkOutcome::Removed
        );
    }

    #[test]
    fn unlink_only_when_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"one").unwrap();
        let root = Root::open(dir.path()).unwrap();
        let (_, id) = root.open_file(Path::new("f")).unwrap();
        std::fs::write(dir.path().join("f"), b"two!").unwrap();
        assert!(matches!(
            root.unlink_if_same(Path::new("f"), &id).unwrap(),
            UnlinkOutcome::Changed(_)
        ));
        assert!(dir.path().join("f").exists());
        let (_, id) = root.open_file(Path::new("f")).unwrap();
        assert_eq!(
            root.unlink_if_same(Path::new("f"), &id).unwrap(),
            UnlinkOutcome::Removed
        );
        assert!(!dir.path().join("f").exists());
        assert_eq!(
            root.unlink_if_same(Path::new("f"), &id).unwrap(),
            UnlinkOutcome::Gone
        );
    }

    #[test]
    fn rmdir_waits_and_keeps_non_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        assert!(matches!(
            root.rmdir_if_idle(Path::new("a/b"), Duration::from_secs(3600))
                .unwrap(),
            RmdirOutcome::TooRecent(_)
        ));
        assert_eq!(
            root.rmdir_if_idle(Path::new("a"), Duration::ZERO).unwrap(),
            RmdirOutcome::NotEmpty
        );
        assert_eq!(
            root.rmdir_if_idle(Path::new("a/b"), Duration::ZERO)
                .unwrap(),
            RmdirOutcome::Removed
        );
        assert!(root.rmdir_if_idle(Path::new(""), Duration::ZERO).is_err());
        assert!(dir.path().exists());
    }
}
