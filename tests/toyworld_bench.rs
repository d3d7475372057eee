//! The committed toy model (`assets/toy-sd`, trained by `layerdiff train`, see the README) against
//! floors set from its measured scores with margin: it must still draw what a caption asks, and
//! a small toy-world benchmark must still score, so a regression in the model code, the sampler or
//! the method shows up as a falling number.

#[path = "common/tiny.rs"]
mod tiny;
use tiny::{bytes, load_toy as load, toy_request, Recorder};
use layerdiff::method::edit::edit;
use layerdiff::method::EditSettings;
use layerdiff::image_io::tensor_to_images;
use layerdiff::pipeline::{generate, GenerateOptions};
use layerdiff::toyworld::bench::{make_tasks, rates, run_bench, toy_edit_settings, variants, BenchRequest};
use layerdiff::toyworld::{read_scene, scene_for, Accuracy};
use layerdiff::train::held_out_seed;

// Floors, from the committed model's measured scores (assets/toy-sd/README.md, README's toy-world
// table) with margin for the small samples here. At step 6000 it drew 64 held-out captions with
// background 100 %, colour 100 %, shape 94 %, position 100 % right, and these 16 with 100, 100,
// 94 and 100 %. The 20-task benchmark gave LayerDiffusion colour kept 100 %, background reached
// 98 %, dot kept 52 %; the 5 tasks below 100, 100 and 40 % (one output is 20 points; the dot
// floor sits one output under).
const TEXT_TO_IMAGE_SAMPLES: usize = 16;
const FLOOR_BACKGROUND: f64 = 0.85;
const FLOOR_COLOUR: f64 = 0.85;
const FLOOR_SHAPE: f64 = 0.75;
const FLOOR_POSITION: f64 = 0.75;
/// One task of each kind of change.
const BENCH_TASKS: usize = 5;
const FLOOR_EDIT_COLOUR_KEPT: f64 = 80.0;
const FLOOR_EDIT_BACKGROUND: f64 = 60.0;
const FLOOR_EDIT_DOT_KEPT: f64 = 20.0;

#[test]
fn the_toy_model_draws_held_out_captions() {
    let (_, sd) = load();
    let mut accuracy = Accuracy::default();
    for i in 0..TEXT_TO_IMAGE_SAMPLES {
        let scene = scene_for(held_out_seed(0), i);
        let opts = GenerateOptions { prompt: scene.caption(), steps: 25, guidance_scale: 3.0, width: 32, height: 32, seed: i as u64, ..Default::default() };
        let image = &tensor_to_images(&generate(&sd, &opts, &mut |_, _| {}).unwrap()).unwrap()[0];
        accuracy.add(read_scene(image).hits(&scene));
    }
    eprintln!("toy model, {TEXT_TO_IMAGE_SAMPLES} held-out captions: {accuracy}");
    for (what, count, floor) in [
        ("background", accuracy.background, FLOOR_BACKGROUND),
        ("colour", accuracy.colour, FLOOR_COLOUR),
        ("shape", accuracy.shape, FLOOR_SHAPE),
        ("position", accuracy.position, FLOOR_POSITION),
    ] {
        let rate = accuracy.rate(count);
        assert!(rate >= floor, "{what}: {rate:.2} under the floor {floor}");
    }
}

#[test]
fn a_small_benchmark_keeps_its_scores() {
    let (files, mut sd) = load();
    let dir = tempfile::tempdir().unwrap();
    let base = toy_edit_settings();
    let request = BenchRequest {
        tasks: make_tasks(held_out_seed(0), BENCH_TASKS),
        variants: variants(&["layerdiffusion".into(), "sdedit".into()], false, &base).unwrap(),
        seeds: vec![1],
        size: 32,
        strength: layerdiff::baselines::SDEDIT_STRENGTH,
        out: dir.path().to_path_buf(),
    };
    let results = run_bench(&mut sd, &files, &request, &mut Recorder::default(), &mut |_| {}).unwrap();
    assert_eq!(results.len(), 2 * BENCH_TASKS);
    assert!(dir.path().join("summary.md").is_file() && dir.path().join("sheet.png").is_file());
    // rates: background, attribute, colour, shape, dot, single, all (percent)
    let ld = rates(&results, "layerdiffusion").unwrap();
    eprintln!("layerdiffusion: {ld:?}; sdedit: {:?}", rates(&results, "sdedit").unwrap());
    assert!(ld[2] >= FLOOR_EDIT_COLOUR_KEPT, "layerdiffusion kept the colour in {:.0} %", ld[2]);
    assert!(ld[0] >= FLOOR_EDIT_BACKGROUND, "layerdiffusion reached the background in {:.0} %", ld[0]);
    assert!(ld[4] >= FLOOR_EDIT_DOT_KEPT, "layerdiffusion kept the identity dot in {:.0} %", ld[4]);
}

#[test]
fn every_variant_runs_stage_3_ablations_redraw_the_base_session_and_a_rerun_resumes() {
    let (files, mut sd) = load();
    let dir = tempfile::tempdir().unwrap();
    let base = EditSettings { embedding_steps: 3, finetune_steps: 2, steps: 3, ..toy_edit_settings() };
    let methods = ["layerdiffusion".to_string(), "imagic".into(), "sdedit".into()];
    let request = BenchRequest {
        tasks: make_tasks(held_out_seed(0), 1),
        variants: variants(&methods, true, &base).unwrap(),
        seeds: vec![1],
        size: 32,
        strength: layerdiff::baselines::SDEDIT_STRENGTH,
        out: dir.path().to_path_buf(),
    };
    let mut ran = Vec::new();
    let results = run_bench(&mut sd, &files, &request, &mut Recorder::default(), &mut |line| ran.push(line)).unwrap();
    assert_eq!((results.len(), ran.len()), (10, 10));
    let csv = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 11, "{csv}");

    // "no-guidance" is stage 3 of the LayerDiffusion session with guidance off: the same image as
    // a whole edit with --guidance-period 0.
    let task = dir.path().join("task-000");
    let mut whole = toy_request(EditSettings { guidance_period: 0, ..base.clone() });
    let target = &request.tasks[0].target;
    (whole.image, whole.mask) = (task.join("input.png"), task.join("mask.png"));
    (whole.object, whole.background, whole.seeds) = (target.object_text(), target.background_text(), vec![1]);
    let out = dir.path().join("whole");
    edit(&mut sd, &files, &whole, &out, false, &mut Recorder::default()).unwrap();
    assert_eq!(bytes(&out.join("edit-1.png")), bytes(&task.join("no-guidance/edit-1.png")));
    assert_ne!(bytes(&task.join("layerdiffusion/edit-1.png")), bytes(&task.join("alpha-1/edit-1.png")));

    // Run again: every output is on disk, nothing is edited anew.
    ran.clear();
    let again = run_bench(&mut sd, &files, &request, &mut Recorder::default(), &mut |line| ran.push(line)).unwrap();
    assert!(ran.is_empty(), "{ran:?}");
    assert_eq!(again.len(), 10);
}
