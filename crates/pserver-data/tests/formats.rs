//! LIBSVM and Criteo readers on good and bad input.

mod common;

use common::*;
use pserver_data::hash::{hash_feature, libsvm_key};
use pserver_data::{BIAS_KEY, DataError, Example, Format, ReadOptions};

fn ex(label: f32, mut feats: Vec<(u64, f32)>) -> Example {
    feats.push((BIAS_KEY, 1.0));
    feats.sort_by_key(|f| f.0);
    Example {
        label,
        keys: feats.iter().map(|f| f.0).collect(),
        vals: feats.iter().map(|f| f.1).collect(),
    }
}

#[test]
fn libsvm_good_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "a.svm",
        b"# a comment line\n+1 3:0.5 10:2 # trailing comment\n\n-1 1:1\r\n0 7:-3.5\n1.0 qid:4 2:1\n-1.0\n",
    );
    let (v, s) = read(&p, &Format::Libsvm, &all());
    assert_eq!(
        v,
        vec![
            ex(1.0, vec![(libsvm_key(3), 0.5), (libsvm_key(10), 2.0)]),
            ex(0.0, vec![(libsvm_key(1), 1.0)]),
            ex(0.0, vec![(libsvm_key(7), -3.5)]),
            ex(1.0, vec![(libsvm_key(2), 1.0)]),
            ex(0.0, vec![]),
        ]
    );
    assert_eq!((s.lines, s.examples, s.bad, s.skipped), (5, 5, 0, 0));
}

#[test]
fn libsvm_duplicates_are_summed() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "d.svm", b"1 5:1 5:2 4:1\n");
    let (v, _) = read(&p, &Format::Libsvm, &all());
    assert_eq!(
        v,
        vec![ex(1.0, vec![(libsvm_key(5), 3.0), (libsvm_key(4), 1.0)])]
    );
}

#[test]
fn duplicates_summing_past_f32_range_make_a_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "o.svm", b"1 5:3e38 5:3e38\n0 1:1\n");
    let (v, s) = read(&p, &Format::Libsvm, &all());
    assert_eq!(v.len(), 1);
    assert_eq!(bad_lines(&s), vec![1]);
}

#[test]
fn libsvm_bad_lines_are_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let text = "1 1:1\n\
                2 1:1\n\
                1 1:1\n\
                1 x:1\n\
                \n\
                1 3:nan\n\
                1 3\n\
                -1 2:2\n";
    let p = write(dir.path(), "bad.svm", text.as_bytes());
    let (v, s) = read(&p, &Format::Libsvm, &all());
    assert_eq!(v.len(), 3);
    assert_eq!(s.bad, 4);
    assert_eq!(bad_lines(&s), vec![2, 4, 6, 7]);
    let shown = p.display().to_string();
    assert!(s.first_bad.iter().all(|b| b.path == shown));
    assert!(
        s.first_bad[0].message.contains("label"),
        "{:?}",
        s.first_bad[0]
    );
    assert!(
        s.first_bad[2].message.contains("finite"),
        "{:?}",
        s.first_bad[2]
    );
    assert_eq!(
        s.first_bad[0].to_string(),
        format!("{shown}:2: {}", s.first_bad[0].message)
    );
}

#[test]
fn only_the_first_20_bad_lines_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..50).map(|_| "oops\n").collect();
    let p = write(dir.path(), "many.svm", text.as_bytes());
    let (v, s) = read(&p, &Format::Libsvm, &all());
    assert!(v.is_empty());
    assert_eq!(s.bad, 50);
    assert_eq!(bad_lines(&s), (1..=20).collect::<Vec<u64>>());
}

#[test]
fn not_utf8_and_overlong_lines_are_bad_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = b"1 1:1\n1 2:\xff\n".to_vec();
    bytes.extend(std::iter::repeat_n(b'9', 5000));
    bytes.extend(b"\n0 3:1\n");
    let p = write(dir.path(), "x.svm", &bytes);
    let opts = ReadOptions {
        max_line_bytes: 1000,
        ..all()
    };
    let (v, s) = read(&p, &Format::Libsvm, &opts);
    assert_eq!(v.len(), 2);
    assert_eq!(bad_lines(&s), vec![2, 3]);
    assert!(s.first_bad[0].message.contains("UTF-8"));
    assert!(s.first_bad[1].message.contains("longer than 1000"));
}

#[test]
fn empty_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "empty.svm", b"");
    let (v, s) = read(&p, &Format::Libsvm, &all());
    assert!(v.is_empty());
    assert_eq!(s.lines, 0);
    let missing = dir.path().join("nope.svm");
    match pserver_data::open(&missing, &Format::Libsvm, &all()) {
        Err(DataError::Open { path, .. }) => assert!(path.ends_with("nope.svm")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bias_can_be_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "a.svm", b"1 3:1\n");
    let opts = ReadOptions {
        bias: false,
        ..all()
    };
    let (v, _) = read(&p, &Format::Libsvm, &opts);
    assert_eq!(v[0].keys, vec![libsvm_key(3)]);
}

fn criteo_line(label: &str, ints: &[&str], cats: &[&str]) -> String {
    let mut cols = vec![label.to_string()];
    cols.extend(ints.iter().map(|s| s.to_string()));
    cols.extend(cats.iter().map(|s| s.to_string()));
    cols.join("\t")
}

#[test]
fn criteo_good_input() {
    let dir = tempfile::tempdir().unwrap();
    let mut ints = vec![""; 13];
    ints[0] = "5";
    ints[1] = "-1";
    let mut cats = vec![""; 26];
    cats[0] = "68fd1e64";
    cats[25] = "b1252a9d";
    let l1 = criteo_line("1", &ints, &cats);
    let l2 = criteo_line("0", &[""; 13], &[""; 26]);
    let p = write(dir.path(), "c.tsv", format!("{l1}\n{l2}\n").as_bytes());
    let (v, s) = read(&p, &Format::Criteo, &all());
    assert_eq!(s.examples, 2);
    // 5 -> floor(ln(5)^2) = 2; -1 stays -1.
    assert_eq!(
        v[0],
        ex(
            1.0,
            vec![
                (hash_feature(&[b"I1", b"2"]), 1.0),
                (hash_feature(&[b"I2", b"-1"]), 1.0),
                (hash_feature(&[b"C1", b"68fd1e64"]), 1.0),
                (hash_feature(&[b"C26", b"b1252a9d"]), 1.0),
            ]
        )
    );
    assert_eq!(v[1], ex(0.0, vec![]));
    // Pinned: a change to the Criteo hashing would silently break models.
    assert_eq!(hash_feature(&[b"C1", b"68fd1e64"]), 0x0AA3_6259_72FD_2C31);
}

#[test]
fn criteo_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let good = criteo_line("0", &[""; 13], &[""; 26]);
    let short = criteo_line("0", &[""; 13], &[""; 25]);
    let mut ints = vec![""; 13];
    ints[4] = "1.5";
    let float = criteo_line("1", &ints, &[""; 26]);
    let label = criteo_line("2", &[""; 13], &[""; 26]);
    let text = format!("{good}\n{short}\n{float}\n{label}\n{good}\n");
    let p = write(dir.path(), "c.tsv", text.as_bytes());
    let (v, s) = read(&p, &Format::Criteo, &all());
    assert_eq!(v.len(), 2);
    assert_eq!(bad_lines(&s), vec![2, 3, 4]);
    assert!(
        s.first_bad[0].message.contains("expected 40"),
        "{:?}",
        s.first_bad[0]
    );
    assert!(
        s.first_bad[1].message.contains("I5"),
        "{:?}",
        s.first_bad[1]
    );
}

#[test]
fn readers_and_schemas_move_between_threads() {
    fn send<T: Send>() {}
    fn share<T: Send + Sync>() {}
    send::<pserver_data::Reader>();
    share::<pserver_data::Schema>();
    share::<DataError>();
    share::<Format>();
}
