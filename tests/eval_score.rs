//! `score_folder`: every metric per image into a CSV, for a session folder of `layerdiff edit`
//! (a real edit on the tiny SD model) and for loose images, with tiny metric models.

#[path = "common/tiny.rs"]
mod tiny;

use candle_core::Device;
use layerdiff::eval::{score_folder, write_tiny_clip, write_tiny_dinov2, ScoreRequest, Scorer, ScorerOptions};
use layerdiff::method::edit::edit;
use layerdiff::method::EditSettings;
use layerdiff::sources::SourceOptions;
use std::path::Path;

fn scorer(dir: &Path) -> Scorer {
    let (clip, dino) = (dir.join("clip"), dir.join("dino"));
    write_tiny_clip(&clip, 1).unwrap();
    write_tiny_dinov2(&dino, 2).unwrap();
    let opts = ScorerOptions {
        clip_model: clip.to_str().unwrap().into(),
        dino_model: Some(dino.to_str().unwrap().into()),
        source: SourceOptions::default(),
        device: Device::Cpu,
    };
    Scorer::load(&opts).unwrap()
}

fn csv_lines(path: &Path) -> Vec<Vec<String>> {
    // no cell of these tests holds a quoted comma
    std::fs::read_to_string(path).unwrap().lines().map(|l| l.split(',').map(str::to_string).collect()).collect()
}

#[test]
fn a_session_folder_is_scored_against_its_own_text_photo_mask_and_background() {
    let dir = tempfile::tempdir().unwrap();
    let scorer = scorer(dir.path());
    let (files, mut sd) = tiny::load();
    let session = dir.path().join("session");
    let settings = EditSettings { embedding_steps: 2, finetune_steps: 1, steps: 2, ..Default::default() };
    edit(&mut sd, &files, &tiny::demo_request(settings), &session, false, &mut tiny::Recorder::new(None)).unwrap();

    let csv = dir.path().join("scores.csv");
    let mut seen = Vec::new();
    let req = ScoreRequest { images: vec![session.clone()], ..Default::default() };
    let rows = score_folder(&scorer, &req, &csv, &mut |done, total| seen.push((done, total))).unwrap();
    assert_eq!(seen, [(1, 2), (2, 2)]);
    assert_eq!(rows.iter().map(|r| r.seed).collect::<Vec<_>>(), [Some(1), Some(2)]);
    assert!(rows.iter().all(|r| r.text == "a jumping dog in a dense forest" && r.method.as_deref() == Some("layerdiffusion")));
    let lines = csv_lines(&csv);
    assert_eq!(lines[0].join(","), layerdiff::eval::ScoredImage::CSV_HEADER);
    assert_eq!(lines.len(), 3);
    for line in &lines[1..] {
        assert_eq!(line.len(), 12);
        assert!(line[0].ends_with(".png") && line[1] == "layerdiffusion");
        // every metric applies: the session has a mask and a (generated) background
        for cell in &line[4..] {
            let v: f32 = cell.parse().unwrap_or_else(|_| panic!("{line:?}"));
            assert!(v.is_finite());
        }
    }
    // another text moves the CLIP score only; a text with a comma is quoted in the CSV
    let text = Some("another text, with a comma".to_string());
    let again = score_folder(&scorer, &ScoreRequest { images: vec![session.clone()], text: text.clone(), ..Default::default() }, &csv, &mut |_, _| {}).unwrap();
    assert_eq!(again[0].scores.subject, rows[0].scores.subject);
    assert_ne!(again[0].scores.clip_score, rows[0].scores.clip_score);
    assert!(std::fs::read_to_string(&csv).unwrap().contains("\"another text, with a comma\""));
}

#[test]
fn loose_images_are_scored_against_the_text_and_an_optional_input() {
    let dir = tempfile::tempdir().unwrap();
    let scorer = scorer(dir.path());
    let root = tiny::root();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let photo = image::open(root.join("assets/demo/dog.png")).unwrap().to_rgb8();
    let small = image::imageops::resize(&photo, 64, 64, image::imageops::FilterType::Triangle);
    small.save(images.join("a.png")).unwrap();
    image::imageops::colorops::huerotate(&small, 90).save(images.join("b.png")).unwrap();
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    let csv = dir.path().join("out.csv");

    // text only: the CLIP score alone
    let req = ScoreRequest { images: vec![images.clone()], text: Some("a dog".into()), ..Default::default() };
    let rows = score_folder(&scorer, &req, &csv, &mut |_, _| {}).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.scores.image.is_none() && r.scores.subject.is_none() && r.method.is_none()));
    let lines = csv_lines(&csv);
    assert!(lines[1][6..].iter().all(String::is_empty), "{:?}", lines[1]);

    // with the input photo and its mask: the photo is fitted to each image's size, and is the
    // background source
    let req = ScoreRequest {
        input: Some(root.join("assets/demo/dog.png")),
        mask: Some(root.join("assets/demo/dog-mask.png")),
        ..req
    };
    let rows = score_folder(&scorer, &req, &csv, &mut |_, _| {}).unwrap();
    let (a, b) = (&rows[0].scores, &rows[1].scores);
    assert!(a.subject.unwrap().clip > 0.99 && a.background.unwrap().clip > 0.99, "{a:?}");
    assert!(b.subject.unwrap().clip < a.subject.unwrap().clip, "{b:?}");
    assert!(csv_lines(&csv)[2][6..].iter().all(|c| c.parse::<f32>().is_ok()));

    // one-line errors
    let no_text = ScoreRequest { images: vec![images.clone()], ..Default::default() };
    let err = score_folder(&scorer, &no_text, &csv, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("--text") && !err.contains('\n'), "{err}");
    let missing = ScoreRequest { images: vec![dir.path().join("nope")], text: Some("x".into()), ..Default::default() };
    assert!(score_folder(&scorer, &missing, &csv, &mut |_, _| {}).unwrap_err().to_string().contains("no such file"));
}
