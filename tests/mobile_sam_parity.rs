//! MobileSAM's TinyViT image encoder against ultralytics 8.4.190's port of it (the module that
//! loads `mobile_sam.pt`), and config inference from checkpoint shapes. Fixtures from
//! `tools/make_mobile_sam_fixtures.py` (see `tests/fixtures/mobile-sam/README.md`).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use layerdiff::models::sam::tiny_vit::{self, TinyViT, TinyVitConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
type Shapes = HashMap<String, Vec<usize>>;

const TOL: f32 = 1e-4;
const PREFIX: &str = "image_encoder.";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mobile-sam").join(name)
}

/// A safetensors file's tensor shapes and `__metadata__`.
fn header(name: &str) -> Result<(Shapes, HashMap<String, String>)> {
    let bytes = std::fs::read(fixture(name))?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let shapes = metadata.tensors().into_iter().map(|(name, info)| (name, info.shape.clone())).collect();
    Ok((shapes, metadata.metadata().clone().unwrap_or_default()))
}

fn official_shapes() -> Result<Shapes> {
    Ok(serde_json::from_str(&std::fs::read_to_string(fixture("official-shapes.json"))?)?)
}

/// The tensors of a checkpoint our TinyViT reads: all but the classifier head and BatchNorm's
/// `num_batches_tracked`.
fn loaded_by_us(shapes: &Shapes) -> Shapes {
    shapes
        .iter()
        .filter(|(k, _)| {
            !k.ends_with(".num_batches_tracked")
                && !k.starts_with("image_encoder.norm_head.")
                && !k.starts_with("image_encoder.head.")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The name -> shape of every tensor `TinyViT::new` asks for, under `image_encoder.`.
fn requested(cfg: &TinyVitConfig) -> Result<Shapes> {
    let varmap = VarMap::new();
    TinyViT::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu).pp("image_encoder"), cfg)?;
    let data = varmap.data().lock().unwrap();
    Ok(data.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect())
}

fn tiny_model() -> Result<TinyViT> {
    // SAFETY: the fixture is not modified while the tests run.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[fixture("tiny-vit.safetensors")], DType::F32, &Device::Cpu)? };
    Ok(TinyViT::new(vb.pp("image_encoder"), &TinyVitConfig::tiny())?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

#[test]
fn fixture_was_made_with_tiny_config() -> Result<()> {
    let (_, metadata) = header("parity.safetensors")?;
    let cfg: TinyVitConfig = serde_json::from_str(&metadata["config"])?;
    assert_eq!(cfg, TinyVitConfig::tiny());
    Ok(())
}

#[test]
fn tiny_vit_matches_reference() -> Result<()> {
    let model = tiny_model()?;
    let data = candle_core::safetensors::load(fixture("parity.safetensors"), &Device::Cpu)?;
    let input = data["input"].to_dtype(DType::F32)?;
    let start = std::time::Instant::now();
    let output = model.forward(&input)?;
    let elapsed = start.elapsed();
    let err = max_abs_diff(&output, &data["output"])?;
    eprintln!("tiny TinyViT {:?} -> {:?} in {elapsed:.2?}: max abs error {err:.3e}", input.dims(), output.dims());
    assert!(err <= TOL, "max abs error {err:e} > {TOL:e}");
    Ok(())
}

#[test]
fn batch_of_two_matches_single_images() -> Result<()> {
    let model = tiny_model()?;
    let data = candle_core::safetensors::load(fixture("parity.safetensors"), &Device::Cpu)?;
    let a = data["input"].to_dtype(DType::F32)?;
    let b = a.flip(&[3])?.affine(0.5, 0.2)?;
    let both = model.forward(&Tensor::cat(&[&a, &b], 0)?)?;
    for (i, x) in [a, b].iter().enumerate() {
        let err = max_abs_diff(&both.narrow(0, i, 1)?, &model.forward(x)?)?;
        assert!(err <= 1e-5, "image {i} of the batch differs from its own run by {err:e}");
    }
    Ok(())
}

#[test]
fn loads_exactly_the_reference_tensors() -> Result<()> {
    // The tiny fixture, names and shapes.
    let (shapes, _) = header("tiny-vit.safetensors")?;
    assert_eq!(requested(&TinyVitConfig::tiny())?, loaded_by_us(&shapes));
    // MobileSAM's released encoder.
    assert_eq!(requested(&TinyVitConfig::mobile_sam())?, loaded_by_us(&official_shapes()?));
    Ok(())
}

#[test]
fn mobile_sam_config_runs() -> Result<()> {
    // At 224 pixels (stages of 56, 28, 14, 14) stage 2's 14x14 window is its whole grid, so the
    // released widths run every path without a 1024-pixel input.
    let cfg = TinyVitConfig { img_size: 224, ..TinyVitConfig::mobile_sam() };
    let varmap = VarMap::new();
    let model = TinyViT::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &cfg)?;
    let x = Tensor::randn(0f32, 1., (1, 3, 224, 224), &Device::Cpu)?;
    assert_eq!(model.forward(&x)?.dims(), &[1, 256, 14, 14]);
    Ok(())
}

#[test]
fn infer_reads_the_official_shapes() -> Result<()> {
    assert_eq!(tiny_vit::infer(&official_shapes()?, PREFIX), Some(TinyVitConfig::mobile_sam()));
    Ok(())
}

#[test]
fn infer_reads_the_tiny_fixture() -> Result<()> {
    // img_size is not in the shapes (attention_bias_idxs is a non-persistent buffer): infer takes
    // MobileSAM's 1024. Stage 0's heads and window are unused, and infer takes MobileSAM's 2 and 7,
    // which tiny() has too.
    let (shapes, _) = header("tiny-vit.safetensors")?;
    let expected = TinyVitConfig { img_size: 1024, ..TinyVitConfig::tiny() };
    assert_eq!(tiny_vit::infer(&shapes, PREFIX), Some(expected));
    Ok(())
}

#[test]
fn infer_rejects_other_checkpoints() -> Result<()> {
    let official = official_shapes()?;
    // Wrong prefix, or nothing at all.
    assert_eq!(tiny_vit::infer(&official, "mask_decoder."), None);
    assert_eq!(tiny_vit::infer(&HashMap::new(), PREFIX), None);
    // SAM's ViT encoder.
    let vit: Shapes = [
        ("image_encoder.patch_embed.proj.weight", vec![768, 3, 16, 16]),
        ("image_encoder.pos_embed", vec![1, 64, 64, 768]),
        ("image_encoder.blocks.0.attn.qkv.weight", vec![2304, 768]),
        ("image_encoder.neck.0.weight", vec![256, 768, 1, 1]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(tiny_vit::infer(&vit, PREFIX), None);
    // A TinyViT with its last stage cut off.
    let three_stages = official.into_iter().filter(|(k, _)| !k.starts_with("image_encoder.layers.3.")).collect();
    assert_eq!(tiny_vit::infer(&three_stages, PREFIX), None);
    Ok(())
}
