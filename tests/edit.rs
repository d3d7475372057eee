//! The edit as a whole on the bundled toy model (assets/toy-sd, trained, not random): the session
//! it writes, `sample` reproducing it, and a resumed run ending where an uninterrupted one does.

#[path = "common/tiny.rs"]
mod tiny;
use tiny::{bytes, load_toy as load, root, toy_request, Recorder};
use layerdiff::method::edit::{edit, sample_session, BackgroundSource, EditRequest, Resample};
use layerdiff::method::session::{self, SessionInfo};
use layerdiff::method::EditSettings;

fn request() -> EditRequest {
    toy_request(EditSettings {
        embedding_steps: 6,
        embedding_lr: 1e-2,
        finetune_steps: 4,
        finetune_lr: 1e-4,
        steps: 4,
        ..Default::default()
    })
}

thread_local!(static STAGES_ENDED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) });

#[test]
fn edit_writes_a_complete_session_and_sample_reproduces_it() {
    let (files, mut sd) = load();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let mut rec = Recorder::new(None);
    // Per thread: other tests edit at the same time.
    layerdiff::method::edit::AFTER_STAGE.get_or_init(|| || STAGES_ENDED.set(STAGES_ENDED.get() + 1));
    let result = edit(&mut sd, &files, &request(), out, false, &mut rec).unwrap();
    assert_eq!(result.images.len(), 2);
    assert_eq!(STAGES_ENDED.get(), 2, "the allocator's hook runs after stages 1 and 2");
    // Stage 2 trained its own copy: the pipeline's UNet was freed, and loads again on demand.
    assert!(sd.unet().is_err(), "the edit kept the pipeline's UNet through stage 2");
    assert_eq!(rec.stages, ["background", "stage 1", "stage 2", "seed 1", "seed 2"]);
    for f in ["edit-1.png", "edit-2.png", "sheet.png", "mask.png", "background.png", "session.json", "session.safetensors"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(!out.join(session::CHECKPOINT_JSON).exists(), "checkpoint left behind");
    let info: SessionInfo = session::read_json(&out.join(session::SESSION_JSON)).unwrap();
    assert_eq!(info.progress, "done");
    assert_eq!(info.request.object, "a large green triangle on the left");
    assert_eq!(info.losses.stage1.len(), 6);
    assert_eq!(info.losses.stage2.len(), 4);
    assert_eq!((info.crop.width, info.crop.height), (32, 32));
    assert!(info.model_files.iter().all(|f| f.sha256.len() == 64));
    for stage in ["stage1", "stage2", "stage3"] {
        assert!(info.timings.contains_key(stage), "no timing for {stage}");
    }

    // `sample` with the same seed and settings gives the same image, bit for bit.
    let again = dir.path().join("again");
    let images = sample_session(&sd, &files, out, &[2], Resample::default(), &again, &mut Recorder::new(None)).unwrap();
    assert_eq!(images[0].1, result.images[1].1);
    assert_eq!(bytes(&again.join("edit-2.png")), bytes(&out.join("edit-2.png")));
    // Another alpha moves e_bar, and so the image.
    let other = sample_session(&sd, &files, out, &[2], Resample { alpha: Some(0.2), ..Default::default() }, &again, &mut Recorder::new(None)).unwrap();
    assert_ne!(other[0].1, result.images[1].1);
    let bad = Resample { alpha: Some(1.5), ..Default::default() };
    let err = sample_session(&sd, &files, out, &[2], bad, &again, &mut Recorder::new(None)).expect_err("refused").to_string();
    assert!(err.contains("--alpha") && !err.contains('\n'), "{err}");
}

#[test]
fn a_resumed_edit_ends_as_an_uninterrupted_one() {
    let (files, mut sd) = load();
    let whole = tempfile::tempdir().unwrap();
    edit(&mut sd, &files, &request(), whole.path(), false, &mut Recorder::new(None)).unwrap();

    // Stop once in stage 1 and once in stage 2, resuming each time.
    let split = tempfile::tempdir().unwrap();
    let err = edit(&mut sd, &files, &request(), split.path(), false, &mut Recorder::new(Some(2))).err().expect("stopped");
    assert!(err.to_string().contains("--resume"), "{err}");
    assert!(split.path().join(session::CHECKPOINT_JSON).exists());
    let err = edit(&mut sd, &files, &request(), split.path(), true, &mut Recorder::new(Some(2))).err().expect("stopped");
    assert!(err.to_string().contains("stage 2"), "{err}");
    edit(&mut sd, &files, &request(), split.path(), true, &mut Recorder::new(None)).unwrap();

    for f in ["edit-1.png", "edit-2.png", "session.safetensors"] {
        assert_eq!(bytes(&whole.path().join(f)), bytes(&split.path().join(f)), "{f} differs after resuming");
    }
    let a: SessionInfo = session::read_json(&whole.path().join(session::SESSION_JSON)).unwrap();
    let b: SessionInfo = session::read_json(&split.path().join(session::SESSION_JSON)).unwrap();
    assert_eq!(serde_json::to_string(&a.losses).unwrap(), serde_json::to_string(&b.losses).unwrap());
}

#[test]
fn background_sources_choose_the_background_layer() {
    let (files, mut sd) = load();
    let dir = tempfile::tempdir().unwrap();
    // A plain picture as the background source: background.png is that picture at the working size.
    let picture = dir.path().join("plain.png");
    image::RgbImage::from_pixel(128, 128, image::Rgb([20, 140, 60])).save(&picture).unwrap();
    let mut req = request();
    req.seeds = vec![1];
    req.background_source = BackgroundSource::Image { image: picture.clone(), mask: None };
    let out = dir.path().join("image");
    edit(&mut sd, &files, &req, &out, false, &mut Recorder::new(None)).unwrap();
    let background = image::open(out.join("background.png")).unwrap().to_rgb8();
    assert_eq!(background.dimensions(), (32, 32));
    assert!(background.pixels().all(|p| p.0 == [20, 140, 60]));

    // `keep`: the background layer is the photo itself, and no background is generated.
    req.background_source = BackgroundSource::Keep;
    let out = dir.path().join("keep");
    let mut rec = Recorder::new(None);
    edit(&mut sd, &files, &req, &out, false, &mut rec).unwrap();
    assert!(!rec.stages.contains(&"background".to_string()));
    let input = image::open(root().join("assets/demo/toy-scene.png")).unwrap().to_rgb8();
    let (expected, _) = layerdiff::image_io::resize_center_crop(&input, 32, 32);
    assert_eq!(image::open(out.join("background.png")).unwrap().to_rgb8(), expected);
}

#[test]
fn bad_requests_are_refused_before_any_work() {
    let (files, mut sd) = load();
    let dir = tempfile::tempdir().unwrap();
    let blank = dir.path().join("blank.png");
    image::GrayImage::new(256, 256).save(&blank).unwrap();
    let small = dir.path().join("small.png");
    image::RgbImage::new(16, 16).save(&small).unwrap();
    let not_an_image = dir.path().join("text.png");
    std::fs::write(&not_an_image, "hello").unwrap();
    type Change = Box<dyn Fn(&mut EditRequest)>;
    let cases: Vec<(Change, &str)> = vec![
        (Box::new(|r| r.object = " ".into()), "--object"),
        (Box::new(|r| r.background = String::new()), "--background"),
        (Box::new(|r| r.settings.alpha = 1.5), "--alpha"),
        (Box::new(|r| r.size = 33), "--size"),
        (Box::new(move |r| r.mask = blank.clone()), "empty"),
        (Box::new(move |r| r.image = small.clone()), "too small"),
        (Box::new(move |r| r.image = not_an_image.clone()), "text.png"),
    ];
    for (change, must_mention) in cases {
        let mut req = request();
        change(&mut req);
        let out = dir.path().join("out");
        let msg = edit(&mut sd, &files, &req, &out, false, &mut Recorder::new(None)).err().expect("refused").to_string();
        assert!(msg.contains(must_mention) && !msg.contains('\n'), "{msg}");
        assert!(!out.join("session.safetensors").exists());
    }
}
