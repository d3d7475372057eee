//! Stages 1 and 2 of LayerDiffusion on the tiny model (`tests/fixtures/tiny-sd`), 8x8 latents:
//! the losses fall, each stage trains only what it should, the masks gate the loss, runs in chunks
//! and resumed runs equal uninterrupted ones bit for bit, LoRA starts as the base model, sessions
//! rebuild the trained model bit for bit, and divergence gives a one-line error.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use layerdiff::method::finetune::{layered_finetune, LayeredFinetune};
use layerdiff::method::optimize::{
    interpolate_embeddings, layer_terms, layered_optimization, masked_mse, noisy_step, LayeredOptimization,
};
use layerdiff::method::{FinetuneMode, LayeredLatents, StepLoss};
use layerdiff::models::unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
use layerdiff::pipeline::seeded_noise;
use layerdiff::schedulers::{DdimConfig, DdimScheduler, TrainSchedule};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const SEED: u64 = 42;
const DEV: &Device = &Device::Cpu;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn config() -> Result<UNet2DConditionModelConfig> {
    let json = serde_json::from_str(&std::fs::read_to_string(fixture("tiny-sd/unet/config.json"))?)?;
    Ok(UNet2DConditionModelConfig::from_json(&json)?)
}

fn unet_weights() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors"), DEV)?)
}

fn frozen_unet(weights: &HashMap<String, Tensor>) -> Result<UNet2DConditionModel> {
    Ok(UNet2DConditionModel::new(VarBuilder::from_tensors(weights.clone(), DType::F32, DEV), config()?)?)
}

fn alphas_cumprod() -> Result<TrainSchedule> {
    let cfg = DdimConfig::from_file(&fixture("tiny-sd/scheduler/scheduler_config.json"))?;
    Ok(TrainSchedule::from_scheduler(&DdimScheduler::new(cfg)?))
}

/// `[1, 1, 8, 8]` masks: 1 on columns `< split` (subject) or rows `< split` (not background).
fn half_mask(split: usize, by_rows: bool) -> Result<Tensor> {
    let v: Vec<f32> = (0..64).map(|i| if (if by_rows { i / 8 } else { i % 8 }) < split { 1.0 } else { 0.0 }).collect();
    Ok(Tensor::from_vec(v, (1, 1, 8, 8), DEV)?)
}

/// Seeded subject and background latents `[1, 4, 8, 8]`, the subject on the left half, the
/// background's non-background on the top half.
fn data() -> Result<LayeredLatents> {
    Ok(LayeredLatents {
        subject: seeded_noise(1, &[1, 4, 8, 8], DEV, DType::F32)?,
        subject_mask: half_mask(4, false)?,
        background: seeded_noise(2, &[1, 4, 8, 8], DEV, DType::F32)?,
        background_mask: half_mask(4, true)?,
    })
}

/// Stand-ins for `c(T_o)` and `c(T_b)`: `[1, 77, 32]` (the tiny model's cross-attention width).
fn embeddings() -> Result<(Tensor, Tensor)> {
    Ok((seeded_noise(3, &[1, 77, 32], DEV, DType::F32)?, seeded_noise(4, &[1, 77, 32], DEV, DType::F32)?))
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
}

fn assert_same_bits(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    assert!(bits(a)? == bits(b)?, "{what}: not bit-identical");
    Ok(())
}

fn snapshot(ws: &HashMap<String, Tensor>) -> Result<HashMap<String, Vec<u32>>> {
    ws.iter().map(|(k, v)| Ok((k.clone(), bits(v)?))).collect()
}

fn mean(ls: &[StepLoss]) -> f64 {
    ls.iter().map(|l| l.loss).sum::<f64>() / ls.len() as f64
}

/// A fixed evaluation of a loss function over the draws of steps 1000..1008 (not trained on).
fn held_out(f: &dyn Fn(usize) -> Result<f64>) -> Result<f64> {
    let mut sum = 0.0;
    for k in 1000..1008 {
        sum += f(k)?;
    }
    Ok(sum / 8.0)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// A probe of a UNet: its output for one fixed input.
fn probe(unet: &UNet2DConditionModel, context: &Tensor) -> Result<Tensor> {
    let x = seeded_noise(9, &[1, 4, 8, 8], DEV, DType::F32)?;
    Ok(unet.forward(&x, 321.0, context)?)
}

fn stage2_stream_loss(
    unet: &UNet2DConditionModel,
    e_bar: &Tensor,
    ac: &TrainSchedule,
    d: &LayeredLatents,
    k: usize,
) -> Result<f64> {
    let noisy = noisy_step(ac, d, SEED, 0, k)?;
    scalar(&layered_finetune(unet, e_bar, 2.0, 1.0, &noisy, d)?)
}

#[test]
fn stage1_loss_falls_and_only_the_embeddings_change() -> Result<()> {
    let weights = unet_weights()?;
    let before = snapshot(&weights)?;
    let unet = frozen_unet(&weights)?;
    let (ac, d, (e_o, e_b)) = (alphas_cumprod()?, data()?, embeddings()?);
    let eval = |o: &Tensor, b: &Tensor| {
        held_out(&|k| scalar(&layered_optimization(&unet, o, b, &noisy_step(&ac, &d, SEED, 0, k)?, &d)?))
    };
    let held_before = eval(&e_o, &e_b)?;

    let mut s1 = LayeredOptimization::new(&e_o, &e_b, 5e-2)?;
    let mut seen = Vec::new();
    s1.run(&unet, &ac, &d, SEED, 40, &mut |l| seen.push(l))?;
    assert_eq!(s1.step, 40);
    assert_eq!(seen.len(), 40);
    assert!(seen.iter().enumerate().all(|(i, l)| l.step == i), "steps numbered from 0");
    let (first, last) = (mean(&s1.losses[..5]), mean(&s1.losses[35..]));
    let held_after = eval(s1.object(), s1.background())?;
    eprintln!("stage 1: first 5 {first:.5}, last 5 {last:.5}; held-out {held_before:.5} -> {held_after:.5}");
    assert!(last < first, "stage 1 loss did not fall: {first} -> {last}");
    assert!(held_after < held_before, "stage 1 held-out loss did not fall: {held_before} -> {held_after}");

    // The embeddings moved; the inputs they started from and every UNet weight did not.
    assert!(bits(s1.object())? != bits(&e_o)? && bits(s1.background())? != bits(&e_b)?);
    assert_eq!(bits(&e_o)?, bits(&embeddings()?.0)?);
    assert!(snapshot(&weights)? == before, "stage 1 changed a UNet weight");
    Ok(())
}

#[test]
fn stage1_chunks_and_resume_equal_one_run() -> Result<()> {
    let unet = frozen_unet(&unet_weights()?)?;
    let (ac, d, (e_o, e_b)) = (alphas_cumprod()?, data()?, embeddings()?);
    let mut whole = LayeredOptimization::new(&e_o, &e_b, 1e-2)?;
    whole.run(&unet, &ac, &d, SEED, 6, &mut |_| {})?;

    let mut chunked = LayeredOptimization::new(&e_o, &e_b, 1e-2)?;
    chunked.run(&unet, &ac, &d, SEED, 3, &mut |_| {})?;
    let state = chunked.state();
    let mut resumed = LayeredOptimization::from_state(&state, 1e-2)?;
    chunked.run(&unet, &ac, &d, SEED, 6, &mut |_| {})?;
    resumed.run(&unet, &ac, &d, SEED, 6, &mut |_| {})?;

    for (what, s) in [("chunked", &chunked), ("resumed", &resumed)] {
        assert_eq!(s.step, 6);
        assert_same_bits(&format!("{what} e_o"), s.object(), whole.object())?;
        assert_same_bits(&format!("{what} e_b"), s.background(), whole.background())?;
        let losses: Vec<u64> = s.losses.iter().map(|l| l.loss.to_bits()).collect();
        assert_eq!(losses, whole.losses.iter().map(|l| l.loss.to_bits()).collect::<Vec<_>>(), "{what} losses");
    }
    // Running to a step already reached does nothing.
    chunked.run(&unet, &ac, &d, SEED, 4, &mut |_| panic!("no step expected"))?;
    assert_eq!(chunked.step, 6);
    Ok(())
}

#[test]
fn masks_gate_the_layer_terms() -> Result<()> {
    let unet = frozen_unet(&unet_weights()?)?;
    let (ac, d, (e_o, e_b)) = (alphas_cumprod()?, data()?, embeddings()?);
    let noisy = noisy_step(&ac, &d, SEED, 0, 5)?;
    // d(term)/d(e_o), d(term)/d(e_b) for a draw.
    let grads = |noisy: &layerdiff::method::optimize::NoisyStep| -> Result<(Tensor, Tensor)> {
        let (o, b) = (Var::from_tensor(&e_o)?, Var::from_tensor(&e_b)?);
        let (object, background) = layer_terms(&unet, noisy, &d, o.as_tensor(), b.as_tensor())?;
        let g_o = object.backward()?.get(o.as_tensor()).ok_or("no object gradient")?.clone();
        let g_b = background.backward()?.get(b.as_tensor()).ok_or("no background gradient")?.clone();
        Ok((g_o, g_b))
    };
    let (g_o, g_b) = grads(&noisy)?;

    // The object term's target outside M_s, and the background term's inside M_b, are ignored:
    // replace the noise there by garbage, keep the UNet inputs.
    let garbage = (seeded_noise(77, &[1, 4, 8, 8], DEV, DType::F32)? * 100.0)?;
    let outside_s = d.subject_mask.affine(-1.0, 1.0)?.broadcast_as((1, 4, 8, 8))?;
    let inside_b = d.background_mask.broadcast_as((1, 4, 8, 8))?;
    let mix =
        |keep: &Tensor, replace_where: &Tensor| -> Result<Tensor> { Ok(replace_where.where_cond(&garbage, keep)?) };
    let mut changed = noisy.clone();
    changed.subject_target = mix(&noisy.subject_target, &outside_s.gt(0.5)?)?;
    changed.background_target = mix(&noisy.background_target, &inside_b.gt(0.5)?)?;
    let (g_o2, g_b2) = grads(&changed)?;
    assert_same_bits("object-term gradient after changes outside M_s", &g_o2, &g_o)?;
    assert_same_bits("background-term gradient after changes inside M_b", &g_b2, &g_b)?;

    // And the other way round, they matter.
    let mut inside = noisy.clone();
    inside.subject_target = mix(&noisy.subject_target, &outside_s.lt(0.5)?)?;
    inside.background_target = mix(&noisy.background_target, &inside_b.lt(0.5)?)?;
    let (g_o3, g_b3) = grads(&inside)?;
    assert!(bits(&g_o3)? != bits(&g_o)? && bits(&g_b3)? != bits(&g_b)?);

    // The loss's gradient with respect to the prediction is zero outside the mask.
    let pred = Var::from_tensor(&seeded_noise(5, &[1, 4, 8, 8], DEV, DType::F32)?)?;
    let g = masked_mse(pred.as_tensor(), &noisy.subject_target, &d.subject_mask)?.backward()?;
    let g = g.get(pred.as_tensor()).ok_or("no prediction gradient")?;
    let outside = (g * &outside_s)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let inside = (g * d.subject_mask.broadcast_as((1, 4, 8, 8))?)?.abs()?.min_all()?.to_scalar::<f32>()?;
    assert_eq!(outside, 0.0);
    assert!(inside >= 0.0);
    Ok(())
}

#[test]
fn interpolation_is_eq3() -> Result<()> {
    let (e_o, e_b) = embeddings()?;
    let e = interpolate_embeddings(&e_o, &e_b, 0.7)?;
    let expected = ((&e_o * 0.7)? + (&e_b * 0.3)?)?;
    assert_same_bits("alpha 0.7", &e, &expected)?;
    assert_same_bits("alpha 1", &interpolate_embeddings(&e_o, &e_b, 1.0)?, &e_o)?;
    assert_same_bits("alpha 0", &interpolate_embeddings(&e_o, &e_b, 0.0)?, &e_b)?;
    for bad in [1.5, -0.1, f64::NAN] {
        let err = interpolate_embeddings(&e_o, &e_b, bad).unwrap_err().to_string();
        assert!(err.starts_with("--alpha:") && !err.contains('\n'), "{err}");
    }
    Ok(())
}

/// Trains stage 2 for `steps` from e_bar = interpolation of the stand-in embeddings.
fn stage2(mode: FinetuneMode, lr: f64, steps: usize) -> Result<(LayeredFinetune, Tensor)> {
    stage2_with(mode, lr, steps, false)
}

fn stage2_with(mode: FinetuneMode, lr: f64, steps: usize, checkpointing: bool) -> Result<(LayeredFinetune, Tensor)> {
    let (e_o, e_b) = embeddings()?;
    let e_bar = interpolate_embeddings(&e_o, &e_b, 0.7)?;
    let s2 = LayeredFinetune::new(unet_weights()?, config()?, mode, 4, lr, DType::F32, DEV)?;
    let mut s2 = s2.with_gradient_checkpointing(checkpointing);
    s2.run(&e_bar, 2.0, 1.0, &alphas_cumprod()?, &data()?, SEED, steps, &mut |_| {})?;
    Ok((s2, e_bar))
}

/// Gradient checkpointing takes the same steps as the plain backward, full and LoRA: in f64 the
/// weights' changes after three steps to rounding (the gradients' sums run in another order, and
/// the checkpointed forward runs on detached weights, whose layers may take other kernels). In
/// f32 (the CPU's in-place Adam) Adam's normalized step turns the rounding of near-zero gradients
/// into differences of a few percent of a step on some weights (1.3e-4 against changes of 3e-3):
/// there the losses agree to 1e-5 and the changes to a tenth, which a segment left out or stepped
/// twice would break. In f16 (f32 masters, f16 copies) some steps flip sign: the losses agree to
/// 1e-2 and the changes in total to 2 % (0.4 % here).
#[test]
fn stage2_gradient_checkpointing_takes_the_same_steps() -> Result<()> {
    for (dtype, tol, loss_tol) in [(DType::F64, 1e-9, 1e-12), (DType::F32, 1e-3, 1e-5), (DType::F16, 0.02, 1e-2)] {
        let d = data()?;
        let d = LayeredLatents {
            subject: d.subject.to_dtype(dtype)?,
            subject_mask: d.subject_mask.to_dtype(dtype)?,
            background: d.background.to_dtype(dtype)?,
            background_mask: d.background_mask.to_dtype(dtype)?,
        };
        let (e_o, e_b) = embeddings()?;
        let e_bar = interpolate_embeddings(&e_o, &e_b, 0.7)?.to_dtype(dtype)?;
        for mode in [FinetuneMode::Full, FinetuneMode::Lora] {
            let run = |checkpointing: bool| -> Result<LayeredFinetune> {
                let s2 = LayeredFinetune::new(unet_weights()?, config()?, mode, 4, 1e-3, dtype, DEV)?;
                let mut s2 = s2.with_gradient_checkpointing(checkpointing);
                s2.run(&e_bar, 2.0, 1.0, &alphas_cumprod()?, &d, SEED, 3, &mut |_| {})?;
                Ok(s2)
            };
            let (plain, checkpointed) = (run(false)?, run(true)?);
            // The variables (`var.*`: f32 masters under f16), not the f16 weights, whose rounding
            // would hide the steps.
            let masters = |s: &LayeredFinetune| -> HashMap<String, Tensor> {
                s.state().into_iter().filter(|(k, _)| k.starts_with("var.")).collect()
            };
            let before = masters(&LayeredFinetune::new(unet_weights()?, config()?, mode, 4, 1e-3, dtype, DEV)?);
            let (p, c) = (masters(&plain), masters(&checkpointed));
            let (mut worst, mut largest, mut diff_sum, mut change_sum) = (0f64, 0f64, 0f64, 0f64);
            for (name, w0) in &before {
                let (dp, dc) = ((&p[name] - w0)?.to_dtype(DType::F64)?, (&c[name] - w0)?.to_dtype(DType::F64)?);
                let diff = (&dp - dc)?.abs()?.flatten_all()?;
                let change = dp.abs()?.flatten_all()?;
                worst = worst.max(diff.max(0)?.to_scalar::<f64>()?);
                largest = largest.max(change.max(0)?.to_scalar::<f64>()?);
                diff_sum += diff.sum_all()?.to_scalar::<f64>()?;
                change_sum += change.sum_all()?.to_scalar::<f64>()?;
            }
            eprintln!(
                "{dtype:?} {mode:?}: weight changes differ by {worst:.3e} at most (largest change {largest:.3e}), \
                 {:.3e} of the changes' total",
                diff_sum / change_sum
            );
            // In f16, and now and then in f32, the gradients' rounding flips the sign of a
            // near-zero one, and with it Adam's whole step for that weight (lr, the largest change
            // there is): there the total, not the largest difference, is what a bug would move.
            // f64 holds the largest difference to 1e-9 of the largest change.
            let (err, scale) = if dtype == DType::F64 { (worst, largest) } else { (diff_sum, change_sum) };
            assert!(largest > 0.0 && err <= tol * scale, "{dtype:?} {mode:?}: {err:e} against {scale:e}");
            for (a, b) in plain.losses.iter().zip(&checkpointed.losses) {
                assert!((a.loss - b.loss).abs() <= loss_tol * a.loss.abs(), "{dtype:?} {mode:?} step {}: loss {} vs {}", a.step, a.loss, b.loss);
            }
        }
    }
    Ok(())
}

fn stage2_loss_falls(mode: FinetuneMode, lr: f64) -> Result<()> {
    let weights = unet_weights()?;
    let before = snapshot(&weights)?;
    let (ac, d) = (alphas_cumprod()?, data()?);
    let (e_o, e_b) = embeddings()?;
    let e_bar = interpolate_embeddings(&e_o, &e_b, 0.7)?;
    let e_bar_bits = bits(&e_bar)?;
    let base = frozen_unet(&weights)?;
    let held_before = held_out(&|k| stage2_stream_loss(&base, &e_bar, &ac, &d, k))?;

    let mut s2 = LayeredFinetune::new(weights.clone(), config()?, mode, 4, lr, DType::F32, DEV)?;
    if mode == FinetuneMode::Lora {
        // Step 0: the LoRA model is the base model exactly.
        assert_same_bits("LoRA at step 0", &probe(s2.unet(), &e_bar)?, &probe(&base, &e_bar)?)?;
    }
    s2.run(&e_bar, 2.0, 1.0, &ac, &d, SEED, 30, &mut |_| {})?;
    let (first, last) = (mean(&s2.losses[..5]), mean(&s2.losses[25..]));
    let held_after = held_out(&|k| stage2_stream_loss(s2.unet(), &e_bar, &ac, &d, k))?;
    eprintln!("stage 2 {mode:?}: first 5 {first:.5}, last 5 {last:.5}; held-out {held_before:.5} -> {held_after:.5}");
    assert!(last < first, "stage 2 {mode:?} loss did not fall: {first} -> {last}");
    assert!(held_after < held_before, "stage 2 {mode:?} held-out loss did not fall: {held_before} -> {held_after}");

    // e_bar and the original weights are untouched; the trained tensors moved.
    assert_eq!(bits(&e_bar)?, e_bar_bits, "stage 2 changed e_bar");
    assert!(snapshot(&weights)? == before, "stage 2 changed the original weights");
    let trained = s2.trained_tensors()?;
    match mode {
        FinetuneMode::Full => {
            assert_eq!(trained.len(), weights.len(), "full: every weight is trained");
            let moved = trained.iter().filter(|(k, v)| bits(v).unwrap() != before[*k]).count();
            eprintln!("full: {moved} of {} weights changed", trained.len());
            assert!(moved * 10 >= trained.len() * 9, "full: only {moved} weights changed");
        }
        FinetuneMode::Lora => {
            // 4 projections x 2 tensors x (attn1, attn2) x 5 transformer blocks in the tiny UNet.
            assert!(trained.keys().all(|k| k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight")));
            assert!(trained.keys().all(|k| k.contains(".attn1.") || k.contains(".attn2.")));
            let n_proj = weights
                .keys()
                .filter(|k| {
                    k.contains(".attn")
                        && (k.ends_with("to_q.weight")
                            || k.ends_with("to_out.0.weight")
                            || k.ends_with("to_k.weight")
                            || k.ends_with("to_v.weight"))
                })
                .count();
            assert_eq!(trained.len(), 2 * n_proj);
            let b_moved = trained
                .iter()
                .filter(|(k, v)| {
                    k.ends_with("lora_B.weight")
                        && v.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0
                })
                .count();
            assert_eq!(b_moved, n_proj, "every lora_B trained");
        }
    }
    Ok(())
}

#[test]
fn stage2_full_loss_falls_and_only_unet_weights_change() -> Result<()> {
    stage2_loss_falls(FinetuneMode::Full, 1e-3)
}

#[test]
fn stage2_lora_loss_falls_and_only_adapters_change() -> Result<()> {
    stage2_loss_falls(FinetuneMode::Lora, 3e-2)
}

fn stage2_resume(mode: FinetuneMode, lr: f64, checkpointing: bool) -> Result<()> {
    let (ac, d) = (alphas_cumprod()?, data()?);
    let (whole, e_bar) = stage2_with(mode, lr, 6, checkpointing)?;

    let (mut chunked, _) = stage2_with(mode, lr, 3, checkpointing)?;
    let state = chunked.state();
    let resumed = LayeredFinetune::from_state(unet_weights()?, config()?, mode, 4, lr, DType::F32, DEV, &state)?;
    let mut resumed = resumed.with_gradient_checkpointing(checkpointing);
    chunked.run(&e_bar, 2.0, 1.0, &ac, &d, SEED, 6, &mut |_| {})?;
    resumed.run(&e_bar, 2.0, 1.0, &ac, &d, SEED, 6, &mut |_| {})?;

    let expected = whole.trained_tensors()?;
    for (what, s) in [("chunked", &chunked), ("resumed", &resumed)] {
        assert_eq!(s.step, 6);
        let got = s.trained_tensors()?;
        assert_eq!(got.len(), expected.len());
        for (name, t) in &expected {
            assert_same_bits(&format!("{mode:?} {what} {name}"), &got[name], t)?;
        }
        let losses: Vec<u64> = s.losses.iter().map(|l| l.loss.to_bits()).collect();
        assert_eq!(losses, whole.losses.iter().map(|l| l.loss.to_bits()).collect::<Vec<_>>(), "{what} losses");
    }

    // A session rebuilds the trained model bit for bit.
    let loaded =
        LayeredFinetune::load_trained(unet_weights()?, config()?, mode, 4, &whole.trained_tensors()?, DType::F32, DEV)?;
    assert_same_bits(&format!("{mode:?} load_trained"), &probe(&loaded, &e_bar)?, &probe(whole.unet(), &e_bar)?)?;
    Ok(())
}

#[test]
fn stage2_full_chunks_resume_and_reload_are_bit_exact() -> Result<()> {
    stage2_resume(FinetuneMode::Full, 1e-3, false)
}

#[test]
fn stage2_lora_chunks_resume_and_reload_are_bit_exact() -> Result<()> {
    stage2_resume(FinetuneMode::Lora, 1e-2, false)
}

/// A run with gradient checkpointing is as resumable: chunks and resumes equal one run bit for bit.
#[test]
fn stage2_checkpointed_chunks_resume_and_reload_are_bit_exact() -> Result<()> {
    stage2_resume(FinetuneMode::Full, 1e-3, true)
}

#[test]
fn session_of_another_mode_or_rank_is_refused() -> Result<()> {
    let (s2, _) = stage2(FinetuneMode::Lora, 1e-2, 1)?;
    let trained = s2.trained_tensors()?;
    for (mode, rank) in [(FinetuneMode::Lora, 8), (FinetuneMode::Full, 4)] {
        let err = LayeredFinetune::load_trained(unet_weights()?, config()?, mode, rank, &trained, DType::F32, DEV)
            .err()
            .ok_or("a mismatched session loaded")?
            .to_string();
        assert!(err.starts_with("fine-tuned weights:") && !err.contains('\n'), "{err}");
    }
    Ok(())
}

#[test]
fn divergence_is_a_one_line_error_naming_stage_and_step() -> Result<()> {
    let weights = unet_weights()?;
    let unet = frozen_unet(&weights)?;
    let (ac, (e_o, e_b)) = (alphas_cumprod()?, embeddings()?);

    // Injected NaN data: the first step's loss.
    let mut bad = data()?;
    bad.subject = bad.subject.affine(0.0, f64::NAN)?;
    let mut s1 = LayeredOptimization::new(&e_o, &e_b, 1e-2)?;
    let err = s1.run(&unet, &ac, &bad, SEED, 3, &mut |_| {}).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(
        err.starts_with("stage 1") && err.contains("step 1") && err.contains("--embedding-lr") && !err.contains('\n'),
        "{err}"
    );
    assert_eq!(s1.step, 0, "a failed step is not counted");

    // A huge learning rate.
    let mut s1 = LayeredOptimization::new(&e_o, &e_b, 1e30)?;
    let err = s1.run(&unet, &ac, &data()?, SEED, 20, &mut |_| {}).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(
        err.starts_with("stage 1") && err.contains("step ") && err.contains("--embedding-lr") && !err.contains('\n'),
        "{err}"
    );

    let e_bar = interpolate_embeddings(&e_o, &e_b, 0.7)?;
    let mut s2 = LayeredFinetune::new(weights.clone(), config()?, FinetuneMode::Full, 4, 1e-3, DType::F32, DEV)?;
    let err = s2.run(&e_bar, 2.0, 1.0, &ac, &bad, SEED, 3, &mut |_| {}).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(
        err.starts_with("stage 2") && err.contains("step 1") && err.contains("--finetune-lr") && !err.contains('\n'),
        "{err}"
    );

    let mut s2 = LayeredFinetune::new(weights, config()?, FinetuneMode::Lora, 4, 1e30, DType::F32, DEV)?;
    let err = s2.run(&e_bar, 2.0, 1.0, &ac, &data()?, SEED, 20, &mut |_| {}).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(
        err.starts_with("stage 2") && err.contains("step ") && err.contains("--finetune-lr") && !err.contains('\n'),
        "{err}"
    );
    Ok(())
}

/// Half precision: the variables are f32 master copies, so small updates are not rounded away;
/// resuming and reloading stay bit-exact; what the models and sessions hold is f16.
#[test]
fn half_precision_trains_f32_masters() -> Result<()> {
    let dt = DType::F16;
    let weights: HashMap<String, Tensor> =
        unet_weights()?.into_iter().map(|(k, v)| Ok((k, v.to_dtype(dt)?))).collect::<Result<_>>()?;
    let unet = UNet2DConditionModel::new(VarBuilder::from_tensors(weights.clone(), dt, DEV), config()?)?;
    let ac = alphas_cumprod()?;
    let d0 = data()?;
    let half = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dt)?) };
    let d = LayeredLatents {
        subject: half(&d0.subject)?,
        subject_mask: half(&d0.subject_mask)?,
        background: half(&d0.background)?,
        background_mask: half(&d0.background_mask)?,
    };
    let (e_o, e_b) = embeddings()?;
    let (e_o, e_b) = (half(&e_o)?, half(&e_b)?);

    // Stage 1: a learning rate far below f16's resolution at these values still moves e_o.
    let mut s1 = LayeredOptimization::new(&e_o, &e_b, 1e-5)?;
    s1.run(&unet, &ac, &d, SEED, 2, &mut |_| {})?;
    assert_eq!(s1.object().dtype(), dt);
    let mut resumed = LayeredOptimization::from_state(&s1.state(), 1e-5)?;
    s1.run(&unet, &ac, &d, SEED, 4, &mut |_| {})?;
    resumed.run(&unet, &ac, &d, SEED, 4, &mut |_| {})?;
    assert_same_bits("f16 stage 1 resumed", resumed.object(), s1.object())?;
    let changed = bits(s1.object())?.iter().zip(bits(&e_o)?).filter(|(a, b)| **a != *b).count();
    eprintln!("f16 stage 1, lr 1e-5, 4 steps: {changed} of {} elements of e_o changed", e_o.elem_count());
    assert!(changed > 0, "f16 stage 1 rounded every update away");

    // Stage 2, full and LoRA, at the paper's 2e-6.
    let e_bar = interpolate_embeddings(s1.object(), s1.background(), 0.7)?;
    for mode in [FinetuneMode::Full, FinetuneMode::Lora] {
        let mut s2 = LayeredFinetune::new(weights.clone(), config()?, mode, 4, 2e-6, dt, DEV)?;
        s2.run(&e_bar, 2.0, 1.0, &ac, &d, SEED, 2, &mut |_| {})?;
        let state = s2.state();
        let mut resumed = LayeredFinetune::from_state(weights.clone(), config()?, mode, 4, 2e-6, dt, DEV, &state)?;
        s2.run(&e_bar, 2.0, 1.0, &ac, &d, SEED, 4, &mut |_| {})?;
        resumed.run(&e_bar, 2.0, 1.0, &ac, &d, SEED, 4, &mut |_| {})?;
        let trained = s2.trained_tensors()?;
        assert!(trained.values().all(|t| t.dtype() == dt));
        for (name, t) in &resumed.trained_tensors()? {
            assert_same_bits(&format!("f16 {mode:?} resumed {name}"), t, &trained[name])?;
        }
        if mode == FinetuneMode::Full {
            let moved = trained.iter().filter(|(k, v)| bits(v).unwrap() != bits(&weights[*k]).unwrap()).count();
            eprintln!("f16 full, lr 2e-6: {moved} of {} weights changed", trained.len());
            assert!(moved > 0, "f16 full fine-tuning rounded every update away");
        }
        let loaded = LayeredFinetune::load_trained(weights.clone(), config()?, mode, 4, &trained, dt, DEV)?;
        let x = half(&seeded_noise(9, &[1, 4, 8, 8], DEV, DType::F32)?)?;
        let (a, b) = (loaded.forward(&x, 321.0, &e_bar)?, s2.unet().forward(&x, 321.0, &e_bar)?);
        assert_same_bits(&format!("f16 {mode:?} load_trained"), &a, &b)?;
        assert!(
            bits(&b)? != bits(&unet.forward(&x, 321.0, &e_bar)?)?,
            "f16 {mode:?}: the sampling model did not change"
        );
    }
    Ok(())
}
