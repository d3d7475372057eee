//! `layerdiff batch` as a user meets it: 3 TEdBench rows (a box for Segment Anything, a missing
//! photo, a row without a subject) on the tiny demo model with tiny step counts and tiny metric
//! models; results.csv, summary.md, resume, shards + --summarize, one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

fn layerdiff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_layerdiff"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", std::env::temp_dir().join("layerdiff-batch-test-hf-home"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("runs")
}

fn ok(args: &[&str]) -> String {
    let out = layerdiff(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{args:?}: {stderr}");
    stderr
}

fn error_of(args: &[&str]) -> String {
    let out = layerdiff(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    // clap adds its "For more information, try '--help'." under a flag's error
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("For more information")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

/// A TEdBench photo from ../shared/data/tedbench, else the demo dog under the same name.
fn tedbench_photo(name: &str, to: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let real = root.join("../shared/data/tedbench/originals").join(name);
    let src = if real.is_file() { real } else { root.join("assets/demo/dog.png") };
    std::fs::copy(src, to.join(name)).unwrap();
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    common: Vec<String>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for (kind, name) in [("clip", "clip"), ("dinov2", "dino"), ("sam", "sam")] {
        ok(&["tiny-model", "--kind", kind, "--out", &s(&root.join(name))]);
    }
    let images = root.join("images");
    std::fs::create_dir_all(&images).unwrap();
    tedbench_photo("dog2_standing.png", &images);
    tedbench_photo("pizza1.png", &images);
    // rows of TEdBench's input_list.json; tennis_ball.jpeg is not copied: missing
    let manifest = serde_json::json!([
        {"img_name": "dog2_standing.png", "target_text": "A photo of a sitting dog.", "box": [30, 20, 220, 240]},
        {"img_name": "tennis_ball.jpeg", "target_text": "A photo of a tomato in a blue tennis court."},
        {"img_name": "pizza1.png", "target_text": "Pizza with pepperoni."},
    ]);
    std::fs::write(root.join("manifest.json"), manifest.to_string()).unwrap();
    let common = [
        "batch", "--model", "assets/tiny-sd", "--manifest", &s(&root.join("manifest.json")), "--images", &s(&images),
        "--method", "layerdiffusion,sdedit", "--seeds", "1", "--size", "64", "--embedding-steps", "2",
        "--finetune-steps", "1", "--steps", "2", "--clip-model", &s(&root.join("clip")), "--dino-model",
        &s(&root.join("dino")), "--sam-model", &s(&root.join("sam/tiny-sam.safetensors")), "--cpu",
    ]
    .map(str::to_string)
    .to_vec();
    Setup { _dir: dir, root, common }
}

impl Setup {
    fn run(&self, extra: &[&str]) -> String {
        let mut args: Vec<&str> = self.common.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        ok(&args)
    }
}

fn csv(path: &Path) -> Vec<Vec<String>> {
    // no cell of this test holds a quoted comma
    std::fs::read_to_string(path).unwrap().lines().map(|l| l.split(',').map(str::to_string).collect()).collect()
}

/// The table and the skipped list of a summary.md (not its sources line).
fn table(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().filter(|l| l.starts_with('|') || l.starts_with("- row")).map(str::to_string).collect()
}

fn mtimes(dir: &Path) -> Vec<(PathBuf, SystemTime)> {
    let mut all = Vec::new();
    for entry in walk(dir) {
        if entry.extension().is_some_and(|e| e == "png" || e == "json" || e == "safetensors") || entry.ends_with("scores.csv") {
            all.push((entry.clone(), std::fs::metadata(&entry).unwrap().modified().unwrap()));
        }
    }
    all.sort();
    all
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_batch_edits_scores_summarizes_resumes_and_shards() {
    let setup = setup();
    let out = setup.root.join("run");
    let out_s = out.to_str().unwrap();
    setup.run(&["--out", out_s]);

    // results.csv: row 0 by both methods, row 2 by sdedit only (no subject), row 1 missing
    let lines = csv(&out.join("results.csv"));
    assert_eq!(lines[0].join(","), format!("row,img_name,{}", layerdiff::eval::ScoredImage::CSV_HEADER));
    let keys: Vec<(String, String, String)> = lines[1..].iter().map(|l| (l[0].clone(), l[3].clone(), l[4].clone())).collect();
    let want = [("0", "layerdiffusion", "1"), ("0", "sdedit", "1"), ("2", "sdedit", "1")];
    let skipped = std::fs::read_to_string(out.join("skipped.csv")).unwrap();
    assert_eq!(keys, want.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())), "{skipped}");
    for l in &lines[1..] {
        assert_eq!(l.len(), 14, "{l:?}");
        assert!(l[2].ends_with("edit-1.png") && Path::new(&l[2]).is_file(), "{l:?}");
        for cell in [&l[6], &l[7], &l[8], &l[9]] {
            assert!(cell.parse::<f32>().unwrap().is_finite(), "{l:?}");
        }
    }
    // the SAM row has a subject and a kept background; the whole-photo row has no background
    assert!(lines[1][12].parse::<f32>().is_ok(), "{:?}", lines[1]);
    assert_eq!(lines[3][12], "", "{:?}", lines[3]);
    for f in ["0-dog2_standing/sam-mask.png", "0-dog2_standing/sheet-all.png", "0-dog2_standing/layerdiffusion/session.json", "2-pizza1/sdedit/edit-1.png", "2-pizza1/sheet-all.png"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(!out.join("2-pizza1/layerdiffusion").exists());

    // summary.md: one table row per method, and the skipped rows with their reasons
    let summary = table(&out.join("summary.md"));
    assert!(summary[0].starts_with("| method | outputs | CLIP score | CLIP score x100 | subject CLIP"), "{summary:?}");
    assert!(summary.iter().any(|l| l.starts_with("| layerdiffusion | 1 |")), "{summary:?}");
    assert!(summary.iter().any(|l| l.starts_with("| sdedit | 2 |")), "{summary:?}");
    assert!(summary.iter().any(|l| l.starts_with("- row 1 (tennis_ball.jpeg), every method: image not found")), "{summary:?}");
    assert!(summary.iter().any(|l| l.starts_with("- row 2 (pizza1.png), layerdiffusion: no mask, point or box")), "{summary:?}");

    // resume: a second run edits and scores nothing
    let before = mtimes(&out);
    let stderr = setup.run(&["--out", out_s]);
    assert!(stderr.contains("0 edited, 3 already done"), "{stderr}");
    assert_eq!(mtimes(&out), before);
    assert_eq!(table(&out.join("summary.md")), summary);

    // shards 0/2 and 1/2, then --summarize: the same numbers
    let sharded = setup.root.join("sharded");
    let sharded_s = sharded.to_str().unwrap();
    setup.run(&["--out", sharded_s, "--shard", "0/2"]);
    setup.run(&["--out", sharded_s, "--shard", "1/2"]);
    assert!(sharded.join("results-shard-0-of-2.csv").is_file() && sharded.join("results-shard-1-of-2.csv").is_file());
    assert!(!sharded.join("summary.md").exists());
    assert_eq!(csv(&sharded.join("results-shard-1-of-2.csv")).len(), 1, "row 1 is missing: no results");
    ok(&["batch", "--summarize", "--out", sharded_s]);
    assert_eq!(table(&sharded.join("summary.md")), summary);
}

#[test]
fn bad_input_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("m.json");
    let m = manifest.to_str().unwrap();
    let d = dir.path().to_str().unwrap();
    let run = |json: &str, extra: &[&str]| {
        std::fs::write(&manifest, json).unwrap();
        let mut args = vec!["batch", "--model", "assets/tiny-sd", "--manifest", m, "--images", d, "--out", d];
        args.extend_from_slice(extra);
        error_of(&args)
    };
    let e = run("{\"rows\": []}", &[]);
    assert!(e.contains("not a JSON list"), "{e}");
    let e = run("[{\"img_name\": \"a.png\", \"target_text\": \"t\"}, {\"target_text\": \"t\"}]", &[]);
    assert!(e.contains("row 1") && e.contains("img_name"), "{e}");
    let e = run("[]", &["--shard", "2/2"]);
    assert!(e.contains("--shard") && e.contains("2/2"), "{e}");
    let e = error_of(&["batch", "--summarize", "--out", d]);
    assert!(e.contains("no results"), "{e}");
}
