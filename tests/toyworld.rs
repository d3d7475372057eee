//! A toy-world dataset written, read back and scored: what a training run and an edit evaluation
//! rely on.

use layerdiff::toyworld::{load_dataset, read_scene, scene_for, write_dataset, Accuracy, DataOptions};
use std::collections::BTreeMap;
use std::path::Path;

/// Every file under `dir` with its bytes, for comparing two runs.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for sub in ["", "images", "masks"] {
        for entry in std::fs::read_dir(dir.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                files.insert(path.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

#[test]
fn dataset_round_trips_and_scores_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("world");
    let opts = DataOptions { n: 20, size: 32, seed: 11, out: out.clone() };
    let mut calls = Vec::new();
    write_dataset(&opts, &mut |done, total| calls.push((done, total))).unwrap();
    assert_eq!(calls.last(), Some(&(20, 20)));
    assert!(out.join("images/000019.png").is_file() && out.join("masks/000000.png").is_file());

    let world: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("world.json")).unwrap()).unwrap();
    assert_eq!(world, serde_json::json!({"version": 1, "size": 32, "n": 20, "seed": 11}));
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(out.join("scenes.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["image"], "images/000000.png");
    assert_eq!(first["mask"], "masks/000000.png");
    assert_eq!(first["caption"], format!("{} in {}", first["object_text"].as_str().unwrap(), first["background_text"].as_str().unwrap()));

    let (info, examples) = load_dataset(&out).unwrap();
    assert_eq!((info.n, info.size, info.seed), (20, 32, 11));
    assert_eq!(examples.len(), 20);
    let mut acc = Accuracy::default();
    for (i, ex) in examples.iter().enumerate() {
        assert_eq!(ex.index, i);
        assert_eq!(ex.scene, scene_for(11, i));
        assert_eq!(ex.caption, ex.scene.caption());
        assert!(ex.caption.ends_with(" background"), "{}", ex.caption);
        // The mask covers exactly the subject's and the dot's pixels: no background colour equals
        // either.
        let (subject, dot) = (ex.scene.colour.rgb(), ex.scene.dot.rgb());
        for (p, m) in ex.image.pixels().zip(ex.mask.pixels()) {
            assert!(m.0[0] == 0 || m.0[0] == 255);
            assert_eq!(m.0[0] == 255, *p == subject || *p == dot, "example {i}");
        }
        assert!(ex.image.pixels().any(|p| *p == dot), "example {i} lost its dot");
        acc.add(read_scene(&ex.image).hits(&ex.scene));
    }
    assert_eq!(acc.worst(), 1.0, "{acc}");

    // Rerunning resumes: same settings, identical files.
    let before = snapshot(&out);
    std::fs::remove_file(out.join("images/000007.png")).unwrap();
    write_dataset(&opts, &mut |_, _| {}).unwrap();
    assert_eq!(snapshot(&out), before);

    // Another seed into the same folder is refused, naming the folder and the way out.
    let err = write_dataset(&DataOptions { seed: 12, ..opts }, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.starts_with(&out.display().to_string()), "{err}");
    assert!(err.contains("seed 11") && err.contains("another --out"), "{err}");
    assert_eq!(snapshot(&out), before);
}
