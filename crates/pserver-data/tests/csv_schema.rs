//! CSV with a TOML schema: features, derived fields, joins, crosses, and
//! the errors a wrong schema gets.

mod common;

use common::*;
use pserver_data::hash::hash_feature;
use pserver_data::schema::MISSING_KEY;
use pserver_data::{BIAS_KEY, DataError, Format, Schema};
use std::path::Path;
use std::sync::Arc;

fn schema_in(dir: &Path, text: &str) -> Result<Schema, DataError> {
    let p = write(dir, "s.toml", text.as_bytes());
    pserver_data::load_schema(&p)
}

fn csv(dir: &Path, text: &str) -> Format {
    Format::Csv(Arc::new(schema_in(dir, text).unwrap()))
}

fn schema_err(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    match schema_in(dir.path(), text) {
        Err(DataError::Schema { path, message }) => {
            assert!(path.ends_with("s.toml"), "{path}");
            message
        }
        other => panic!("expected a schema error, got {other:?}"),
    }
}

const FLIGHTS: &str = "\
year,month,day,carrier,origin,dest,hour,distance,delay,tailnum
2013,1,1,UA,EWR,IAH,5,1400,11,N1
2013,1,2,AA,JFK,MIA,6,1089,33,N2
2013,1,3,B6,JFK,\"BQN, PR\",7,1576,NA,N3
2013,2,29,UA,EWR,IAH,5,1400,40,N1
2013,1,4,UA,EWR,IAH,5,far,40,N1
2013,1,5,UA,EWR,IAH,5,1400,-3
";

#[test]
fn categorical_numeric_derived_and_crosses() {
    let dir = tempfile::tempdir().unwrap();
    let format = csv(
        dir.path(),
        r#"
label = { field = "delay", ge = 15 }
categorical = ["carrier", "route", "dow"]
numeric = [{ field = "distance", buckets = [500.0, 1500.0], name = "dist" }]
crosses = [["carrier", "dist"], ["route", "dow"]]
[derived]
route = { concat = ["origin", "dest"], sep = "-" }
dow = { weekday = ["year", "month", "day"] }
"#,
    );
    let p = write(dir.path(), "f.csv", FLIGHTS.as_bytes());
    let (v, s) = read(&p, &format, &all());
    // Line 4: NA label (skipped). Line 5: Feb 29 2013 (bad). Line 6: "far"
    // (bad). Line 7: 9 fields, not 10 (bad).
    assert_eq!((s.lines, s.examples, s.skipped, s.bad), (6, 2, 1, 3));
    assert_eq!(bad_lines(&s), vec![5, 6, 7]);
    assert!(
        s.first_bad[0].message.contains("derived.dow"),
        "{:?}",
        s.first_bad[0]
    );
    assert!(
        s.first_bad[1].message.contains("numeric[0]"),
        "{:?}",
        s.first_bad[1]
    );
    assert!(
        s.first_bad[2]
            .message
            .contains("expected 10 fields, found 9")
    );

    let mut want = vec![
        BIAS_KEY,
        hash_feature(&[b"carrier", b"UA"]),
        hash_feature(&[b"route", b"EWR-IAH"]),
        hash_feature(&[b"dow", b"Tue"]), // 2013-01-01
        hash_feature(&[b"dist", b"1"]),  // 500 <= 1400 < 1500
        hash_feature(&[b"carrier", b"dist", b"UA", b"1"]),
        hash_feature(&[b"route", b"dow", b"EWR-IAH", b"Tue"]),
    ];
    want.sort_unstable();
    assert_eq!(v[0].keys, want);
    assert_eq!(v[0].vals, vec![1.0; 7]);
    assert_eq!(v[0].label, 0.0);
    assert_eq!(v[1].label, 1.0);
    // Pinned: the CSV feature hash must never change.
    assert_eq!(hash_feature(&[b"route", b"EWR-IAH"]), 0xE4B4_2FD1_7479_19C7);
}

#[test]
fn field_keys_keep_each_feature_and_cross_apart() {
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(
        schema_in(
            dir.path(),
            r#"
label = { field = "delay", ge = 15 }
categorical = ["carrier", "tailnum"]
numeric = [{ field = "distance", buckets = [500.0, 1500.0], name = "dist" }]
crosses = [["carrier", "dist"], ["tailnum", "dist"]]
"#,
        )
        .unwrap(),
    );
    assert_eq!(
        schema.feature_names(),
        vec!["carrier", "tailnum", "dist", "carrier^dist", "tailnum^dist"]
    );
    // The last row has no tailnum (NA): its field and the cross with it
    // are missing.
    let text = "carrier,tailnum,distance,delay\nUA,N1,1400,11\nAA,NA,200,40\n";
    let p = write(dir.path(), "f.csv", text.as_bytes());
    let mut r = pserver_data::open(&p, &Format::Csv(schema), &all()).unwrap();
    let mut rows = Vec::new();
    while let Some(ex) = r.next() {
        let keys = r.field_keys().unwrap().to_vec();
        // The same keys as the example's, less the bias.
        let mut present: Vec<u64> = keys.iter().copied().filter(|&k| k != MISSING_KEY).collect();
        present.push(BIAS_KEY);
        present.sort_unstable();
        assert_eq!(present, ex.keys);
        rows.push(keys);
    }
    assert_eq!(
        rows,
        vec![
            vec![
                hash_feature(&[b"carrier", b"UA"]),
                hash_feature(&[b"tailnum", b"N1"]),
                hash_feature(&[b"dist", b"1"]),
                hash_feature(&[b"carrier", b"dist", b"UA", b"1"]),
                hash_feature(&[b"tailnum", b"dist", b"N1", b"1"]),
            ],
            vec![
                hash_feature(&[b"carrier", b"AA"]),
                MISSING_KEY,
                hash_feature(&[b"dist", b"0"]),
                hash_feature(&[b"carrier", b"dist", b"AA", b"0"]),
                MISSING_KEY,
            ],
        ]
    );
    // Other formats keep no fields.
    let svm = write(dir.path(), "f.svm", b"1 3:1\n");
    let mut r = pserver_data::open(&svm, &Format::Libsvm, &all()).unwrap();
    assert!(r.next().is_some() && r.field_keys().is_none());
}

#[test]
fn quoted_fields_and_multiline_records() {
    let dir = tempfile::tempdir().unwrap();
    let format = csv(
        dir.path(),
        r#"
label = { field = "y", eq = "yes" }
categorical = ["name", "city"]
"#,
    );
    let text = "y,name,city\n\
                yes,\"Smith, J\",\"New\nYork\"\n\
                no,\"say \"\"hi\"\"\",Paris\n\
                no,\"x\"y,Rome\n\
                maybe,plain,Oslo\n";
    let p = write(dir.path(), "q.csv", text.as_bytes());
    let (v, s) = read(&p, &format, &all());
    assert_eq!(v.len(), 3);
    assert!(v[0].keys.contains(&hash_feature(&[b"name", b"Smith, J"])));
    assert!(v[0].keys.contains(&hash_feature(&[b"city", b"New\nYork"])));
    assert!(v[1].keys.contains(&hash_feature(&[b"name", b"say \"hi\""])));
    assert_eq!((v[0].label, v[1].label, v[2].label), (1.0, 0.0, 0.0));
    // The record on lines 2-3 counts once; the bad quote is on line 5.
    assert_eq!(s.lines, 4);
    assert_eq!(bad_lines(&s), vec![5]);
}

#[test]
fn an_unclosed_quote_at_the_end_is_a_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let format = csv(
        dir.path(),
        "label = { field = \"y\", eq = \"1\" }\ncategorical = [\"a\"]\n",
    );
    let p = write(dir.path(), "u.csv", b"y,a\n1,x\n0,\"open\n1,y\n");
    let (v, s) = read(&p, &format, &all());
    assert_eq!(v.len(), 1);
    assert_eq!(bad_lines(&s), vec![3]);
}

#[test]
fn an_unclosed_quote_early_costs_linear_time() {
    // The open record grows line by line to the end of the file; scanning
    // it again after every line would take hours here.
    let dir = tempfile::tempdir().unwrap();
    let format = csv(
        dir.path(),
        "label = { field = \"y\", eq = \"1\" }\ncategorical = [\"a\"]\n",
    );
    let mut text = String::from("y,a\n1,x\n0,\"open\n");
    for _ in 0..200_000 {
        text.push_str("1,abcdefgh\n");
    }
    let p = write(dir.path(), "u.csv", text.as_bytes());
    let (v, s) = read(&p, &format, &all());
    assert_eq!(v.len(), 1);
    assert_eq!((s.lines, s.bad), (2, 1));
    assert_eq!(bad_lines(&s), vec![3]);
}

#[test]
fn na_values_and_log2() {
    let dir = tempfile::tempdir().unwrap();
    let format = csv(
        dir.path(),
        r#"
label = { field = "y", in = ["1", "true"] }
numeric = [{ field = "x", log2 = true }]
categorical = ["c"]
crosses = [["c", "x"]]
[csv]
na = ["?"]
delimiter = ";"
"#,
    );
    let p = write(
        dir.path(),
        "n.csv",
        b"y;x;c\ntrue;5;a\n0;?;b\n?;1;c\n1;?;\n",
    );
    let (v, s) = read(&p, &format, &all());
    assert_eq!((s.examples, s.skipped), (3, 1));
    let mut want = vec![
        BIAS_KEY,
        hash_feature(&[b"x", b"3"]),
        hash_feature(&[b"c", b"a"]),
        hash_feature(&[b"c", b"x", b"a", b"3"]),
    ];
    want.sort_unstable();
    assert_eq!(v[0].keys, want);
    // x missing: no x feature and no cross.
    assert_eq!(v[1].keys.len(), 2);
    // With `na` replaced, an empty string is a value like any other.
    assert!(v[2].keys.contains(&hash_feature(&[b"c", b""])));
}

#[test]
fn joins_with_side_tables() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "planes.csv.gz",
        &gzip(b"tailnum,year,seats\nN1,2004,55\nN2,NA,200\nN1,1999,1\n"),
    );
    write(
        dir.path(),
        "weather.csv",
        b"airport,when,temp\nEWR,h1,30\nJFK,h1,40\nEWR,h2,50\n",
    );
    let format = csv(
        dir.path(),
        r#"
label = { field = "y", eq = "1" }
categorical = ["plane_year", "w_temp"]
numeric = [{ field = "plane_seats", buckets = [100.0] }]
[[join]]
file = "planes.csv.gz"
on = ["tail"]
right_on = ["tailnum"]
prefix = "plane_"
[[join]]
file = "weather.csv"
on = ["origin", "hour"]
right_on = ["airport", "when"]
prefix = "w_"
"#,
    );
    let p = write(
        dir.path(),
        "f.csv",
        b"y,tail,origin,hour\n1,N1,EWR,h1\n0,N2,JFK,h1\n0,N9,EWR,h3\n1,NA,EWR,h2\n",
    );
    let (v, _) = read(&p, &format, &all());
    let has = |i: usize, parts: &[&[u8]]| v[i].keys.contains(&hash_feature(parts));
    // First row for N1 wins over the later duplicate.
    assert!(has(0, &[b"plane_year", b"2004"]));
    assert!(has(0, &[b"plane_seats", b"0"]));
    assert!(has(0, &[b"w_temp", b"30"]));
    // plane_year NA: no feature; seats 200 -> bucket 1.
    assert!(
        !v[1]
            .keys
            .iter()
            .any(|&k| k == hash_feature(&[b"plane_year", b"NA"]))
    );
    assert!(has(1, &[b"plane_seats", b"1"]));
    assert!(has(1, &[b"w_temp", b"40"]));
    assert_eq!(v[1].keys.len(), 3);
    // No match anywhere: only the bias.
    assert_eq!(v[2].keys, vec![BIAS_KEY]);
    // NA key: no plane, but the weather still joins.
    assert_eq!(v[3].keys.len(), 2);
    assert!(has(3, &[b"w_temp", b"50"]));
}

#[test]
fn a_join_can_use_a_derived_key_and_derived_fields_joined_columns() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "side.csv", b"k,v\na-b,X\n");
    let format = csv(
        dir.path(),
        r#"
label = { field = "y", eq = "1" }
categorical = ["both"]
[derived]
key = { concat = ["p", "q"], sep = "-" }
both = { concat = ["s_v", "p"] }
[[join]]
file = "side.csv"
on = ["key"]
right_on = ["k"]
prefix = "s_"
"#,
    );
    let p = write(dir.path(), "f.csv", b"y,p,q\n1,a,b\n");
    let (v, _) = read(&p, &format, &all());
    assert!(v[0].keys.contains(&hash_feature(&[b"both", b"X|a"])));
}

#[test]
fn schema_errors_name_the_key() {
    let m = schema_err("label = { field = \"y\", ge = 1 }\ncategorcal = [\"a\"]\n");
    assert!(m.contains("categorcal"), "{m}");
    let m = schema_err("label = { field = \"y\", ge = 1 }\ncategorical = \"a\"\n");
    assert!(m.contains("categorical"), "{m}");
    let m = schema_err("label = { field = \"y\", ge = \"high\" }\n");
    assert!(m.contains("ge"), "{m}");
    let m = schema_err("categorical = [\"a\"]\n");
    assert!(m.contains("label"), "{m}");
    let m = schema_err("label = { field = \"y\" }\n");
    assert!(m.contains("label: give exactly one of"), "{m}");
    let m = schema_err("label = { field = \"y\", ge = 1, eq = \"1\" }\n");
    assert!(m.contains("given: ge, eq"), "{m}");
    let m = schema_err(
        "label = { field = \"y\", ge = 1 }\ncategorical = [\"a\"]\ncrosses = [[\"a\", \"b\"]]\n",
    );
    assert!(m.starts_with("crosses[0][1]: `b` is not a feature"), "{m}");
    let m = schema_err(
        "label = { field = \"y\", ge = 1 }\nnumeric = [{ field = \"x\", buckets = [2.0, 1.0] }]\n",
    );
    assert!(m.starts_with("numeric[0].buckets"), "{m}");
    let m = schema_err("label = { field = \"y\", ge = 1 }\nnumeric = [{ field = \"x\" }]\n");
    assert!(m.starts_with("numeric[0]"), "{m}");
    let m = schema_err("label = { field = \"y\", ge = 1 }\ncategorical = [\"a\", \"a\"]\n");
    assert!(
        m.starts_with("categorical[1]: feature `a` is already defined by categorical[0]"),
        "{m}"
    );
    let m = schema_err("label = { field = \"y\", ge = 1 }\ncategorical = [\"y\"]\n");
    assert!(m.contains("label field"), "{m}");
    let m = schema_err("label = { field = \"y\", ge = 1 }\n[derived]\nd = { weekday = [\"a\"] }\n");
    assert!(m.starts_with("derived.d.weekday"), "{m}");
    let m = schema_err(
        "label = { field = \"y\", ge = 1 }\n[derived]\nd = { concat = [\"a\"], upper = true }\n",
    );
    assert!(
        m.contains("line 3") && m.contains("unknown field `upper`"),
        "{m}"
    );
    let m = schema_err(
        "label = { field = \"y\", ge = 1 }\n[derived]\na = { concat = [\"b\"] }\nb = { concat = [\"x\", \"a\"] }\n",
    );
    assert!(m.contains("depends on itself"), "{m}");
    let m =
        schema_err("label = { field = \"y\", ge = 1 }\n[split]\ntest_fraction = 1.5\nseed = 1\n");
    assert!(m.starts_with("split.test_fraction"), "{m}");
    let m = schema_err("label = { field = \"y\", ge = 1 }\n[split]\ntest_fraction = 0.5\n");
    assert!(m.contains("seed"), "{m}");
    let m = schema_err("label = { field = \"y\", ge = 1 }\n[csv]\ndelimiter = \"::\"\n");
    assert!(m.starts_with("csv.delimiter"), "{m}");
}

#[test]
fn join_errors() {
    let dir = tempfile::tempdir().unwrap();
    let base = "label = { field = \"y\", ge = 1 }\n[[join]]\nprefix = \"p_\"\n";
    match schema_in(
        dir.path(),
        &format!("{base}file = \"missing.csv\"\non = [\"k\"]\n"),
    ) {
        Err(DataError::Open { path, .. }) => assert!(path.ends_with("missing.csv"), "{path}"),
        other => panic!("{other:?}"),
    }
    write(dir.path(), "side.csv", b"key,v\na,1\n");
    let m = match schema_in(
        dir.path(),
        &format!("{base}file = \"side.csv\"\non = [\"k\"]\n"),
    ) {
        Err(DataError::Schema { message, .. }) => message,
        other => panic!("{other:?}"),
    };
    assert!(
        m.starts_with("join[0].right_on[0]: `k` is not a column of"),
        "{m}"
    );
    write(dir.path(), "ragged.csv", b"k,v\na,1\nb\n");
    match schema_in(
        dir.path(),
        &format!("{base}file = \"ragged.csv\"\non = [\"k\"]\n"),
    ) {
        Err(DataError::Table {
            path,
            line,
            message,
        }) => {
            assert!(path.ends_with("ragged.csv"));
            assert_eq!(line, 3);
            assert!(message.contains("expected 2 fields"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn header_errors_name_the_schema_key() {
    let dir = tempfile::tempdir().unwrap();
    let format = csv(
        dir.path(),
        "label = { field = \"y\", ge = 1 }\ncategorical = [\"a\", \"b\"]\n",
    );
    let p = write(dir.path(), "f.csv", b"y,a\n1,x\n");
    match pserver_data::open(&p, &format, &all()) {
        Err(DataError::Header { path, message }) => {
            assert!(path.ends_with("f.csv"));
            assert!(
                message.contains("`b` (needed by categorical[1]"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    let p = write(dir.path(), "e.csv", b"");
    assert!(matches!(
        pserver_data::open(&p, &format, &all()),
        Err(DataError::Header { .. })
    ));
    let p = write(dir.path(), "d.csv", b"y,a,b,b\n");
    match pserver_data::open(&p, &format, &all()) {
        Err(DataError::Header { message, .. }) => {
            assert!(message.contains("more than once"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn schema_parses_from_text_too() {
    let s = Schema::parse(
        "label = { field = \"y\", lt = 0.5 }\ncategorical = [\"a\"]\nnumeric = [{ field = \"n\", log2 = true }]\ncrosses = [[\"a\", \"n\"]]\n[split]\ntest_fraction = 0.25\nseed = 7\n",
        Path::new("inline.toml"),
    )
    .unwrap();
    assert_eq!(s.feature_names(), vec!["a", "n", "a^n"]);
    let h = s.holdout().unwrap();
    assert_eq!((h.test_fraction, h.seed), (0.25, 7));
}
