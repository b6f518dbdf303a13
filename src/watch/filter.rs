//! `watch.include` / `watch.exclude`: which paths under the root are recordings.

use std::path::Path;

use globset::GlobSet;

/// Globs are matched against the path relative to the root. A file is taken when an include
/// glob matches it and no exclude glob matches it or any directory above it, so excluding a
/// directory excludes everything under it.
#[derive(Debug, Clone)]
pub struct Filter {
    include: GlobSet,
    exclude: GlobSet,
}

impl Filter {
    pub fn new(include: GlobSet, exclude: GlobSet) -> Filter {
        Filter { include, exclude }
    }

    /// Whether the directory `rel` (relative to the root) or one above it is excluded.
    pub fn dir_excluded(&self, rel: &Path) -> bool {
        rel.ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .any(|a| self.exclude.is_match(a))
    }

    /// Whether the file `rel` is to be uploaded (checks every directory above it too).
    pub fn file_matches(&self, rel: &Path) -> bool {
        if !self.include.is_match(rel) || self.exclude.is_match(rel) {
            return false;
        }
        match rel.parent() {
            Some(p) if !p.as_os_str().is_empty() => !self.dir_excluded(p),
            _ => true,
        }
    }

    /// Like [`Filter::file_matches`] when every directory above `rel` is already known not to
    /// be excluded (during a walk that skips excluded directories).
    pub fn file_matches_in_walk(&self, rel: &Path) -> bool {
        self.include.is_match(rel) && !self.exclude.is_match(rel)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config;

    fn filter(include: &[&str], exclude: &[&str]) -> Filter {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[watch]\nroot = {:?}\ninclude = {:?}\nexclude = {:?}\n[journal]\npath = {:?}\n[storage]\nbucket = \"rec\"\naccess_key_id = \"a\"\naccess_key_secret = \"b\"\n",
            dir.path().display().to_string(),
            include,
            exclude,
            dir.path().join("j.db").display().to_string()
        );
        let s = config::from_toml_str(&toml).unwrap();
        Filter::new(s.include, s.exclude)
    }

    #[test]
    fn default_globs() {
        let f = filter(&["**/*"], &["**/.*", "**/*.tmp", "**/*.part"]);
        assert!(f.file_matches(Path::new("a.mp4")));
        assert!(f.file_matches(Path::new("2026/11/a b#?.mp4")));
        assert!(!f.file_matches(Path::new("a.mp4.tmp")));
        assert!(!f.file_matches(Path::new("x/a.part")));
        assert!(!f.file_matches(Path::new(".hidden")));
        assert!(!f.file_matches(Path::new(".cache/a.mp4")));
        assert!(!f.file_matches(Path::new("a/.cache/b/c.mp4")));
        assert!(f.dir_excluded(Path::new("a/.cache/b")));
        assert!(!f.dir_excluded(Path::new("a/b")));
    }

    #[test]
    fn include_limits_and_star_stays_in_one_component() {
        let f = filter(&["*.mp4", "live/**/*.flv"], &["tmp"]);
        assert!(f.file_matches(Path::new("a.mp4")));
        assert!(!f.file_matches(Path::new("d/a.mp4")));
        assert!(f.file_matches(Path::new("live/x/y.flv")));
        assert!(!f.file_matches(Path::new("a.flv")));
        assert!(f.dir_excluded(Path::new("tmp")));
        assert!(!f.file_matches(Path::new("tmp/a.mp4")));
    }
}
