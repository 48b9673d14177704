#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! The `decode` example: its logic in-process, and the built binary when it is there.

use std::path::PathBuf;
use std::process::Command;

#[allow(dead_code)]
#[path = "../examples/decode.rs"]
mod decode;

fn vector(name: &str) -> String {
    format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs the decoder in-process: (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = decode::run(&args, &mut out, &mut err);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn prints_one_json_line_per_user_record() {
    let (code, out, err) = run(&[&vector("single.bin")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "{\"sub_sequence_number\":0,\"partition_key\":\"alpha\",\"explicit_hash_key\":null,\
         \"data_b64\":\"aGVsbG8=\",\"aggregated\":true}\n"
    );
    assert!(err.is_empty());

    let (code, out, _) = run(&[&vector("mixed_ehk.bin")]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(
        lines[1],
        "{\"sub_sequence_number\":1,\"partition_key\":\"p-1\",\"explicit_hash_key\":\"100\",\
         \"data_b64\":\"b25l\",\"aggregated\":true}"
    );
    // Valid JSON, with non-ASCII keys escaped properly.
    let (_, out, _) = run(&[&vector("unicode_keys.bin")]);
    let keys: Vec<String> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["partition_key"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(keys[0], "ключ");
    assert_eq!(keys[6], "tab\tand\nnewline");
}

#[test]
fn pass_throughs_print_null_key_and_not_aggregated() {
    let (code, out, err) = run(&[&vector("plain_text.bin")]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "{\"sub_sequence_number\":0,\"partition_key\":null,\"explicit_hash_key\":null,\
         \"data_b64\":\"anVzdCBhIHBsYWluIHJlY29yZAo=\",\"aggregated\":false}\n"
    );
    assert!(err.contains("not aggregated"), "{err}");

    let (code, out, err) = run(&[&vector("pk_index_out_of_range.bin")]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
    assert_eq!(v["partition_key"], serde_json::Value::Null);
    assert_eq!(v["aggregated"], false);
    assert_eq!(out.lines().count(), 1);
    assert!(err.contains("invalid aggregate"), "{err}");
}

#[test]
fn hash_range_filters_aggregates() {
    let upper = "170141183460469231731687303715884105728:340282366920938463463374607431768211455";
    let lower = "0:170141183460469231731687303715884105727";
    let (code, out, err) = run(&[&vector("ehk_upper_half.bin"), "--hash-range", upper]);
    assert_eq!((code, out.lines().count()), (0, 2), "{err}");
    let (code, out, err) = run(&["--hash-range", lower, &vector("ehk_upper_half.bin")]);
    assert_eq!(code, 0);
    assert!(out.is_empty());
    assert!(
        err.contains("dropped") && err.contains("of 2 user record(s): 2 user record(s) outside"),
        "{err}"
    );
    let (code, out, err) = run(&[
        &vector("ehk_upper_half.bin"),
        "--hash-range",
        lower,
        "--deliver-out-of-range",
    ]);
    assert_eq!((code, out.lines().count()), (0, 2));
    assert!(err.contains("delivered despite"), "{err}");
    // Pass-throughs are not range-checked.
    let (code, out, _) = run(&[&vector("plain_text.bin"), "--hash-range", "0:0"]);
    assert_eq!((code, out.lines().count()), (0, 1));
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        vec![],
        vec!["/nonexistent/file.bin"],
        vec!["a.bin", "b.bin"],
        vec!["--bogus", "a.bin"],
        vec!["a.bin", "--hash-range"],
        vec!["a.bin", "--hash-range", "10"],
        vec!["a.bin", "--hash-range", "x:10"],
        vec!["a.bin", "--hash-range", "20:10"],
        vec![
            "a.bin",
            "--hash-range",
            "0:340282366920938463463374607431768211456",
        ],
    ] {
        let (code, out, err) = run(&args);
        assert_eq!(code, 2, "{args:?}");
        assert!(out.is_empty(), "{args:?}");
        assert!(err.starts_with("decode: "), "{args:?}: {err}");
    }
    let (code, _, err) = run(&["/nonexistent/file.bin"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read /nonexistent/file.bin"), "{err}");
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("usage:"));
}

/// The example binary, when `cargo test` built it (it does unless tests are filtered by
/// target) and it is newer than its source.
fn example_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("examples").join("decode");
    let built = std::fs::metadata(&path).ok()?.modified().ok()?;
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/decode.rs");
    let written = std::fs::metadata(source).ok()?.modified().ok()?;
    (built >= written).then_some(path)
}

#[test]
fn binary_matches_in_process_run() {
    let Some(binary) = example_binary() else {
        println!("decode example binary not built (or stale): checked in-process only");
        return;
    };
    for args in [
        vec![vector("many_small.bin")],
        vec![vector("bad_md5.bin")],
        vec![
            vector("ehk_boundaries.bin"),
            "--hash-range".into(),
            "1:2".into(),
        ],
    ] {
        let output = Command::new(&binary).args(&args).output().unwrap();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = run(&refs);
        assert_eq!(output.status.code(), Some(code), "{args:?}");
        assert_eq!(String::from_utf8(output.stdout).unwrap(), out, "{args:?}");
        assert_eq!(String::from_utf8(output.stderr).unwrap(), err, "{args:?}");
    }
    let output = Command::new(&binary).arg("/nonexistent").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("cannot read")
    );
}
