//! An in-memory index of stored files, so that a look-up of a stored file does not read the
//! journal.
//!
//! # Why
//!
//! On a journal of a million rows, the indexed `SELECT` of a look-up walks two B-trees (the
//! path index, then the table) through several pages of a large file, a good share of the
//! look-up server's CPU per request (`bench/lookup.py`, `cargo bench --bench resolve`; the
//! figures are in the README's Benchmarks). A probe of this table costs two short hashes and
//! usually one cache line.
//!
//! # What it holds
//!
//! One entry per journal row in a stored state (`uploaded`, `deleted`) whose object key is the
//! one the key template gives for its path under this node's name (all rows, unless the
//! template or the node name changed since they were stored) and whose MD5 is known: an
//! 80-bit fingerprint of the path, the size and the MD5, 32 bytes in an open-addressing table
//! kept at most 80 % full — about 40 bytes per stored file, 40 MB per million. It never
//! holds more than `lookup.index_max_rows` entries (0 turns it off). Everything else — files
//! not stored yet, rows with other keys, rows beyond the cap — is answered from the journal,
//! as it is while the index is being built.
//!
//! # Staying right
//!
//! The index is a cache of the journal: a miss always reads the journal, and a hit must never
//! be stale. Entries are added from journal reads only: the build (a scan in a thread of its
//! own, at start) and every look-up that read a stored row the index did not have. Entries
//! are removed through the journal's `unstored` log: triggers in the schema append the path
//! of every row that leaves a stored state, changes its key, size or MD5, or is deleted —
//! whoever writes, the daemon, `record-offload import` or an operator with `sqlite3`.
//!
//! Look-ups share one read snapshot of the journal for up to 10 ms
//! ([`crate::journal::LookupReader`]). When a snapshot begins, the log entries the index has
//! not seen are applied first; entries added during the snapshot come from that same
//! snapshot. So index and journal agree as of the snapshot in use, and answers lag a
//! commit by at most the snapshot's age, as journal reads do.
//!
//! The log keeps its last [`UNSTORED_LOG_KEPT`] entries. An index that fell further behind (the look-up
//! server idle while that many stored files were recorded again) cannot know what it missed:
//! it is dropped and built again, and look-ups read the journal meanwhile.
//!
//! A fingerprint is 80 bits of SipHash-1-3 with keys drawn at random when the daemon starts.
//! With a million entries, the chance that a look-up of some other path matches one by
//! accident is about 10^6 / 2^80 ≈ 10^-18; the answer for a match is still signed for the
//! key of the path asked for.

use std::hash::{BuildHasher, RandomState};
use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

#[cfg(doc)]
use crate::journal::UNSTORED_LOG_KEPT;
use crate::journal::{self, JournalError, Snapshot, SnapshotCache, StoredRow};
use crate::util::keys::KeyTemplate;
/// The largest file size an entry holds (48 bits); larger files are read from the journal.
const MAX_SIZE: u64 = (1 << 48) - 1;
/// The smallest table.
const MIN_SLOTS: usize = 64;
/// How long look-ups read the journal after a build failed, before another is tried.
const BUILD_RETRY: Duration = Duration::from_secs(60);

/// The 80-bit fingerprint of a path. `lo` is never 0 (0 marks an empty slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    lo: u64,
    hi: u16,
}

/// Fingerprints paths with keys of its own (two SipHash-1-3 states).
#[derive(Debug, Clone, Default)]
pub struct Fingerprinter {
    a: RandomState,
    b: RandomState,
}

impl Fingerprinter {
    pub fn new() -> Fingerprinter {
        Fingerprinter::default()
    }

    pub fn of(&self, path: &[u8]) -> Fingerprint {
        Fingerprint {
            lo: self.a.hash_one(path) | 1,
            hi: self.b.hash_one(path) as u16,
        }
    }
}

/// What the index knows of a stored file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub size: u64,
    pub md5: [u8; 16],
}

/// One slot: the fingerprint's 64 low bits, its 16 high bits above the 48-bit size, the MD5.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    lo: u64,
    hi_size: u64,
    md5: [u8; 16],
}

impl Slot {
    fn is_empty(&self) -> bool {
        self.lo == 0
    }

    fn hi(&self) -> u16 {
        (self.hi_size >> 48) as u16
    }

    fn matches(&self, fp: Fingerprint) -> bool {
        self.lo == fp.lo && self.hi() == fp.hi
    }
}

/// An open-addressing table of fingerprints with linear probing, any number of slots (a slot
/// is picked by multiplying, not masking, so growth need not double), at most 80 % full.
#[derive(Debug)]
pub struct Table {
    slots: Vec<Slot>,
    len: usize,
    max_len: usize,
}

impl Table {
    /// A table that will hold up to `max_len` entries, with room for `expected` at once.
    pub fn new(expected: usize, max_len: usize) -> Table {
        Table {
            slots: empty_slots(slots_for(expected.min(max_len))),
            len: 0,
            max_len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the table occupies.
    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>()
    }

    fn home(&self, lo: u64) -> usize {
        ((u128::from(lo) * self.slots.len() as u128) >> 64) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }

    /// The slot holding `fp`, or the empty slot where it would go.
    fn find(&self, fp: Fingerprint) -> (usize, bool) {
        let mut i = self.home(fp.lo);
        loop {
            let s = &self.slots[i];
            if s.is_empty() {
                return (i, false);
            }
            if s.matches(fp) {
                return (i, true);
            }
            i = self.next(i);
        }
    }

    pub fn get(&self, fp: Fingerprint) -> Option<Entry> {
        match self.find(fp) {
            (i, true) => {
                let s = &self.slots[i];
                Some(Entry {
                    size: s.hi_size & MAX_SIZE,
                    md5: s.md5,
                })
            }
            _ => None,
        }
    }

    /// Adds or replaces an entry; `false` when the table is at its cap or the size does not
    /// fit (the file is then read from the journal).
    pub fn insert(&mut self, fp: Fingerprint, e: Entry) -> bool {
        if e.size > MAX_SIZE {
            self.remove(fp);
            return false;
        }
        let slot = Slot {
            lo: fp.lo,
            hi_size: (u64::from(fp.hi) << 48) | e.size,
            md5: e.md5,
        };
        let (i, found) = self.find(fp);
        if found {
            self.slots[i] = slot;
            return true;
        }
        if self.len >= self.max_len {
            return false;
        }
        if (self.len + 1) * 5 > self.slots.len() * 4 {
            self.grow();
            let (i, _) = self.find(fp);
            self.slots[i] = slot;
        } else {
            self.slots[i] = slot;
        }
        self.len += 1;
        true
    }

    /// Removes `fp` if present, moving later entries of its run back so that every entry
    /// stays reachable from its home slot.
    pub fn remove(&mut self, fp: Fingerprint) {
        let (mut hole, found) = self.find(fp);
        if !found {
            return;
        }
        self.slots[hole] = Slot::default();
        self.len -= 1;
        let n = self.slots.len();
        let mut j = self.next(hole);
        while !self.slots[j].is_empty() {
            let home = self.home(self.slots[j].lo);
            // Cyclic distances: the entry at j may move to the hole when the hole lies on its
            // probe path, i.e. between its home and j.
            let from_home = (j + n - home) % n;
            let from_hole = (j + n - hole) % n;
            if from_home >= from_hole {
                self.slots[hole] = self.slots[j];
                self.slots[j] = Slot::default();
                hole = j;
            }
            j = self.next(j);
        }
    }

    fn grow(&mut self) {
        let bigger = slots_for((self.len + 1).max(self.len + self.len / 2));
        let old = std::mem::replace(&mut self.slots, empty_slots(bigger));
        for s in old.into_iter().filter(|s| !s.is_empty()) {
            let mut i = self.home(s.lo);
            while !self.slots[i].is_empty() {
                i = self.next(i);
            }
            self.slots[i] = s;
        }
    }
}

/// `n` empty slots, in memory the kernel is asked to back with huge pages before it is first
/// touched: look-ups probe the table at random, and with 4 KiB pages nearly every probe also
/// missed the TLB (a probe's cost was almost all the wait for that one load).
fn empty_slots(n: usize) -> Vec<Slot> {
    let mut slots: Vec<Slot> = Vec::with_capacity(n);
    const PAGE: usize = 4096;
    let start = (slots.as_ptr() as usize).next_multiple_of(PAGE);
    let end = (slots.as_ptr() as usize + n * std::mem::size_of::<Slot>()) & !(PAGE - 1);
    if end > start {
        // SAFETY: the range lies inside the allocation just made for `slots`; MADV_HUGEPAGE
        // only changes how the kernel backs it, not its contents or validity. A refusal (no
        // transparent huge pages) leaves ordinary pages.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
    slots.resize(n, Slot::default());
    slots
}

/// Slots for `n` entries at 80 % load.
fn slots_for(n: usize) -> usize {
    (n.saturating_mul(5) / 4 + 1).max(MIN_SLOTS)
}

/// Which rows the index may hold: those whose key is the template's for this node.
#[derive(Debug, Clone)]
pub struct KeyRule {
    pub template: KeyTemplate,
    pub node: String,
}

impl KeyRule {
    /// The key a stored row must have to be indexed; `None` if the template cannot render it.
    pub fn key(&self, rel: &Path) -> Option<String> {
        self.template.render(&self.node, rel).ok()
    }
}

/// An index and the last `unstored` log entry applied to it.
struct Live {
    table: Table,
    seq: i64,
}

/// The index as look-ups use it: built in the background, kept current from the log. All
/// calls are made under the journal reader's snapshot lock, with that snapshot.
pub struct LookupIndex {
    fingerprints: Arc<Fingerprinter>,
    rule: Arc<KeyRule>,
    journal: std::path::PathBuf,
    max_rows: usize,
    live: Option<Live>,
    building: Option<mpsc::Receiver<Result<Live, JournalError>>>,
    /// After a failed build, no new one starts before this.
    retry_at: Option<Instant>,
}

impl LookupIndex {
    /// An index of at most `max_rows` entries for the journal at `journal`, not built yet
    /// ([`LookupIndex::start`], or the first refresh, starts the build).
    pub fn new(journal: &Path, rule: KeyRule, max_rows: usize) -> LookupIndex {
        LookupIndex {
            fingerprints: Arc::new(Fingerprinter::new()),
            rule: Arc::new(rule),
            journal: journal.to_path_buf(),
            max_rows,
            live: None,
            building: None,
            retry_at: None,
        }
    }

    /// Entries held (0 while building).
    pub fn len(&self) -> usize {
        self.live.as_ref().map_or(0, |l| l.table.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a build is running or waits to be put to use.
    pub fn is_building(&self) -> bool {
        self.building.is_some()
    }

    /// Whether the index is in use (built and current).
    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    fn catch_up(&mut self, snapshot: &Snapshot<'_>) {
        if let Some(rx) = &self.building {
            match rx.try_recv() {
                Ok(Ok(live)) => {
                    info!(
                        entries = live.table.len(),
                        mib = live.table.bytes() / (1 << 20),
                        "look-up index built"
                    );
                    self.live = Some(live);
                    self.building = None;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot build the look-up index; look-ups read the journal");
                    self.building = None;
                    // Not retried at once: the next snapshot would most likely fail the same way.
                    self.retry_at = Some(Instant::now() + BUILD_RETRY);
                    return;
                }
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => {
                    warn!(
                        "the look-up index build ended without a result; look-ups read the journal"
                    );
                    self.building = None;
                    self.retry_at = Some(Instant::now() + BUILD_RETRY);
                    return;
                }
            }
        }
        if let Some(live) = &mut self.live {
            match apply_log(live, snapshot, &self.fingerprints) {
                Ok(true) => return,
                Ok(false) => {
                    info!("the look-up index fell behind the journal's log; building it again");
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the journal's log; building the look-up index again")
                }
            }
            self.live = None;
        }
        self.start();
    }

    /// Starts a build in a thread of its own, unless one runs or a failed one is too recent.
    pub fn start(&mut self) {
        if self.building.is_some() || self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let (tx, rx) = mpsc::channel();
        let path = self.journal.clone();
        let fps = self.fingerprints.clone();
        let rule = self.rule.clone();
        let max = self.max_rows;
        let spawned = std::thread::Builder::new()
            .name("lookup-index".to_string())
            .spawn(move || {
                let _ = tx.send(build(&path, &fps, &rule, max));
            });
        match spawned {
            Ok(_) => self.building = Some(rx),
            Err(e) => warn!(error = %e, "cannot start the look-up index build"),
        }
    }
}

impl SnapshotCache for LookupIndex {
    type Hit = Entry;

    /// Brings the index up to the snapshot: adopts a finished build, applies the log entries
    /// not applied yet, and starts a build when there is no usable index.
    fn refresh(&mut self, snapshot: &Snapshot<'_>) {
        self.catch_up(snapshot);
        crate::service::metrics::lookup_index_entries(self.len());
    }

    fn wants_refresh(&self) -> bool {
        self.is_building()
    }

    /// The stored file at `rel`, if the index holds it.
    fn get(&self, rel: &Path) -> Option<Entry> {
        let live = self.live.as_ref()?;
        live.table
            .get(self.fingerprints.of(rel.as_os_str().as_bytes()))
    }

    /// Records a stored row read from the current snapshot.
    fn learn(&mut self, row: StoredRow<'_>) {
        let Some(live) = &mut self.live else {
            return;
        };
        if let Some(entry) = indexable(&self.rule, &row) {
            live.table.insert(self.fingerprints.of(row.path), entry);
        }
    }
}

/// The entry for a stored row, if the index may hold it.
fn indexable(rule: &KeyRule, row: &StoredRow<'_>) -> Option<Entry> {
    let md5 = parse_md5(row.md5?)?;
    let rel = Path::new(std::ffi::OsStr::from_bytes(row.path));
    (rule.key(rel).as_deref() == Some(row.key)).then_some(Entry {
        size: row.size,
        md5,
    })
}

fn parse_md5(hex: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(hex, &mut out).ok()?;
    // Only the lower-case form the journal writes, so the answer gives back the same text.
    hex.bytes().all(|b| !b.is_ascii_uppercase()).then_some(out)
}

/// Applies the log entries after `live.seq`. `Ok(false)`: some were trimmed before they were
/// seen, so the index cannot be trusted.
fn apply_log(
    live: &mut Live,
    snapshot: &Snapshot<'_>,
    fps: &Fingerprinter,
) -> Result<bool, JournalError> {
    let mut complete = true;
    snapshot.unstored_after(live.seq, |seq, path| {
        if seq != live.seq + 1 {
            complete = false;
            return false;
        }
        live.seq = seq;
        live.table.remove(fps.of(path));
        true
    })?;
    Ok(complete)
}

/// Builds the index from the journal's stored rows, in one snapshot of its own.
fn build(
    journal: &Path,
    fps: &Fingerprinter,
    rule: &KeyRule,
    max_rows: usize,
) -> Result<Live, JournalError> {
    let (live, full) = journal::scan_stored(
        journal,
        |scan| {
            let expected = usize::try_from(scan.rows).unwrap_or(0);
            let table = Table::new(expected, max_rows);
            (
                Live {
                    table,
                    seq: scan.log_seq,
                },
                false,
            )
        },
        |(live, full), row| {
            let Some(entry) = indexable(rule, &row) else {
                return ControlFlow::Continue(());
            };
            if live.table.len() >= max_rows {
                *full = true;
                return ControlFlow::Break(());
            }
            live.table.insert(fps.of(row.path), entry);
            ControlFlow::Continue(())
        },
    )?;
    if full {
        warn!(
            max_rows,
            "more stored files than lookup.index_max_rows: the rest are read from the journal"
        );
    }
    Ok(live)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn entry(i: u64) -> Entry {
        let mut md5 = [0u8; 16];
        md5[..8].copy_from_slice(&i.to_le_bytes());
        Entry { size: i * 7, md5 }
    }

    /// The table against a HashMap, through inserts, replacements and removals that make long
    /// runs wrap around the end of the slots.
    #[test]
    fn table_agrees_with_a_map() {
        let fps = Fingerprinter::new();
        let mut t = Table::new(0, usize::MAX);
        let mut m = HashMap::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for step in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = x % 5_000;
            let fp = fps.of(&k.to_le_bytes());
            if x.is_multiple_of(3) {
                t.remove(fp);
                m.remove(&k);
            } else {
                assert!(t.insert(fp, entry(step)));
                m.insert(k, entry(step));
            }
            if step.is_multiple_of(997) {
                for k in 0..5_000u64 {
                    assert_eq!(
                        t.get(fps.of(&k.to_le_bytes())),
                        m.get(&k).copied(),
                        "key {k}"
                    );
                }
            }
        }
        assert_eq!(t.len(), m.len());
        assert!(t.slots.len() * 4 >= t.len() * 5);
    }

    /// A tiny table where every entry has the same home: removal keeps the run reachable.
    #[test]
    fn removal_in_a_wrapped_run() {
        let mut t = Table::new(0, usize::MAX);
        let n = t.slots.len() as u128;
        // lo values whose home is the last slot.
        let first_lo = ((n - 1) << 64).div_ceil(n) as u64;
        let last = |k: u64| Fingerprint {
            lo: first_lo + k,
            hi: k as u16,
        };
        for k in 0..5 {
            assert_eq!(t.home(last(k).lo), t.slots.len() - 1);
            assert!(t.insert(last(k), entry(k)));
        }
        t.remove(last(1));
        for k in [0, 2, 3, 4] {
            assert_eq!(t.get(last(k)), Some(entry(k)));
        }
        assert_eq!(t.get(last(1)), None);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn cap_and_oversized_files() {
        let fps = Fingerprinter::new();
        let mut t = Table::new(0, 3);
        for k in 0..3u64 {
            assert!(t.insert(fps.of(&k.to_le_bytes()), entry(k)));
        }
        assert!(!t.insert(fps.of(b"four"), entry(4)));
        // Replacing an entry is not growth.
        assert!(t.insert(fps.of(&0u64.to_le_bytes()), entry(9)));
        let huge = Entry {
            size: MAX_SIZE + 1,
            md5: [0; 16],
        };
        assert!(!t.insert(fps.of(&1u64.to_le_bytes()), huge));
        assert_eq!(t.get(fps.of(&1u64.to_le_bytes())), None);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn fingerprints_differ_per_index_and_path() {
        let a = Fingerprinter::new();
        let b = Fingerprinter::new();
        assert_eq!(a.of(b"x/y.mp4"), a.of(b"x/y.mp4"));
        assert_ne!(a.of(b"x/y.mp4"), a.of(b"x/z.mp4"));
        assert_ne!(a.of(b"x/y.mp4"), b.of(b"x/y.mp4"));
        assert_ne!(a.of(b"").lo, 0);
    }

    #[test]
    fn only_rows_with_the_templates_key_and_a_known_md5() {
        let rule = KeyRule {
            template: KeyTemplate::parse("{node}/{path}").unwrap(),
            node: "n1".into(),
        };
        let md5 = "0123456789abcdef0123456789abcdef";
        let row = |key, md5| StoredRow {
            path: b"a/b.mp4",
            key,
            size: 5,
            md5,
        };
        assert!(indexable(&rule, &row("n1/a/b.mp4", Some(md5))).is_some());
        assert!(indexable(&rule, &row("n0/a/b.mp4", Some(md5))).is_none());
        assert!(indexable(&rule, &row("n1/a/b.mp4", None)).is_none());
        assert!(indexable(&rule, &row("n1/a/b.mp4", Some("xyz"))).is_none());
        let upper = md5.to_ascii_uppercase();
        assert!(indexable(&rule, &row("n1/a/b.mp4", Some(&upper))).is_none());
    }
}
