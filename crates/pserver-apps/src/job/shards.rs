//! Which worker reads which data: the scheduler's decisions, as plain
//! functions of who can read what (no I/O), so they are tested directly.
//!
//! Several files are given whole, largest first to the least loaded worker
//! that can read each. One file is cut into line shards, one per worker
//! that can read it. A lost worker's units go to the least loaded live
//! worker that can read them (or wait, orphaned, for one that joins). A
//! worker that joins takes a share: one file is cut anew over every
//! worker; of several files it takes the largest ones it can read from the
//! most loaded workers while that evens the load.

use super::Unit;
use super::proto::FileInfo;
use std::collections::BTreeMap;

/// A worker's slot in the scheduler's table.
pub type Slot = usize;

/// Who holds which units, and the files each worker can read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Assignment {
    /// Units per live worker.
    pub units: BTreeMap<Slot, Vec<Unit>>,
    /// What each live worker can read (path -> bytes).
    pub readable: BTreeMap<Slot, BTreeMap<String, u64>>,
    /// Units no live worker can read: they wait for a worker that can.
    pub orphans: Vec<Unit>,
}

/// Why no assignment could be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShardError {
    /// No worker can read any training file.
    #[error("no worker can read any training file (they were offered {0})")]
    NothingReadable(String),
}

impl Assignment {
    /// The first assignment: every worker's readable files as offered.
    pub fn new(
        offers: &BTreeMap<Slot, Vec<FileInfo>>,
        named: &str,
    ) -> Result<Assignment, ShardError> {
        let mut a = Assignment::default();
        for (&s, files) in offers {
            a.readable
                .insert(s, files.iter().map(|f| (f.path.clone(), f.bytes)).collect());
            a.units.insert(s, Vec::new());
        }
        let files = a.all_files();
        if files.is_empty() {
            return Err(ShardError::NothingReadable(named.to_string()));
        }
        if let [(path, _)] = files.as_slice() {
            a.cut(path);
            return Ok(a);
        }
        let mut by_size = files;
        by_size.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
        for (path, _) in by_size {
            if let Some(s) = a.least_loaded(&path, None) {
                a.units.entry(s).or_default().push(Unit::file(path));
            }
        }
        Ok(a)
    }

    /// Every file some worker can read, with its size.
    fn all_files(&self) -> Vec<(String, u64)> {
        let mut all: BTreeMap<&str, u64> = BTreeMap::new();
        for files in self.readable.values() {
            for (p, b) in files {
                all.insert(p, *b);
            }
        }
        all.into_iter().map(|(p, b)| (p.to_string(), b)).collect()
    }

    /// Whether the job reads one file in line shards.
    fn one_file(&self) -> Option<String> {
        let files = self.all_files();
        match files.as_slice() {
            [(p, _)] => Some(p.clone()),
            _ => None,
        }
    }

    /// Cuts `path` into one line shard per worker that can read it.
    fn cut(&mut self, path: &str) {
        let readers: Vec<Slot> = self
            .readable
            .iter()
            .filter(|(_, f)| f.contains_key(path))
            .map(|(s, _)| *s)
            .collect();
        for u in self.units.values_mut() {
            u.clear();
        }
        self.orphans.clear();
        for (i, s) in readers.iter().enumerate() {
            self.units.insert(
                *s,
                vec![Unit {
                    path: path.to_string(),
                    index: i,
                    count: readers.len(),
                }],
            );
        }
    }

    /// The bytes a worker reads: whole files, and a share of sharded ones.
    fn load(&self, s: Slot) -> u64 {
        self.units.get(&s).map_or(0, |units| {
            units
                .iter()
                .map(|u| self.size(&u.path) / u.count.max(1) as u64)
                .sum()
        })
    }

    fn size(&self, path: &str) -> u64 {
        self.readable
            .values()
            .find_map(|f| f.get(path).copied())
            .unwrap_or(0)
    }

    /// The least loaded worker that can read `path`, other than `not`.
    fn least_loaded(&self, path: &str, not: Option<Slot>) -> Option<Slot> {
        self.readable
            .iter()
            .filter(|(s, f)| Some(**s) != not && f.contains_key(path))
            .map(|(s, _)| *s)
            .min_by_key(|s| (self.load(*s), *s))
    }

    /// Worker `s` is gone: its units go to the least loaded worker that can
    /// read each (or become orphans). Returns the workers whose units
    /// changed.
    pub fn lose(&mut self, s: Slot) -> Vec<Slot> {
        self.readable.remove(&s);
        let units = self.units.remove(&s).unwrap_or_default();
        let mut changed = Vec::new();
        for u in units {
            match self.least_loaded(&u.path, None) {
                Some(to) => {
                    self.units.entry(to).or_default().push(u);
                    if !changed.contains(&to) {
                        changed.push(to);
                    }
                }
                None => self.orphans.push(u),
            }
        }
        changed.sort_unstable();
        changed
    }

    /// Worker `s` joins with what it can read. Returns the workers whose
    /// units changed (`s` among them when it was given any).
    pub fn join(&mut self, s: Slot, files: &[FileInfo]) -> Vec<Slot> {
        let before = self.units.clone();
        self.readable
            .insert(s, files.iter().map(|f| (f.path.clone(), f.bytes)).collect());
        self.units.insert(s, Vec::new());
        // Orphans it can read are its own.
        let (mine, rest): (Vec<Unit>, Vec<Unit>) = std::mem::take(&mut self.orphans)
            .into_iter()
            .partition(|u| self.readable[&s].contains_key(&u.path));
        self.orphans = rest;
        self.units.entry(s).or_default().extend(mine);
        if let Some(path) = self.one_file() {
            if self.readable[&s].contains_key(&path) {
                self.cut(&path);
            }
        } else {
            // Take files from the most loaded workers while that evens the
            // load: a move from `from` to `s` helps when `from` keeps more
            // than `s` then holds.
            loop {
                let mut best: Option<(Slot, usize, u64)> = None;
                for (&from, units) in &self.units {
                    if from == s {
                        continue;
                    }
                    for (i, u) in units.iter().enumerate() {
                        let size = self.size(&u.path) / u.count.max(1) as u64;
                        let helps = u.count == 1
                            && self.readable[&s].contains_key(&u.path)
                            && self.load(from) - size >= self.load(s) + size
                            && units.len() > 1;
                        if helps && best.is_none_or(|b| size > b.2) {
                            best = Some((from, i, size));
                        }
                    }
                }
                let Some((from, i, _)) = best else { break };
                let u = self.units.get_mut(&from).map(|v| v.remove(i));
                self.units.entry(s).or_default().extend(u);
            }
        }
        let mut changed: Vec<Slot> = self
            .units
            .iter()
            .filter(|(k, v)| before.get(k).is_none_or(|b| b != *v))
            .map(|(k, _)| *k)
            .collect();
        changed.retain(|k| *k == s || before.contains_key(k));
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, u64)]) -> Vec<FileInfo> {
        list.iter()
            .map(|(p, b)| FileInfo {
                path: p.to_string(),
                bytes: *b,
            })
            .collect()
    }

    fn every_line_once(a: &Assignment, path: &str) -> bool {
        // Line n belongs to the units with n % count == index: exactly one.
        (0..120).all(|n| {
            a.units
                .values()
                .flatten()
                .chain(&a.orphans)
                .filter(|u| u.path == path && n % u.count == u.index)
                .count()
                == 1
        })
    }

    #[test]
    fn one_file_is_cut_into_a_line_shard_per_worker() {
        let offers: BTreeMap<Slot, Vec<FileInfo>> =
            (0..3).map(|s| (s, files(&[("d.csv", 900)]))).collect();
        let a = Assignment::new(&offers, "d.csv").unwrap();
        assert!(a.units.values().all(|u| u.len() == 1 && u[0].count == 3));
        assert!(every_line_once(&a, "d.csv"));
    }

    #[test]
    fn several_files_go_whole_and_evenly_to_workers_that_can_read_them() {
        let mut offers = BTreeMap::new();
        offers.insert(0, files(&[("a", 100), ("b", 90), ("c", 50), ("d", 40)]));
        offers.insert(1, files(&[("a", 100), ("b", 90), ("c", 50), ("d", 40)]));
        // Worker 2 holds only its local file.
        offers.insert(2, files(&[("local2", 120)]));
        let a = Assignment::new(&offers, "*").unwrap();
        assert_eq!(a.units[&2], [Unit::file("local2")]);
        let load = |s| a.load(s);
        assert_eq!(load(0) + load(1), 280);
        assert!(load(0).abs_diff(load(1)) <= 20, "{a:?}");
    }

    #[test]
    fn nothing_readable_is_an_error_naming_what_was_offered() {
        let offers: BTreeMap<Slot, Vec<FileInfo>> = [(0, vec![]), (1, vec![])].into();
        assert_eq!(
            Assignment::new(&offers, "part-*.gz"),
            Err(ShardError::NothingReadable("part-*.gz".into()))
        );
    }

    #[test]
    fn a_lost_workers_units_go_to_the_least_loaded_reader_or_wait() {
        let mut offers = BTreeMap::new();
        offers.insert(0, files(&[("a", 100), ("b", 100)]));
        offers.insert(1, files(&[("a", 100), ("b", 100)]));
        offers.insert(2, files(&[("only2", 100)]));
        let mut a = Assignment::new(&offers, "*").unwrap();
        let held_by_1 = a.units[&1].clone();
        assert_eq!(a.lose(1), [0]);
        assert!(held_by_1.iter().all(|u| a.units[&0].contains(u)));
        assert!(a.lose(2).is_empty());
        assert_eq!(a.orphans, [Unit::file("only2")]);
        // A worker that can read the orphan takes it on joining.
        let changed = a.join(3, &files(&[("only2", 100)]));
        assert_eq!(changed, [3]);
        assert_eq!(a.units[&3], [Unit::file("only2")]);
        assert!(a.orphans.is_empty());
    }

    #[test]
    fn lines_stay_covered_once_through_losses_and_joins() {
        let offers: BTreeMap<Slot, Vec<FileInfo>> =
            (0..3).map(|s| (s, files(&[("d", 300)]))).collect();
        let mut a = Assignment::new(&offers, "d").unwrap();
        assert_eq!(a.lose(2), [0]);
        assert!(every_line_once(&a, "d"));
        // The one joining takes a share: the file is cut anew over all
        // (worker 1 keeps the shard it had, so only 0 and 5 change).
        let changed = a.join(5, &files(&[("d", 300)]));
        assert_eq!(changed, [0, 5]);
        assert!(a.units.values().all(|u| u.len() == 1 && u[0].count == 3));
        assert!(every_line_once(&a, "d"));
    }

    #[test]
    fn a_join_takes_files_while_that_evens_the_load() {
        let mut offers = BTreeMap::new();
        let all = files(&[("a", 10), ("b", 10), ("c", 10), ("d", 10)]);
        offers.insert(0, all.clone());
        offers.insert(1, all.clone());
        let mut a = Assignment::new(&offers, "*").unwrap();
        let changed = a.join(2, &all);
        assert!(changed.contains(&2), "{changed:?}");
        let loads: Vec<u64> = (0..3).map(|s| a.load(s)).collect();
        assert_eq!(loads.iter().sum::<u64>(), 40);
        assert!(loads.iter().all(|l| (10..=20).contains(l)), "{loads:?}");
    }
}
