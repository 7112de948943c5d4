//! CSV schemas: which column is the label, which columns become hashed
//! features, derived columns, joins with side tables, crosses, holdout.
//!
//! A [`Schema`] is parsed and checked once ([`load_schema`]), side tables
//! included, and shared (`Arc`) by every reader. Each reader then compiles
//! it against its file's header into a plan, which evaluates rows.
//!
//! ```toml
//! label = { field = "arr_delay", ge = 15.0 }   # or gt/le/lt (numbers), eq/in (strings)
//! categorical = ["carrier", "origin", "route", "dow"]
//! numeric = [
//!   { field = "distance", buckets = [500.0, 1000.0, 2000.0] },
//!   { field = "weather_precip", log2 = true, name = "rain" },
//! ]
//! crosses = [["carrier", "origin"], ["route", "hour"]]
//!
//! [csv]                        # optional
//! delimiter = ","
//! na = ["NA", ""]              # values that mean "missing"
//!
//! [derived]
//! route = { concat = ["origin", "dest"], sep = "-" }
//! dow = { weekday = ["year", "month", "day"] }
//!
//! [[join]]
//! file = "planes.csv.gz"       # relative to the schema's directory
//! on = ["tailnum"]             # columns of the data (or derived fields)
//! right_on = ["tailnum"]       # columns of the side table; default: same as `on`
//! prefix = "plane_"            # side column `year` becomes `plane_year`
//! columns = ["year", "seats"]  # optional; default: all but the key columns
//!
//! [split]
//! test_fraction = 0.2
//! seed = 13
//! ```
//!
//! What it means:
//!
//! * **Names.** A field name is a header column, a derived field, or a
//!   joined column (`prefix` + side column). Derived and joined names must
//!   not repeat header columns. Unknown names fail at `open` with the TOML
//!   key that used them.
//! * **Missing values.** A value in `csv.na` (default `NA` and empty) is
//!   missing. A row whose label is missing is skipped and counted in
//!   [`ReadStats::skipped`](crate::ReadStats::skipped) (a cancelled flight);
//!   a missing feature value gives no feature; a derived field with a missing
//!   input is missing; a join whose key has a missing part finds no row.
//! * **Label.** `ge`/`gt`/`le`/`lt` compare the value as a number (not a
//!   finite number: bad line); `eq`/`in` compare strings. Positive is 1.
//! * **Features.** Every feature has value 1 and key
//!   [`hash_feature`](crate::hash::hash_feature)`([name, token])`, where the
//!   token of a categorical feature is its value, and of a numeric one its
//!   bucket index in decimal: with `buckets = [e0, e1, ...]`, bucket `i`
//!   holds `e(i-1) <= x < e(i)` (0 below `e0`); with `log2 = true` it is 0
//!   for `|x| < 1`, else `floor(log2 |x|) + 1`, negated for negative `x`.
//!   A numeric value that is not a number is a bad line; `inf`/`NaN` give no
//!   feature. `name` defaults to `field` and is part of the key.
//! * **Crosses** name two or more features; the key is
//!   `hash_feature([name1, .., nameK, token1, .., tokenK])`; a cross with a
//!   missing part is left out.
//! * **Derived fields.** `concat` joins values with `sep` (default `|`);
//!   `weekday` takes integer year, month, day columns and gives `Mon`..`Sun`
//!   (an impossible date is a bad line). Derived fields may use joined
//!   columns and join keys may use derived fields; cycles are refused.
//! * **Joins.** The side table is read whole at load, gzip/zstd allowed. On
//!   duplicate keys the first row wins; side-table NA values are missing. A
//!   malformed side table fails the load ([`DataError::Table`]).
//! * **Split.** See [`Holdout`]; `ReadOptions::holdout` overrides it.

mod plan;

pub use plan::MISSING_KEY;
pub(crate) use plan::Plan;

use crate::csv::{Fields, Split as CsvSplit};
use crate::hash::KeyHasher;
use crate::reader::{Rec, next_record};
use crate::source::open_lines;
use crate::{DataError, Holdout};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The longest line of a side table.
const SIDE_MAX_LINE: usize = 16 << 20;

// ---------------------------------------------------------------- TOML form

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    label: RawLabel,
    #[serde(default)]
    categorical: Vec<String>,
    #[serde(default)]
    numeric: Vec<RawNumeric>,
    #[serde(default)]
    crosses: Vec<Vec<String>>,
    #[serde(default)]
    csv: RawCsv,
    #[serde(default)]
    derived: BTreeMap<String, RawDerived>,
    #[serde(default)]
    join: Vec<RawJoin>,
    split: Option<RawSplit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabel {
    field: String,
    ge: Option<f64>,
    gt: Option<f64>,
    le: Option<f64>,
    lt: Option<f64>,
    eq: Option<String>,
    #[serde(rename = "in")]
    one_of: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNumeric {
    field: String,
    name: Option<String>,
    buckets: Option<Vec<f64>>,
    log2: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCsv {
    delimiter: Option<String>,
    na: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDerived {
    concat: Option<Vec<String>>,
    sep: Option<String>,
    weekday: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJoin {
    file: String,
    on: Vec<String>,
    right_on: Option<Vec<String>>,
    prefix: String,
    columns: Option<Vec<String>>,
    delimiter: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    test_fraction: f64,
    seed: u64,
}

// ---------------------------------------------------------- checked schema

/// A parsed and checked CSV schema (see the [module docs](self) for the
/// TOML syntax). Side tables of joins are loaded in memory here, so share
/// one `Schema` between readers through an `Arc`.
#[derive(Debug)]
pub struct Schema {
    path: String,
    delimiter: u8,
    na: Vec<String>,
    label: Label,
    derived: Vec<Derived>,
    joins: Vec<Join>,
    features: Vec<Feature>,
    crosses: Vec<Cross>,
    holdout: Option<Holdout>,
}

#[derive(Debug)]
struct Label {
    field: String,
    rule: LabelRule,
}

#[derive(Debug)]
enum LabelRule {
    /// Positive iff the value, a number, compares so with the threshold.
    Cmp(Cmp, f64),
    /// Positive iff the value is one of these strings.
    In(Vec<String>),
}

#[derive(Clone, Copy, Debug)]
enum Cmp {
    Ge,
    Gt,
    Le,
    Lt,
}

impl Cmp {
    fn holds(self, x: f64, t: f64) -> bool {
        match self {
            Cmp::Ge => x >= t,
            Cmp::Gt => x > t,
            Cmp::Le => x <= t,
            Cmp::Lt => x < t,
        }
    }
}

#[derive(Debug)]
struct Derived {
    name: String,
    op: Op,
    inputs: Vec<String>,
}

#[derive(Debug)]
enum Op {
    Concat(String),
    Weekday,
}

impl Op {
    /// The TOML key of the operation, for messages.
    fn key(&self) -> &'static str {
        match self {
            Op::Concat(_) => "concat",
            Op::Weekday => "weekday",
        }
    }
}

#[derive(Debug)]
struct Join {
    on: Vec<String>,
    prefix: String,
    columns: Vec<String>,
    table: SideTable,
}

/// A side table: selected columns of every row, NA already turned into
/// `None`, and an index from the encoded key to the row.
struct SideTable {
    file: String,
    width: usize,
    cells: Vec<Option<Box<str>>>,
    index: HashMap<Vec<u8>, u32>,
}

impl std::fmt::Debug for SideTable {
    // Thousands of rows are no use in a debug print; the shape is.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideTable")
            .field("file", &self.file)
            .field(
                "rows",
                &self.cells.len().checked_div(self.width).unwrap_or(0),
            )
            .field("columns", &self.width)
            .finish()
    }
}

#[derive(Debug)]
struct Feature {
    /// The feature's name: hashed into its keys, and what crosses refer to.
    name: String,
    /// The column (or derived/joined field) it reads.
    field: String,
    /// Where it is defined, for messages (`categorical[3]`, `numeric[0]`).
    place: String,
    kind: Kind,
    prefix: KeyHasher,
}

#[derive(Debug)]
enum Kind {
    Categorical,
    /// Bucket `i` holds `edges[i-1] <= v < edges[i]`.
    Buckets(Vec<f64>),
    Log2,
}

#[derive(Debug)]
struct Cross {
    parts: Vec<usize>,
    prefix: KeyHasher,
}

impl Schema {
    /// The schema file, as shown in messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The field delimiter of data files and side tables.
    pub(crate) fn delimiter(&self) -> u8 {
        self.delimiter
    }

    /// The holdout of the `[split]` table, if any.
    pub fn holdout(&self) -> Option<Holdout> {
        self.holdout
    }

    /// Names of the features, in schema order (categorical, then numeric),
    /// then the crosses as `a^b`.
    pub fn feature_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.features.iter().map(|f| f.name.clone()).collect();
        for c in &self.crosses {
            let names: Vec<&str> = c
                .parts
                .iter()
                .map(|&p| self.features[p].name.as_str())
                .collect();
            v.push(names.join("^"));
        }
        v
    }

    /// Parses schema text. `path` is used in messages, and its directory is
    /// where the side tables of joins are looked for.
    pub fn parse(text: &str, path: &Path) -> Result<Schema, DataError> {
        let shown = path.display().to_string();
        let raw: RawSchema =
            toml::from_str(text).map_err(|e| DataError::schema(&shown, e.to_string()))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        build(raw, &shown, &base)
    }
}

/// Reads and checks the schema at `path`, loading its side tables.
pub fn load_schema(path: &Path) -> Result<Schema, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Open {
        path: path.display().to_string(),
        os: Arc::new(e),
    })?;
    Schema::parse(&text, path)
}

fn one_char(v: Option<String>, key: &str, shown: &str) -> Result<u8, DataError> {
    match v.as_deref() {
        None => Ok(b','),
        Some(s)
            if s.len() == 1 && s.as_bytes()[0].is_ascii() && !matches!(s, "\"" | "\n" | "\r") =>
        {
            Ok(s.as_bytes()[0])
        }
        Some(s) => Err(DataError::schema(
            shown,
            format!("{key}: `{s}` must be one ASCII character (not a quote or newline)"),
        )),
    }
}

fn build(raw: RawSchema, shown: &str, base: &Path) -> Result<Schema, DataError> {
    let err = |m: String| DataError::schema(shown, m);
    let delimiter = one_char(raw.csv.delimiter, "csv.delimiter", shown)?;
    let na = raw
        .csv
        .na
        .unwrap_or_else(|| vec!["NA".into(), String::new()]);

    // Label: exactly one rule.
    let l = raw.label;
    let mut rules = Vec::new();
    for (key, cmp, t) in [
        ("ge", Cmp::Ge, l.ge),
        ("gt", Cmp::Gt, l.gt),
        ("le", Cmp::Le, l.le),
        ("lt", Cmp::Lt, l.lt),
    ] {
        if let Some(t) = t {
            if !t.is_finite() {
                return Err(err(format!("label.{key}: must be a finite number")));
            }
            rules.push((key, LabelRule::Cmp(cmp, t)));
        }
    }
    if let Some(v) = l.eq {
        rules.push(("eq", LabelRule::In(vec![v])));
    }
    if let Some(v) = l.one_of {
        if v.is_empty() {
            return Err(err("label.in: give at least one value".into()));
        }
        rules.push(("in", LabelRule::In(v)));
    }
    if rules.len() != 1 {
        let given: Vec<&str> = rules.iter().map(|r| r.0).collect();
        return Err(err(format!(
            "label: give exactly one of ge, gt, le, lt, eq, in (given: {})",
            if given.is_empty() {
                "none".to_string()
            } else {
                given.join(", ")
            }
        )));
    }
    check_name(&l.field, "label.field", shown)?;
    let label = Label {
        field: l.field,
        rule: rules.remove(0).1,
    };

    // Names defined by the schema itself (derived fields and joined columns),
    // with where each is defined; they must not clash.
    let mut defined: HashMap<String, String> = HashMap::new();
    let mut derived = Vec::new();
    for (name, d) in raw.derived {
        let place = format!("derived.{name}");
        check_name(&name, &place, shown)?;
        let (op, inputs) = match (d.concat, d.weekday) {
            (Some(c), None) => {
                if c.is_empty() {
                    return Err(err(format!("{place}.concat: give at least one field")));
                }
                (Op::Concat(d.sep.unwrap_or_else(|| "|".into())), c)
            }
            (None, Some(w)) => {
                if d.sep.is_some() {
                    return Err(err(format!("{place}.sep: only `concat` takes a separator")));
                }
                if w.len() != 3 {
                    return Err(err(format!(
                        "{place}.weekday: give three fields [year, month, day], not {}",
                        w.len()
                    )));
                }
                (Op::Weekday, w)
            }
            _ => {
                return Err(err(format!(
                    "{place}: give exactly one of `concat` or `weekday`"
                )));
            }
        };
        for (i, input) in inputs.iter().enumerate() {
            check_name(input, &format!("{place}.{}[{i}]", op.key()), shown)?;
        }
        defined.insert(name.clone(), place);
        derived.push(Derived { name, op, inputs });
    }

    let mut joins = Vec::new();
    for (j, rj) in raw.join.into_iter().enumerate() {
        let place = format!("join[{j}]");
        if rj.on.is_empty() {
            return Err(err(format!("{place}.on: give at least one key column")));
        }
        let right_on = rj.right_on.unwrap_or_else(|| rj.on.clone());
        if right_on.len() != rj.on.len() {
            return Err(err(format!(
                "{place}.right_on: {} columns, but `on` has {}",
                right_on.len(),
                rj.on.len()
            )));
        }
        for (i, n) in rj.on.iter().enumerate() {
            check_name(n, &format!("{place}.on[{i}]"), shown)?;
        }
        let delim = match rj.delimiter {
            None => delimiter,
            d => one_char(d, &format!("{place}.delimiter"), shown)?,
        };
        let file: PathBuf = base.join(&rj.file);
        let (table, columns) = load_table(
            &file,
            delim,
            &na,
            &right_on,
            rj.columns.as_deref(),
            &place,
            shown,
        )?;
        for c in &columns {
            let name = format!("{}{c}", rj.prefix);
            if let Some(prev) = defined.insert(name.clone(), format!("{place} ({})", rj.file)) {
                return Err(err(format!(
                    "{place}: joined column `{name}` is also defined by {prev}"
                )));
            }
        }
        joins.push(Join {
            on: rj.on,
            prefix: rj.prefix,
            columns,
            table,
        });
    }
    // `defined` also caught derived-vs-join clashes above; derived names come
    // from a TOML table, so they are unique among themselves.

    // Features, categorical then numeric; names unique.
    let mut features: Vec<Feature> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut add = |f: Feature, features: &mut Vec<Feature>| -> Result<(), DataError> {
        check_name(&f.name, &f.place, shown)?;
        if f.field == label.field {
            return Err(DataError::schema(
                shown,
                format!(
                    "{}: `{}` is the label field; as a feature it would leak the label",
                    f.place, f.field
                ),
            ));
        }
        if let Some(&prev) = by_name.get(&f.name) {
            return Err(DataError::schema(
                shown,
                format!(
                    "{}: feature `{}` is already defined by {} (give one of them a `name`)",
                    f.place, f.name, features[prev].place
                ),
            ));
        }
        by_name.insert(f.name.clone(), features.len());
        features.push(f);
        Ok(())
    };
    for (i, c) in raw.categorical.into_iter().enumerate() {
        let f = Feature {
            prefix: KeyHasher::new(2).part(c.as_bytes()),
            name: c.clone(),
            field: c,
            place: format!("categorical[{i}]"),
            kind: Kind::Categorical,
        };
        add(f, &mut features)?;
    }
    for (i, n) in raw.numeric.into_iter().enumerate() {
        let place = format!("numeric[{i}]");
        check_name(&n.field, &format!("{place}.field"), shown)?;
        let kind = match (n.buckets, n.log2) {
            (Some(b), None | Some(false)) => {
                if b.is_empty() {
                    return Err(err(format!("{place}.buckets: give at least one edge")));
                }
                if b.iter().any(|e| !e.is_finite()) || b.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(err(format!(
                        "{place}.buckets: edges must be finite and strictly increasing"
                    )));
                }
                Kind::Buckets(b)
            }
            (None, Some(true)) => Kind::Log2,
            (Some(_), Some(true)) => {
                return Err(err(format!(
                    "{place}: give `buckets` or `log2 = true`, not both"
                )));
            }
            (None, _) => {
                return Err(err(format!(
                    "{place}: give `buckets = [...]` or `log2 = true`"
                )));
            }
        };
        let name = n.name.unwrap_or_else(|| n.field.clone());
        let f = Feature {
            prefix: KeyHasher::new(2).part(name.as_bytes()),
            name,
            field: n.field,
            place,
            kind,
        };
        add(f, &mut features)?;
    }

    let mut crosses = Vec::new();
    for (i, parts) in raw.crosses.into_iter().enumerate() {
        if parts.len() < 2 {
            return Err(err(format!(
                "crosses[{i}]: a cross needs at least two features"
            )));
        }
        let mut idx = Vec::new();
        let mut prefix = KeyHasher::new(2 * parts.len() as u64);
        for (k, p) in parts.iter().enumerate() {
            let Some(&f) = by_name.get(p) else {
                return Err(err(format!(
                    "crosses[{i}][{k}]: `{p}` is not a feature (list it in `categorical` or `numeric` first)"
                )));
            };
            if idx.contains(&f) {
                return Err(err(format!("crosses[{i}][{k}]: `{p}` appears twice")));
            }
            idx.push(f);
            prefix = prefix.part(p.as_bytes());
        }
        crosses.push(Cross { parts: idx, prefix });
    }

    let holdout = match raw.split {
        None => None,
        Some(s) => {
            if !(0.0..=1.0).contains(&s.test_fraction) {
                return Err(err(format!(
                    "split.test_fraction: {} is not within [0, 1]",
                    s.test_fraction
                )));
            }
            Some(Holdout {
                test_fraction: s.test_fraction,
                seed: s.seed,
            })
        }
    };

    let schema = Schema {
        path: shown.to_string(),
        delimiter,
        na,
        label,
        derived,
        joins,
        features,
        crosses,
        holdout,
    };
    check_cycles(&schema)?;
    Ok(schema)
}

fn check_name(name: &str, place: &str, shown: &str) -> Result<(), DataError> {
    if name.is_empty() {
        return Err(DataError::schema(
            shown,
            format!("{place}: empty field name"),
        ));
    }
    Ok(())
}

/// Derived fields and join keys may refer to each other; a cycle would make
/// a row impossible to evaluate, so it is refused at load.
fn check_cycles(s: &Schema) -> Result<(), DataError> {
    // Nodes: derived fields 0..D, then joins. Edges: to the nodes defining
    // the names a node reads (data columns are leaves, not nodes).
    let d = s.derived.len();
    let node_of = |name: &str| -> Option<usize> {
        if let Some(i) = s.derived.iter().position(|x| x.name == name) {
            return Some(i);
        }
        s.joins
            .iter()
            .position(|j| {
                name.strip_prefix(j.prefix.as_str())
                    .is_some_and(|c| j.columns.iter().any(|x| x == c))
            })
            .map(|j| d + j)
    };
    let mut edges: Vec<Vec<usize>> = Vec::new();
    for x in &s.derived {
        edges.push(x.inputs.iter().filter_map(|n| node_of(n)).collect());
    }
    for j in &s.joins {
        edges.push(j.on.iter().filter_map(|n| node_of(n)).collect());
    }
    let label = |n: usize| -> String {
        if n < d {
            format!("derived.{}", s.derived[n].name)
        } else {
            format!("join[{}]", n - d)
        }
    };
    // 0 new, 1 on the current path, 2 done.
    let mut mark = vec![0u8; edges.len()];
    for root in 0..edges.len() {
        if mark[root] != 0 {
            continue;
        }
        // Iterative DFS: (node, next edge to follow).
        let mut stack = vec![(root, 0usize)];
        mark[root] = 1;
        while let Some(&mut (n, ref mut next)) = stack.last_mut() {
            if let Some(&m) = edges[n].get(*next) {
                *next += 1;
                match mark[m] {
                    0 => {
                        mark[m] = 1;
                        stack.push((m, 0));
                    }
                    1 => {
                        let from = stack.iter().position(|&(p, _)| p == m).unwrap_or(0);
                        let mut names: Vec<String> =
                            stack[from..].iter().map(|&(p, _)| label(p)).collect();
                        names.push(label(m));
                        return Err(DataError::schema(
                            &s.path,
                            format!("{}: depends on itself ({})", names[0], names.join(" -> ")),
                        ));
                    }
                    _ => {}
                }
            } else {
                mark[n] = 2;
                stack.pop();
            }
        }
    }
    Ok(())
}

/// Appends one part of a composite join key: length-prefixed, so
/// `("ab","c")` and `("a","bc")` stay distinct.
fn push_key_part(buf: &mut Vec<u8>, part: &str) {
    buf.extend_from_slice(&(part.len() as u64).to_le_bytes());
    buf.extend_from_slice(part.as_bytes());
}

fn is_na(na: &[String], v: &str) -> bool {
    na.iter().any(|n| n == v)
}

/// Loads a side table whole. Duplicate keys: the first row wins (so the
/// result does not depend on anything but the file).
fn load_table(
    file: &Path,
    delim: u8,
    na: &[String],
    right_on: &[String],
    columns: Option<&[String]>,
    place: &str,
    schema_path: &str,
) -> Result<(SideTable, Vec<String>), DataError> {
    let shown = file.display().to_string();
    let mut lines = open_lines(file, SIDE_MAX_LINE)?;
    let mut buf = Vec::new();
    let mut rec = String::new();
    let mut fields = Fields::default();
    let table_err = |line: u64, message: String| DataError::Table {
        path: shown.clone(),
        line,
        message,
    };

    // Header: the first non-blank record.
    let header: Vec<String> = loop {
        match next_record(&mut lines, &mut buf, &mut rec, delim, SIDE_MAX_LINE)
            .map_err(|e| lines.error(&shown, e))?
        {
            Rec::Eof => return Err(table_err(0, "empty file: no header line".into())),
            Rec::Blank => continue,
            Rec::Bad { line, message } => return Err(table_err(line, message)),
            Rec::Record { .. } => {
                fields
                    .split(&rec, delim)
                    .map_err(|m| table_err(lines.line_no, m))?;
                break (0..fields.len())
                    .map(|i| fields.get(&rec, i).unwrap_or("").trim().to_string())
                    .collect();
            }
        }
    };
    let col = |name: &str, key: String| -> Result<usize, DataError> {
        header.iter().position(|h| h == name).ok_or_else(|| {
            DataError::schema(
                schema_path,
                format!(
                    "{key}: `{name}` is not a column of {shown} (columns: {})",
                    header.join(", ")
                ),
            )
        })
    };
    let key_cols: Vec<usize> = right_on
        .iter()
        .enumerate()
        .map(|(i, n)| col(n, format!("{place}.right_on[{i}]")))
        .collect::<Result<_, _>>()?;
    let names: Vec<String> = match columns {
        Some(cs) => cs.to_vec(),
        None => header
            .iter()
            .enumerate()
            .filter(|(i, _)| !key_cols.contains(i))
            .map(|(_, h)| h.clone())
            .collect(),
    };
    let sel: Vec<usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| col(n, format!("{place}.columns[{i}]")))
        .collect::<Result<_, _>>()?;

    let mut table = SideTable {
        file: shown.clone(),
        width: sel.len(),
        cells: Vec::new(),
        index: HashMap::new(),
    };
    let mut key = Vec::new();
    let mut rows: u32 = 0;
    loop {
        let r = next_record(&mut lines, &mut buf, &mut rec, delim, SIDE_MAX_LINE)
            .map_err(|e| lines.error(&shown, e))?;
        let first = match r {
            Rec::Eof => break,
            Rec::Blank => continue,
            Rec::Bad { line, message } => return Err(table_err(line, message)),
            Rec::Record { line } => line,
        };
        match fields.split(&rec, delim) {
            Ok(CsvSplit::Complete) => {}
            Ok(CsvSplit::Open) => return Err(table_err(first, "quoted field not closed".into())),
            Err(m) => return Err(table_err(first, m)),
        }
        if fields.len() != header.len() {
            return Err(table_err(
                first,
                format!("expected {} fields, found {}", header.len(), fields.len()),
            ));
        }
        key.clear();
        let mut key_ok = true;
        for &k in &key_cols {
            let v = fields.get(&rec, k).unwrap_or("");
            if is_na(na, v) {
                key_ok = false;
                break;
            }
            push_key_part(&mut key, v);
        }
        if !key_ok || table.index.contains_key(&key) {
            continue;
        }
        if rows == u32::MAX {
            return Err(table_err(first, "too many rows for a side table".into()));
        }
        table.index.insert(key.clone(), rows);
        rows += 1;
        for &c in &sel {
            let v = fields.get(&rec, c).unwrap_or("");
            table
                .cells
                .push(if is_na(na, v) { None } else { Some(v.into()) });
        }
    }
    Ok((table, names))
}
