//! SAM against the official segment-anything 1.0 (fixtures from `tools/make_sam_fixtures.py`: a
//! tiny random-weight SAM, a 192x256 image and twelve prompt cases), and `SamConfig::from_checkpoint`
//! against the released models' state-dict shapes.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use layerdiff::models::sam::{Sam, SamConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
type Shapes = HashMap<String, Vec<usize>>;

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sam").join(name)
}

/// A safetensors file's tensors, shapes and metadata.
struct Checkpoint {
    tensors: HashMap<String, Tensor>,
    shapes: Shapes,
    metadata: Option<HashMap<String, String>>,
}

fn read(name: &str) -> Result<Checkpoint> {
    let bytes = std::fs::read(fixture(name))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let shapes = header.tensors().into_iter().map(|(name, info)| (name, info.shape.clone())).collect();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    Ok(Checkpoint { tensors, shapes, metadata: header.metadata().clone() })
}

fn tiny_sam() -> Result<Sam> {
    let ckpt = read("tiny-sam.safetensors")?;
    let cfg = SamConfig::from_checkpoint(&ckpt.shapes, ckpt.metadata.as_ref())?;
    Ok(Sam::new(VarBuilder::from_tensors(ckpt.tensors, DType::F32, &Device::Cpu), &cfg)?)
}

fn check(what: &str, ours: &Tensor, theirs: &Tensor) -> Result<f32> {
    assert_eq!(ours.dims(), theirs.dims(), "{what}: shape");
    let err = (ours - theirs)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    eprintln!("{what:32} max abs error {err:.2e}");
    assert!(err <= TOL, "{what}: max abs error {err:e} > {TOL:e}");
    Ok(err)
}

#[test]
fn tiny_config_comes_from_the_metadata() -> Result<()> {
    let ckpt = read("tiny-sam.safetensors")?;
    assert_eq!(SamConfig::from_checkpoint(&ckpt.shapes, ckpt.metadata.as_ref())?, SamConfig::tiny_vit());
    // Without metadata the shapes tell all but the decoder's heads, which take the released 8.
    let inferred = SamConfig::from_checkpoint(&ckpt.shapes, None)?;
    assert_eq!(inferred, SamConfig { decoder_heads: 8, ..SamConfig::tiny_vit() });
    Ok(())
}

#[test]
fn matches_segment_anything() -> Result<()> {
    let sam = tiny_sam()?;
    let fx = read("parity.safetensors")?;
    let t = |name: &str| fx.tensors.get(name).ok_or_else(|| format!("parity.safetensors has no {name}"));

    // 1. preprocess and image encoder
    let input = sam.preprocess(t("image")?)?;
    check("preprocess", &input, t("input")?)?;
    check("image_embeddings", &sam.image_embeddings(&input)?, t("image_embeddings")?)?;

    // 2. prompts, on the official embeddings
    let cases: Vec<serde_json::Value> = serde_json::from_str(&fx.metadata.as_ref().ok_or("no metadata")?["cases"])?;
    assert_eq!(cases.len(), 12);
    for case in cases {
        let name = case["name"].as_str().ok_or("case name")?;
        let given = |key: &str| case[key].as_bool() == Some(true);
        let get = |key: &str| t(&format!("{name}.{key}"));
        let points = if given("points") { Some((get("coords")?, get("labels")?)) } else { None };
        let boxes = if given("boxes") { Some(get("boxes")?) } else { None };
        let mask_input = if given("mask_input") { Some(get("mask_input")?) } else { None };
        let multimask = given("multimask");
        let (low_res, iou) = sam.predict_masks(t("image_embeddings")?, points, boxes, mask_input, multimask)?;
        let k = if multimask { 3 } else { 1 };
        assert_eq!(iou.dims(), [low_res.dim(0)?, k], "{name}: iou shape");
        check(&format!("{name}.low_res"), &low_res, get("low_res")?)?;
        check(&format!("{name}.iou"), &iou, get("iou")?)?;
    }
    Ok(())
}

#[test]
fn bad_prompts_are_errors() -> Result<()> {
    let sam = tiny_sam()?;
    let dev = Device::Cpu;
    let emb = Tensor::zeros((1, 32, 16, 16), DType::F32, &dev)?;
    let coords = Tensor::zeros((2, 1, 2), DType::F32, &dev)?;
    let labels = Tensor::ones((2, 1), DType::F32, &dev)?;
    let one_box = Tensor::zeros((1, 4), DType::F32, &dev)?;
    let err = sam.predict_masks(&emb, Some((&coords, &labels)), Some(&one_box), None, true).unwrap_err();
    assert!(err.to_string().contains("batch sizes differ"), "{err}");
    let err = sam.predict_masks(&emb.narrow(2, 0, 8)?, None, Some(&one_box), None, true).unwrap_err();
    assert!(err.to_string().contains("image embeddings are [1, 32, 8, 16]"), "{err}");
    let big = Tensor::zeros((3, 300, 10), DType::F32, &dev)?;
    assert!(sam.preprocess(&big).is_err());
    Ok(())
}

#[test]
fn released_configs_from_official_shapes() -> Result<()> {
    let all: HashMap<String, Shapes> =
        serde_json::from_str(&std::fs::read_to_string(fixture("official-shapes.json"))?)?;
    for (kind, expected) in
        [("vit_b", SamConfig::vit_b()), ("vit_l", SamConfig::vit_l()), ("vit_h", SamConfig::vit_h())]
    {
        let shapes = &all[kind];
        assert_eq!(SamConfig::from_checkpoint(shapes, None)?, expected, "{kind}");
        assert_eq!(expected.embedding_size(), 64);
        // The metadata wins over the shapes.
        let meta = HashMap::from([("sam_config".to_string(), serde_json::to_string(&SamConfig::tiny_vit())?)]);
        assert_eq!(SamConfig::from_checkpoint(shapes, Some(&meta))?, SamConfig::tiny_vit());
    }
    Ok(())
}

/// The shapes of every tensor `Sam::new` asks for.
fn recorded_shapes(cfg: &SamConfig) -> Result<(Shapes, Sam)> {
    let varmap = VarMap::new();
    let sam = Sam::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), cfg)?;
    let data = varmap.data().lock().map_err(|e| e.to_string())?;
    Ok((data.iter().map(|(name, var)| (name.clone(), var.dims().to_vec())).collect(), sam))
}

#[test]
fn mobile_sam_config_from_shapes() -> Result<()> {
    let (shapes, _) = recorded_shapes(&SamConfig::mobile_sam())?;
    assert_eq!(SamConfig::from_checkpoint(&shapes, None)?, SamConfig::mobile_sam());
    Ok(())
}

#[test]
fn tiny_configs_run() -> Result<()> {
    for cfg in [SamConfig::tiny_vit(), SamConfig::tiny_mobile_sam()] {
        let (shapes, sam) = recorded_shapes(&cfg)?;
        let meta = HashMap::from([("sam_config".to_string(), serde_json::to_string(&cfg)?)]);
        assert_eq!(SamConfig::from_checkpoint(&shapes, Some(&meta))?, cfg);
        let img = Tensor::rand(0f32, 255., (3, 200, 256), &Device::Cpu)?;
        let emb = sam.image_embeddings(&sam.preprocess(&img)?)?;
        assert_eq!(emb.dims(), [1, 32, 16, 16]);
        let boxes = Tensor::new(&[[10f32, 20., 100., 150.], [0., 0., 255., 199.]], &Device::Cpu)?;
        let (low_res, iou) = sam.predict_masks(&emb, None, Some(&boxes), None, false)?;
        assert_eq!((low_res.dims(), iou.dims()), ([2, 1, 64, 64].as_slice(), [2, 1].as_slice()));
    }
    Ok(())
}

#[test]
fn unknown_layouts_are_errors() -> Result<()> {
    let unet: Shapes = HashMap::from([("conv_in.weight".to_string(), vec![320, 4, 3, 3])]);
    let err = SamConfig::from_checkpoint(&unet, None).unwrap_err();
    assert!(err.contains("not a SAM checkpoint"), "{err}");
    assert!(!err.contains('\n'), "{err}");

    // A SAM image encoder without its decoder.
    let all: HashMap<String, Shapes> =
        serde_json::from_str(&std::fs::read_to_string(fixture("official-shapes.json"))?)?;
    let encoder_only: Shapes = all["vit_b"]
        .iter()
        .filter(|(k, _)| k.starts_with("image_encoder."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let err = SamConfig::from_checkpoint(&encoder_only, None).unwrap_err();
    assert!(err.starts_with("no prompt_encoder."), "{err}");

    let meta = HashMap::from([("sam_config".to_string(), "{\"image_size\": 1024}".to_string())]);
    let err = SamConfig::from_checkpoint(&all["vit_b"], Some(&meta)).unwrap_err();
    assert!(err.contains("sam_config"), "{err}");
    Ok(())
}
