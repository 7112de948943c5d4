//! A schema compiled against one file's header ([`Plan`]), and the
//! evaluation of rows: derived fields, join lookups, label, features, crosses.

use super::{Derived, Kind, LabelRule, Op, Schema, is_na, push_key_part};
use crate::DataError;
use crate::csv::{Fields, Split as CsvSplit};
use crate::text::push_int;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

/// Where a named value of a row comes from.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Column(usize),
    Derived(usize),
    Joined { join: usize, col: usize },
}

/// One evaluation step, in dependency order.
#[derive(Debug)]
enum Step {
    Derive { d: usize, inputs: Vec<Slot> },
    Join { j: usize, keys: Vec<Slot> },
}

/// A schema compiled against one file's header: evaluates rows into examples.
pub(crate) struct Plan {
    schema: Arc<Schema>,
    columns: usize,
    steps: Vec<Step>,
    label: Slot,
    features: Vec<Slot>,
    // Per-row scratch, reused.
    fields: Fields,
    derived: Vec<String>,
    derived_ok: Vec<bool>,
    hits: Vec<Option<u32>>,
    key: Vec<u8>,
    toks: String,
    tok_at: Vec<Option<Range<usize>>>,
    /// The key of each feature, then each cross, of the row last evaluated
    /// ([`MISSING_KEY`] where the row has none), for readers that keep the
    /// fields apart ([`crate::Reader::field_keys`]).
    by_field: Vec<u64>,
}

/// In [`crate::Reader::field_keys`], a field the row has no value for.
/// No feature hashes to it: keys are below `u64::MAX`.
pub const MISSING_KEY: u64 = u64::MAX;

/// The parts of a row that values are read from.
struct View<'a> {
    record: &'a str,
    fields: &'a Fields,
    schema: &'a Schema,
    derived: &'a [String],
    derived_ok: &'a [bool],
    hits: &'a [Option<u32>],
}

impl View<'_> {
    fn get(&self, slot: Slot) -> Option<&str> {
        match slot {
            Slot::Column(c) => {
                let v = self.fields.get(self.record, c)?;
                (!is_na(&self.schema.na, v)).then_some(v)
            }
            Slot::Derived(d) => self.derived_ok[d].then(|| self.derived[d].as_str()),
            Slot::Joined { join, col } => {
                let t = &self.schema.joins[join].table;
                let row = self.hits[join]? as usize;
                t.cells.get(row * t.width + col)?.as_deref()
            }
        }
    }
}

struct Compiler<'a> {
    schema: &'a Schema,
    header: HashMap<&'a str, Option<usize>>,
    data_path: &'a str,
    derived_slot: Vec<bool>,
    join_done: Vec<bool>,
    steps: Vec<Step>,
}

impl Compiler<'_> {
    fn resolve(&mut self, name: &str, needed_by: &str) -> Result<Slot, DataError> {
        if let Some(d) = self.schema.derived.iter().position(|x| x.name == name) {
            if !self.derived_slot[d] {
                // Cycles were refused at load, so this recursion ends.
                let mut inputs = Vec::new();
                let def = &self.schema.derived[d];
                for (i, input) in def.inputs.iter().enumerate() {
                    let by = format!("derived.{name}.{}[{i}]", def.op.key());
                    inputs.push(self.resolve(input, &by)?);
                }
                self.derived_slot[d] = true;
                self.steps.push(Step::Derive { d, inputs });
            }
            return Ok(Slot::Derived(d));
        }
        for (j, join) in self.schema.joins.iter().enumerate() {
            let Some(col) = join
                .columns
                .iter()
                .position(|c| name.strip_prefix(join.prefix.as_str()) == Some(c.as_str()))
            else {
                continue;
            };
            if !self.join_done[j] {
                let mut keys = Vec::new();
                for (i, k) in join.on.iter().enumerate() {
                    keys.push(self.resolve(k, &format!("join[{j}].on[{i}]"))?);
                }
                self.join_done[j] = true;
                self.steps.push(Step::Join { j, keys });
            }
            return Ok(Slot::Joined { join: j, col });
        }
        match self.header.get(name) {
            Some(Some(c)) => Ok(Slot::Column(*c)),
            Some(None) => Err(DataError::Header {
                path: self.data_path.to_string(),
                message: format!(
                    "column `{name}` (needed by {needed_by}) appears more than once in the header"
                ),
            }),
            None => Err(DataError::Header {
                path: self.data_path.to_string(),
                message: format!(
                    "`{name}` (needed by {needed_by} in {}) is not a column of the header, a derived field or a joined column",
                    self.schema.path
                ),
            }),
        }
    }
}

impl Plan {
    /// Compiles `schema` against a header.
    pub(crate) fn new(
        schema: Arc<Schema>,
        header: &[String],
        data_path: &str,
    ) -> Result<Plan, DataError> {
        let mut map: HashMap<&str, Option<usize>> = HashMap::new();
        for (i, h) in header.iter().enumerate() {
            map.entry(h.as_str())
                .and_modify(|e| *e = None)
                .or_insert(Some(i));
        }
        // A derived or joined name that is also a header column would be
        // silently shadowed; say so instead.
        let mut own: HashSet<String> = schema.derived.iter().map(|d| d.name.clone()).collect();
        for j in &schema.joins {
            own.extend(j.columns.iter().map(|c| format!("{}{c}", j.prefix)));
        }
        if let Some(clash) = header.iter().find(|h| own.contains(h.as_str())) {
            return Err(DataError::Header {
                path: data_path.to_string(),
                message: format!(
                    "column `{clash}` is also a derived or joined field of {}; rename one",
                    schema.path
                ),
            });
        }
        let mut c = Compiler {
            schema: &schema,
            header: map,
            data_path,
            derived_slot: vec![false; schema.derived.len()],
            join_done: vec![false; schema.joins.len()],
            steps: Vec::new(),
        };
        let label = c.resolve(&schema.label.field, "label.field")?;
        let mut features = Vec::new();
        for f in &schema.features {
            let by = if matches!(f.kind, Kind::Categorical) {
                f.place.clone()
            } else {
                format!("{}.field", f.place)
            };
            features.push(c.resolve(&f.field, &by)?);
        }
        let steps = c.steps;
        let nd = schema.derived.len();
        let nj = schema.joins.len();
        let nf = schema.features.len();
        Ok(Plan {
            columns: header.len(),
            steps,
            label,
            features,
            fields: Fields::default(),
            derived: vec![String::new(); nd],
            derived_ok: vec![false; nd],
            hits: vec![None; nj],
            key: Vec::new(),
            toks: String::new(),
            tok_at: vec![None; nf],
            by_field: vec![MISSING_KEY; nf + schema.crosses.len()],
            schema,
        })
    }

    /// The key of each feature, then each cross, of the row last evaluated
    /// by [`Plan::row`] (in [`Schema::feature_names`] order).
    pub(crate) fn field_keys(&self) -> &[u64] {
        &self.by_field
    }

    /// The schema's field delimiter.
    pub(crate) fn delimiter(&self) -> u8 {
        self.schema.delimiter
    }

    /// Evaluates one record. `Ok(None)`: the label is missing (the row is
    /// skipped, not bad). Features go to `feats` (unsorted, may repeat).
    pub(crate) fn row(
        &mut self,
        record: &str,
        feats: &mut Vec<(u64, f32)>,
    ) -> Result<Option<f32>, String> {
        match self.fields.split(record, self.schema.delimiter)? {
            CsvSplit::Complete => {}
            CsvSplit::Open => return Err("quoted field not closed".into()),
        }
        if self.fields.len() != self.columns {
            return Err(format!(
                "expected {} fields, found {}",
                self.columns,
                self.fields.len()
            ));
        }
        let schema = &*self.schema;
        for step in &self.steps {
            match step {
                Step::Derive { d, inputs } => {
                    let mut out = std::mem::take(&mut self.derived[*d]);
                    out.clear();
                    let view = View {
                        record,
                        fields: &self.fields,
                        schema,
                        derived: &self.derived,
                        derived_ok: &self.derived_ok,
                        hits: &self.hits,
                    };
                    let ok = derive(&schema.derived[*d], inputs, &view, &mut out)?;
                    self.derived[*d] = out;
                    self.derived_ok[*d] = ok;
                }
                Step::Join { j, keys } => {
                    let view = View {
                        record,
                        fields: &self.fields,
                        schema,
                        derived: &self.derived,
                        derived_ok: &self.derived_ok,
                        hits: &self.hits,
                    };
                    self.key.clear();
                    let mut complete = true;
                    for &k in keys {
                        match view.get(k) {
                            Some(v) => push_key_part(&mut self.key, v),
                            None => {
                                complete = false;
                                break;
                            }
                        }
                    }
                    let hit = if complete {
                        schema.joins[*j].table.index.get(&self.key).copied()
                    } else {
                        None
                    };
                    self.hits[*j] = hit;
                }
            }
        }
        let view = View {
            record,
            fields: &self.fields,
            schema,
            derived: &self.derived,
            derived_ok: &self.derived_ok,
            hits: &self.hits,
        };
        let Some(lv) = view.get(self.label) else {
            return Ok(None);
        };
        let label = match &schema.label.rule {
            LabelRule::In(vals) => vals.iter().any(|v| v == lv),
            LabelRule::Cmp(cmp, t) => match lv.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => cmp.holds(x, *t),
                _ => {
                    return Err(format!(
                        "label.field `{}`: `{lv}` is not a finite number",
                        schema.label.field
                    ));
                }
            },
        };

        // Each feature's token (its value, or its bucket), kept for crosses.
        self.toks.clear();
        self.by_field.fill(MISSING_KEY);
        for (i, (f, &slot)) in schema.features.iter().zip(&self.features).enumerate() {
            self.tok_at[i] = None;
            let Some(v) = view.get(slot) else { continue };
            let start = self.toks.len();
            match &f.kind {
                Kind::Categorical => self.toks.push_str(v),
                kind => {
                    let x: f64 = v.trim().parse().map_err(|_| {
                        format!("{} (`{}`): `{v}` is not a number", f.place, f.field)
                    })?;
                    if !x.is_finite() {
                        continue;
                    }
                    push_int(&mut self.toks, bucket(kind, x));
                }
            }
            let tok = &self.toks[start..];
            let key = f.prefix.part(tok.as_bytes()).finish();
            feats.push((key, 1.0));
            self.by_field[i] = key;
            self.tok_at[i] = Some(start..self.toks.len());
        }
        let nf = schema.features.len();
        'cross: for (ci, c) in schema.crosses.iter().enumerate() {
            let mut h = c.prefix;
            for &p in &c.parts {
                let Some(r) = &self.tok_at[p] else {
                    continue 'cross;
                };
                h = h.part(self.toks[r.clone()].as_bytes());
            }
            let key = h.finish();
            feats.push((key, 1.0));
            self.by_field[nf + ci] = key;
        }
        Ok(Some(if label { 1.0 } else { 0.0 }))
    }
}

/// The bucket of `x` (finite). Log2 buckets: 0 for |x| < 1, else
/// floor(log2|x|) + 1, negated for negative x.
fn bucket(kind: &Kind, x: f64) -> i64 {
    match kind {
        Kind::Buckets(edges) => edges.partition_point(|&e| e <= x) as i64,
        _ => {
            let a = x.abs();
            let b = if a < 1.0 {
                0
            } else {
                a.log2().floor() as i64 + 1
            };
            if x < 0.0 { -b } else { b }
        }
    }
}

/// Computes a derived field into `out`; `Ok(false)` if an input is missing.
fn derive(d: &Derived, inputs: &[Slot], view: &View<'_>, out: &mut String) -> Result<bool, String> {
    match &d.op {
        Op::Concat(sep) => {
            for (i, &s) in inputs.iter().enumerate() {
                let Some(v) = view.get(s) else {
                    return Ok(false);
                };
                if i > 0 {
                    out.push_str(sep);
                }
                out.push_str(v);
            }
            Ok(true)
        }
        Op::Weekday => {
            let mut ymd = [0i64; 3];
            for (slot, n) in inputs.iter().zip(ymd.iter_mut()) {
                let Some(v) = view.get(*slot) else {
                    return Ok(false);
                };
                *n = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("derived.{}: `{v}` is not an integer", d.name))?;
            }
            let [y, m, day] = ymd;
            let w = weekday(y, m, day)
                .ok_or_else(|| format!("derived.{}: {y}-{m}-{day} is not a date", d.name))?;
            out.push_str(["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][w]);
            Ok(true)
        }
    }
}

fn leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// Day of the week of a proleptic Gregorian date, 0 = Monday; `None` if
/// the date does not exist (or the year is absurd).
pub(crate) fn weekday(y: i64, m: i64, d: i64) -> Option<usize> {
    if !(-1_000_000..=1_000_000).contains(&y) || !(1..=12).contains(&m) {
        return None;
    }
    let len = match m {
        2 if leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=len).contains(&d) {
        return None;
    }
    // Days since 1970-01-01 (H. Hinnant's days_from_civil), a Thursday.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days + 3).rem_euclid(7) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weekdays() {
        assert_eq!(weekday(1970, 1, 1), Some(3)); // Thursday
        assert_eq!(weekday(2013, 1, 1), Some(1)); // Tuesday
        assert_eq!(weekday(2000, 2, 29), Some(1)); // Tuesday
        assert_eq!(weekday(2024, 3, 1), Some(4)); // Friday
        assert_eq!(weekday(1600, 1, 1), Some(5)); // Saturday
        assert_eq!(weekday(2013, 2, 29), None);
        assert_eq!(weekday(1900, 2, 29), None);
        assert_eq!(weekday(2013, 13, 1), None);
        assert_eq!(weekday(2013, 4, 31), None);
        assert_eq!(weekday(i64::MAX, 1, 1), None);
    }

    #[test]
    fn weekdays_advance_one_a_day() {
        let mut prev = weekday(1999, 12, 31).unwrap();
        for y in 2000..2030 {
            for m in 1..=12 {
                for d in 1..=31 {
                    if let Some(w) = weekday(y, m, d) {
                        assert_eq!(w, (prev + 1) % 7, "{y}-{m}-{d}");
                        prev = w;
                    }
                }
            }
        }
    }

    #[test]
    fn buckets() {
        let k = Kind::Buckets(vec![0.0, 10.0]);
        assert_eq!(bucket(&k, -1.0), 0);
        assert_eq!(bucket(&k, 0.0), 1);
        assert_eq!(bucket(&k, 9.9), 1);
        assert_eq!(bucket(&k, 10.0), 2);
        assert_eq!(bucket(&Kind::Log2, 0.5), 0);
        assert_eq!(bucket(&Kind::Log2, 1.0), 1);
        assert_eq!(bucket(&Kind::Log2, 3.9), 2);
        assert_eq!(bucket(&Kind::Log2, 4.0), 3);
        assert_eq!(bucket(&Kind::Log2, -4.0), -3);
        assert_eq!(bucket(&Kind::Log2, f64::MAX), 1025); // log2 rounds up to 1024.0
    }
}
