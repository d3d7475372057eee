//! Gradients through the UNet: parity with PyTorch (diffusers 0.42.1, fixture `grads.safetensors`,
//! computed in f64), the frozen-weight path, finite differences, and one optimizer step.
//!
//! Loss everywhere: `mean((unet(sample, t, context) - noise)^2)`, as the fixture's.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use layerdiff::models::checkpoint::Tape;
use layerdiff::models::unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn config() -> Result<UNet2DConditionModelConfig> {
    let json = serde_json::from_str(&std::fs::read_to_string(fixture("tiny-sd/unet/config.json"))?)?;
    Ok(UNet2DConditionModelConfig::from_json(&json)?)
}

/// The UNet's weights by checkpoint name, in `dtype`.
fn unet_weights(dtype: DType) -> Result<HashMap<String, Tensor>> {
    let ws = candle_core::safetensors::load(fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors"), &Device::Cpu)?;
    Ok(ws.into_iter().map(|(k, v)| Ok((k, v.to_dtype(dtype)?))).collect::<candle_core::Result<_>>()?)
}

/// The gradient fixture, every tensor in `dtype`.
struct Fixture {
    sample: Tensor,
    timestep: f64,
    context: Tensor,
    noise: Tensor,
    loss: f64,
    grads: HashMap<String, Tensor>,
}

fn grads_fixture(dtype: DType) -> Result<Fixture> {
    let fx = candle_core::safetensors::load(fixture("grads.safetensors"), &Device::Cpu)?;
    let get = |k: &str| -> Result<Tensor> { Ok(fx.get(k).ok_or(format!("fixture lacks {k}"))?.to_dtype(dtype)?) };
    let grads = fx
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("grad.")?.to_string(), v.to_dtype(DType::F64).ok()?)))
        .collect();
    Ok(Fixture {
        sample: get("sample")?,
        timestep: fx["timestep"].to_dtype(DType::F64)?.to_scalar::<f64>()?,
        context: get("context")?,
        noise: get("noise")?,
        loss: fx["loss"].to_dtype(DType::F64)?.to_scalar::<f64>()?,
        grads,
    })
}

fn loss(unet: &UNet2DConditionModel, fx: &Fixture, context: &Tensor) -> Result<Tensor> {
    let out = unet.forward(&fx.sample, fx.timestep, context)?;
    Ok((out - &fx.noise)?.sqr()?.mean_all()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// `max |ours - torch| / max |torch|`.
fn rel_err(ours: &Tensor, torch: &Tensor) -> Result<f64> {
    assert_eq!(ours.dims(), torch.dims());
    let ours = ours.to_dtype(DType::F64)?;
    let diff = scalar(&(&ours - torch)?.abs()?.max_all()?)?;
    let scale = scalar(&torch.abs()?.max_all()?)?;
    Ok(diff / scale)
}

/// A UNet whose every weight is a `Var` (all gradients computed), with the vars by name.
fn trainable_unet(dtype: DType) -> Result<(UNet2DConditionModel, VarMap)> {
    let weights = unet_weights(dtype)?;
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().map_err(|_| "poisoned lock")?;
        for (name, w) in &weights {
            data.insert(name.clone(), Var::from_tensor(w)?);
        }
    }
    let unet = UNet2DConditionModel::new(VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu), config()?)?;
    // A missing name would have been created as a fresh variable.
    assert_eq!(varmap.all_vars().len(), weights.len(), "the UNet asked for weights not in the checkpoint");
    Ok((unet, varmap))
}

/// Backprop of the fixture's loss with every weight trainable: (loss, context var, grads, vars by name).
fn trainable_backward(dtype: DType) -> Result<(f64, Var, GradStore, HashMap<String, Var>)> {
    let fx = grads_fixture(dtype)?;
    let (unet, varmap) = trainable_unet(dtype)?;
    let context = Var::from_tensor(&fx.context)?;
    let loss = loss(&unet, &fx, context.as_tensor())?;
    let grads = loss.backward()?;
    let vars = varmap.data().lock().map_err(|_| "poisoned lock")?.clone();
    Ok((scalar(&loss)?, context, grads, vars))
}

/// (a) With every weight a `Var`: the loss, the context gradient and every parameter gradient
/// match PyTorch's; `tol` bounds the relative errors.
fn check_parity_with_torch(dtype: DType, loss_tol: f64, context_tol: f64, param_tol: f64) -> Result<()> {
    let fx = grads_fixture(DType::F64)?;
    let (loss, context, grads, vars) = trainable_backward(dtype)?;
    let loss_err = (loss - fx.loss).abs() / fx.loss.abs();
    eprintln!("{dtype:?}: loss {loss:.12} vs torch {:.12} (relative error {loss_err:.3e})", fx.loss);
    assert!(loss_err <= loss_tol, "loss relative error {loss_err:e}");

    let grad_context = grads.get(context.as_tensor()).ok_or("no gradient for the context")?;
    let context_err = rel_err(grad_context, &fx.grads["context"])?;
    eprintln!("{dtype:?}: grad.context relative error {context_err:.3e}");
    assert!(context_err <= context_tol, "grad.context relative error {context_err:e}");

    let mut worst = (0f64, String::new());
    for (name, var) in &vars {
        let torch = fx.grads.get(name).ok_or(format!("fixture has no grad.{name}"))?;
        let ours = grads.get(var.as_tensor()).ok_or(format!("{name} received no gradient"))?;
        assert!(scalar(&ours.abs()?.max_all()?)? > 0., "{name}: zero gradient");
        let err = rel_err(ours, torch)?;
        assert!(err <= param_tol, "grad.{name}: relative error {err:e}");
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    assert_eq!(vars.len() + 1, fx.grads.len(), "parameters and fixture gradients differ in number");
    eprintln!("{dtype:?}: {} parameter gradients, worst relative error {:.3e} ({})", vars.len(), worst.0, worst.1);
    Ok(())
}

#[test]
fn all_gradients_match_torch_f64() -> Result<()> {
    // The sinusoidal timestep features are f32 in both (as diffusers), so f64 agrees to ~1e-9, not
    // 1e-15; parameter gradients are stored as f32 in the fixture (6e-8 relative rounding).
    check_parity_with_torch(DType::F64, 1e-8, 1e-6, 1e-3)
}

#[test]
fn all_gradients_match_torch_f32() -> Result<()> {
    check_parity_with_torch(DType::F32, 1e-5, 1e-3, 1e-3)
}

/// The backward a segment at a time ([`Tape`]), its graphs kept or (gradient checkpointing)
/// recomputed: every weight's gradient and the context's equal the plain backward's (f64, so only
/// the order of sums differs), each weight's from exactly one segment, and the output equals the
/// plain forward's bit for bit.
#[test]
fn segmented_gradients_equal_the_plain_backward() -> Result<()> {
    let fx = grads_fixture(DType::F64)?;
    let (_, context, plain, vars) = trainable_backward(DType::F64)?;
    // Both on the same variables: the trainable model as they are, the frozen one detached.
    let model = |detach: bool| -> Result<UNet2DConditionModel> {
        let tensors = vars.iter().map(|(k, v)| (k.clone(), if detach { v.as_tensor().detach() } else { v.as_tensor().clone() }));
        Ok(UNet2DConditionModel::new(VarBuilder::from_tensors(tensors.collect(), DType::F64, &Device::Cpu), config()?)?)
    };
    let (trainable, frozen) = (model(false)?, model(true)?);
    let plain_out = trainable.forward(&fx.sample, fx.timestep, &fx.context)?;
    let by_id: HashMap<_, _> = vars.iter().map(|(name, v)| (v.as_tensor().id(), name.clone())).collect();

    for (what, mut tape) in [("kept", Tape::keeping(&trainable)), ("checkpointed", Tape::checkpointed(&frozen, &trainable))] {
        let timesteps = Tensor::full(fx.timestep as f32, fx.sample.dim(0)?, &Device::Cpu)?;
        let (sample, t, ctx) = (tape.input(&fx.sample, false), tape.input(&timesteps, false), tape.input(&fx.context, true));
        let out = trainable.forward_segments(&mut tape, sample, t, ctx)?;
        assert_eq!(tape.value(out).flatten_all()?.to_vec1::<f64>()?, plain_out.flatten_all()?.to_vec1::<f64>()?, "{what}");

        let pred = Var::from_tensor(tape.value(out))?;
        let loss = (pred.as_tensor() - &fx.noise)?.sqr()?.mean_all()?;
        let g = loss.backward()?.get(pred.as_tensor()).ok_or("no gradient for the prediction")?.clone();
        let mut got: HashMap<String, Tensor> = HashMap::new();
        let ctx_grad = tape.backward(vec![(out, g)], |store| {
            for id in store.get_ids() {
                if let Some(name) = by_id.get(id) {
                    let grad = store.get_id(*id).expect("listed").clone();
                    assert!(got.insert(name.clone(), grad).is_none(), "{what} {name}: a gradient from two segments");
                }
            }
            Ok::<_, candle_core::Error>(())
        })?;
        assert_eq!(got.len(), vars.len(), "{what}: some weights got no gradient");
        for (name, var) in &vars {
            let want = plain.get(var.as_tensor()).ok_or(format!("{name}: no plain gradient"))?;
            let err = rel_err(&got[name], want)?;
            assert!(err <= 1e-12, "{what} grad.{name}: relative error {err:e} against the plain backward");
        }
        let [(_, Some(ctx_grad))] = &ctx_grad[..] else { return Err(format!("{what}: no context gradient").into()) };
        let err = rel_err(ctx_grad, plain.get(context.as_tensor()).ok_or("no plain context gradient")?)?;
        assert!(err <= 1e-12, "{what} grad.context: relative error {err:e}");
    }
    Ok(())
}

/// (b) Frozen weights (plain tensors), context a `Var`: the context gradient matches PyTorch's and
/// no weight gets a gradient.
#[test]
fn frozen_weights_give_context_gradient_only() -> Result<()> {
    let fx = grads_fixture(DType::F64)?;
    let weights = unet_weights(DType::F64)?;
    let unet =
        UNet2DConditionModel::new(VarBuilder::from_tensors(weights.clone(), DType::F64, &Device::Cpu), config()?)?;
    let context = Var::from_tensor(&fx.context)?;
    let grads = loss(&unet, &fx, context.as_tensor())?.backward()?;
    let grad_context = grads.get(context.as_tensor()).ok_or("no gradient for the context")?;
    let err = rel_err(grad_context, &fx.grads["context"])?;
    eprintln!("frozen f64: grad.context relative error {err:.3e}");
    assert!(err <= 1e-6, "grad.context relative error {err:e}");
    for (name, w) in &weights {
        assert!(grads.get(w).is_none(), "frozen weight {name} got a gradient");
    }
    Ok(())
}

/// A small deterministic generator for picking elements.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// `t` with `delta` added at flat index `i`.
fn perturbed(t: &Tensor, i: usize, delta: f64) -> Result<Tensor> {
    let mut v = t.flatten_all()?.to_vec1::<f64>()?;
    v[i] += delta;
    Ok(Tensor::from_vec(v, t.shape(), t.device())?)
}

fn flat(t: &Tensor, i: usize) -> Result<f64> {
    Ok(t.flatten_all()?.get(i)?.to_scalar::<f64>()?)
}

/// Backprop and central differences (h = 1e-5, f64) agree: |a - n| <= 1e-5 |n| + 3e-10 (the
/// differences' own error, truncation and rounding, is about 1e-10 here).
fn assert_close(what: &str, analytic: f64, numeric: f64) {
    let err = (analytic - numeric).abs();
    eprintln!("{what}: backprop {analytic:+.10e}, finite difference {numeric:+.10e}, |diff| {err:.2e}");
    assert!(err <= 1e-5 * numeric.abs() + 3e-10, "{what}: backprop {analytic:e} vs finite difference {numeric:e}");
}

/// (c) Finite differences in f64 for context elements and for elements of several kinds of weight.
#[test]
fn gradients_match_finite_differences() -> Result<()> {
    const H: f64 = 1e-5;
    let fx = grads_fixture(DType::F64)?;
    let (_, context, grads, vars) = trainable_backward(DType::F64)?;
    let weights = unet_weights(DType::F64)?;
    let cfg = config()?;
    let build = |weights: HashMap<String, Tensor>| -> Result<UNet2DConditionModel> {
        Ok(UNet2DConditionModel::new(VarBuilder::from_tensors(weights, DType::F64, &Device::Cpu), cfg.clone())?)
    };
    let mut rng = Lcg(7);

    // Context elements, through the frozen-weight model.
    let unet = build(weights.clone())?;
    let grad_context = grads.get(context.as_tensor()).ok_or("no context gradient")?;
    let n = fx.context.elem_count();
    for _ in 0..10 {
        let i = rng.below(n);
        let plus = scalar(&loss(&unet, &fx, &perturbed(&fx.context, i, H)?)?)?;
        let minus = scalar(&loss(&unet, &fx, &perturbed(&fx.context, i, -H)?)?)?;
        assert_close(&format!("d loss / d context[{i}]"), flat(grad_context, i)?, (plus - minus) / (2. * H));
    }

    // Weights: the element with the largest gradient and a random one, for each kind.
    let tb = "down_blocks.0.attentions.0.transformer_blocks.0";
    let names = [
        format!("{tb}.attn1.to_q.weight"),
        format!("{tb}.attn1.to_k.weight"),
        format!("{tb}.attn2.to_k.weight"),
        format!("{tb}.norm1.weight"),
        format!("{tb}.ff.net.0.proj.weight"),
        "conv_in.weight".to_string(),
        "down_blocks.1.resnets.0.conv1.weight".to_string(),
        "time_embedding.linear_1.weight".to_string(),
        "down_blocks.0.attentions.0.proj_in.weight".to_string(),
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v.weight".to_string(),
    ];
    for name in &names {
        let w = weights.get(name).ok_or(format!("no weight {name}"))?;
        let g = grads.get(vars[name].as_tensor()).ok_or(format!("no gradient for {name}"))?;
        let largest = g.abs()?.flatten_all()?.argmax(0)?.to_scalar::<u32>()? as usize;
        for i in [largest, rng.below(w.elem_count())] {
            let at = |delta: f64| -> Result<f64> {
                let mut ws = weights.clone();
                ws.insert(name.clone(), perturbed(w, i, delta)?);
                scalar(&loss(&build(ws)?, &fx, &fx.context)?)
            };
            let numeric = (at(H)? - at(-H)?) / (2. * H);
            assert_close(&format!("d loss / d {name}[{i}]"), flat(g, i)?, numeric);
        }
    }
    Ok(())
}

/// Odd latent sizes (9x7: skips of 5x4 and 3x2, upsampling by non-integer factors) backprop too,
/// and the context gradient agrees with finite differences.
#[test]
fn odd_sizes_backprop() -> Result<()> {
    const H: f64 = 1e-5;
    let fx = grads_fixture(DType::F64)?;
    let unet = UNet2DConditionModel::new(
        VarBuilder::from_tensors(unet_weights(DType::F64)?, DType::F64, &Device::Cpu),
        config()?,
    )?;
    let mut rng = Lcg(11);
    let mut uniform = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.below(2001) as f64 / 1000. - 1.).collect() };
    let sample = Tensor::from_vec(uniform(4 * 9 * 7), (1, 4, 9, 7), &Device::Cpu)?;
    let noise = Tensor::from_vec(uniform(4 * 9 * 7), (1, 4, 9, 7), &Device::Cpu)?;
    let fx = Fixture { sample, noise, ..fx };
    let context = Var::from_tensor(&fx.context)?;
    let grads = loss(&unet, &fx, context.as_tensor())?.backward()?;
    let grad_context = grads.get(context.as_tensor()).ok_or("no context gradient")?;
    let mut rng = Lcg(13);
    for _ in 0..3 {
        let i = rng.below(fx.context.elem_count());
        let plus = scalar(&loss(&unet, &fx, &perturbed(&fx.context, i, H)?)?)?;
        let minus = scalar(&loss(&unet, &fx, &perturbed(&fx.context, i, -H)?)?)?;
        assert_close(&format!("9x7: d loss / d context[{i}]"), flat(grad_context, i)?, (plus - minus) / (2. * H));
    }
    Ok(())
}

/// (d) One AdamW step (lr 1e-3) on all UNet weights lowers the loss on the same batch.
#[test]
fn adamw_step_lowers_the_loss() -> Result<()> {
    let fx = grads_fixture(DType::F32)?;
    let (unet, varmap) = trainable_unet(DType::F32)?;
    let before = loss(&unet, &fx, &fx.context)?;
    let params = candle_nn::ParamsAdamW { lr: 1e-3, ..Default::default() };
    let mut opt = candle_nn::AdamW::new(varmap.all_vars(), params)?;
    opt.backward_step(&before)?;
    let after = scalar(&loss(&unet, &fx, &fx.context)?)?;
    let before = scalar(&before)?;
    eprintln!("AdamW step: loss {before:.6} -> {after:.6}");
    assert!(after < before, "loss did not decrease: {before} -> {after}");
    Ok(())
}

/// candle-core is our patched copy (`vendor/`): the backward stores the first gradient to reach a
/// tensor as it is, rather than adding it to a fresh tensor of zeros. Both operands of an add then
/// hold the add's own gradient, one tensor; the stock backward gives each a sum of its own. A
/// second gradient reaching a tensor is still added.
#[test]
fn the_backward_stores_a_first_gradient_without_adding_it_to_zeros() -> Result<()> {
    let (x, y) = (Var::new(&[1f64, 2.0], &Device::Cpu)?, Var::new(&[3f64, 4.0], &Device::Cpu)?);
    let sum = (x.as_tensor() + y.as_tensor())?;
    let grads = (&sum * &sum)?.sum_all()?.backward()?;
    let (gx, gy) = (grads.get(x.as_tensor()).ok_or("no x gradient")?, grads.get(y.as_tensor()).ok_or("no y gradient")?);
    assert_eq!(gx.id(), gy.id(), "the two operands of the add got separate gradient tensors");
    assert_eq!(gx.to_vec1::<f64>()?, vec![8.0, 12.0]);
    // x reaches the loss twice (x * x + x): its gradient is the sum of both, 2x + 1.
    let grads = ((x.as_tensor() * x.as_tensor())? + x.as_tensor())?.sum_all()?.backward()?;
    assert_eq!(grads.get(x.as_tensor()).ok_or("no x gradient")?.to_vec1::<f64>()?, vec![3.0, 5.0]);
    Ok(())
}
