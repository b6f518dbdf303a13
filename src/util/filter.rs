//! `watch.include` / `watch.exclude`: which paths under the root are recordings.

use std::path::Path;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// Globs are matched against the path relative to the root. A file is taken when an include
/// glob matches it and no exclude glob matches it or any directory above it, so excluding a
/// directory excludes everything under it.
#[derive(Debug, Clone)]
pub struct Filter {
    include: GlobSet,
    exclude: GlobSet,
}

/// A glob that does not compile: its index in the list and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadGlob {
    /// The entry's index; `None` when the set as a whole could not be built.
    pub index: Option<usize>,
    pub message: String,
}

/// Compiles a list of globs as the config spells them: `*` stays inside one path component,
/// `**` crosses them, a backslash escapes the next character.
pub fn glob_set(patterns: &[String]) -> Result<GlobSet, BadGlob> {
    let mut builder = GlobSetBuilder::new();
    for (i, pattern) in patterns.iter().enumerate() {
        let glob = compile_glob(pattern).map_err(|e| BadGlob {
            index: Some(i),
            message: format!("bad glob {pattern:?}: {e}"),
        })?;
        builder.add(glob);
    }
    builder.build().map_err(|e| BadGlob {
        index: None,
        message: format!("bad glob set: {e}"),
    })
}

fn compile_glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern)
        // `*` stays inside one path component; `**` crosses them.
        .literal_separator(true)
        .backslash_escape(true)
        .build()
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

    fn filter(include: &[&str], exclude: &[&str]) -> Filter {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Filter::new(
            glob_set(&list(include)).unwrap(),
            glob_set(&list(exclude)).unwrap(),
        )
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
