//! The GPU's path through the models with our CUDA kernels (on by default; `LAYERDIFF_FUSED=0` off), run on the
//! CPU: `cuda_kernels::emulate_on_cpu` sends CPU tensors down that path, each kernel computed by
//! candle's ops instead (what `src/models/cuda_kernels.rs`'s own tests hold the kernels' source
//! to), the CPU's own kernels aside. So everything around the kernels (shapes, layouts, which
//! kernel where, the backward rules of the bias adds, transposes, group norm with SiLU and the
//! attention's folded scale, convolutions as one product per image, strided convolutions'
//! input gradients spread out) is held to diffusers' forward and PyTorch's gradients without a
//! GPU, and a whole edit through it to the CPU's own path. All of it runs again with cuDNN's
//! convolutions emulated too (`cudnn_conv::emulate_on_cpu`), as a `cudnn` build's GPU path runs
//! them. The emulation is process-wide, so this binary holds this one test.

#[path = "common/tiny.rs"]
mod tiny;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use layerdiff::method::edit::edit;
use layerdiff::method::{EditSettings, FinetuneMode};
use layerdiff::models::{cuda_kernels, cudnn_conv};
use layerdiff::models::unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
use layerdiff::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn load(rel: &str) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(fixture(rel), &Device::Cpu)?)
}

fn config(rel: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(fixture(rel))?)?)
}

/// `max |ours - theirs| / max |theirs|`.
fn rel_err(ours: &Tensor, theirs: &Tensor) -> Result<f32> {
    assert_eq!(ours.dims(), theirs.dims(), "shape mismatch");
    let (ours, theirs) = (ours.to_dtype(DType::F32)?, theirs.to_dtype(DType::F32)?);
    let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / theirs.abs()?.max_all()?.to_scalar::<f32>()?)
}

fn check(what: &str, ours: &Tensor, theirs: &Tensor, tol: f32) -> Result<()> {
    let err = rel_err(ours, theirs)?;
    eprintln!("{what}: relative error {err:.3e}");
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
    Ok(())
}

/// The tiny UNet in `dtype`, its weights frozen or each a variable (returned by name).
fn unet(dtype: DType, trainable: bool) -> Result<(UNet2DConditionModel, Vec<(String, Var)>)> {
    let cfg = UNet2DConditionModelConfig::from_json(&config("tiny-sd/unet/config.json")?)?;
    let weights = load("tiny-sd/unet/diffusion_pytorch_model.safetensors")?;
    if !trainable {
        let weights = weights.into_iter().map(|(k, v)| Ok((k, v.to_dtype(dtype)?))).collect::<Result<_>>()?;
        return Ok((UNet2DConditionModel::new(VarBuilder::from_tensors(weights, dtype, &Device::Cpu), cfg)?, Vec::new()));
    }
    let vars: Vec<(String, Var)> = weights.into_iter().map(|(k, v)| Ok((k, Var::from_tensor(&v)?))).collect::<Result<_>>()?;
    let tensors = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    Ok((UNet2DConditionModel::new(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), cfg)?, vars))
}

/// Turns the emulation of the GPU's path on (with cuDNN's convolutions if `cudnn`) or off.
fn emulate(on: bool, cudnn: bool) {
    cuda_kernels::emulate_on_cpu(on);
    cudnn_conv::emulate_on_cpu(on && cudnn);
    assert_eq!(cuda_kernels::ready(&Device::Cpu), on);
    assert_eq!(cudnn_conv::ready(&Device::Cpu), on && cudnn);
}

/// The README's toy edit, short, in `mode`, with the emulation `on` (with cuDNN's convolutions if
/// `cudnn`) or off: stage 1's and stage 2's losses and the images.
fn toy_edit(mode: FinetuneMode, on: bool, cudnn: bool) -> Result<(Vec<f64>, Vec<Vec<u8>>)> {
    emulate(on, cudnn);
    let (files, mut sd) = tiny::load_toy();
    let settings = EditSettings { embedding_steps: 6, embedding_lr: 1e-2, finetune_steps: 4, finetune_lr: 1e-4, finetune: mode, steps: 4, ..Default::default() };
    let dir = tempfile::tempdir()?;
    let result = edit(&mut sd, &files, &tiny::toy_request(settings), dir.path(), false, &mut tiny::Recorder::new(None))?;
    let losses = result.info.losses.stage1.iter().chain(&result.info.losses.stage2).map(|l| l.loss).collect();
    Ok((losses, result.images.into_iter().map(|(_, image)| image.into_raw()).collect()))
}

#[test]
fn the_gpu_paths_match_the_cpus_diffusers_and_pytorch() -> Result<()> {
    // The CPU's own path, the reference of both runs: LoRA's and full fine-tuning's edits.
    let cpu = [FinetuneMode::Lora, FinetuneMode::Full].map(|mode| toy_edit(mode, false, false).map(|edit| (mode, edit)));
    let cpu = cpu.into_iter().collect::<Result<Vec<_>>>()?;
    gpu_path_matches(&cpu, false)?;
    every_kernel_ran("the fused kernels' runs")?;
    let im2col = |calls: Vec<(&str, usize)>| calls.iter().find(|(name, _)| *name == "im2col_per_image").map_or(0, |c| c.1);
    let im2col_before = im2col(cuda_kernels::emulated_calls());
    gpu_path_matches(&cpu, true)?;
    // cuDNN took every convolution that im2col took (plain 1x1 ones are products either way),
    // and each of its passes ran: forward, input gradient, kernel gradient.
    let cudnn = cudnn_conv::emulated_calls();
    eprintln!("emulated cuDNN calls: {cudnn:?}");
    assert_eq!(im2col(cuda_kernels::emulated_calls()), im2col_before);
    assert!(cudnn.iter().all(|&n| n > 0), "{cudnn:?}");
    Ok(())
}

/// A toy edit's losses and images, by fine-tuning mode.
type Edits = [(FinetuneMode, (Vec<f64>, Vec<Vec<u8>>))];

/// The GPU's path, with the fused kernels and, if `cudnn`, cuDNN's convolutions, against the
/// CPU's own path (its edits `cpu`), diffusers' forwards and PyTorch's gradients.
fn gpu_path_matches(cpu: &Edits, cudnn: bool) -> Result<()> {
    // 1. A whole edit (stage 1, LoRA's and full fine-tuning's stage 2, sampling, the VAE) equals
    //    the CPU's own path: the same losses to rounding, the same images to a level.
    for (mode, (cpu_losses, cpu_images)) in cpu {
        let (losses, images) = toy_edit(*mode, true, cudnn)?;
        let loss_err = losses.iter().zip(cpu_losses).map(|(a, b)| (a - b).abs() / b.abs()).fold(0f64, f64::max);
        let pixel_err = images.iter().flatten().zip(cpu_images.iter().flatten()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        eprintln!("toy edit, {mode:?}, cuDNN {cudnn}: losses' largest relative difference {loss_err:.3e}, pixels' {pixel_err}");
        assert_eq!(losses.len(), cpu_losses.len());
        assert!(loss_err <= 1e-5, "{mode:?}: losses differ by {loss_err:e}");
        assert!(pixel_err <= 1, "{mode:?}: pixels differ by {pixel_err}");
    }
    emulate(true, cudnn);

    // 2. Forwards against diffusers' (tests/models_parity.rs's fixtures and tolerance, relative).
    let (frozen, _) = unet(DType::F32, false)?;
    let fx = load("unet.safetensors")?;
    for case in ["a", "b"] {
        let t = fx[&format!("{case}.timestep")].to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let out = frozen.forward(&fx[&format!("{case}.sample")], t, &fx[&format!("{case}.context")])?;
        check(&format!("unet case {case}, cuDNN {cudnn}"), &out, &fx[&format!("{case}.out")], 1e-4)?;
    }
    let vae_cfg = AutoencoderKLConfig::from_json(&config("tiny-sd/vae/config.json")?)?;
    let vae_weights = load("tiny-sd/vae/diffusion_pytorch_model.safetensors")?;
    let vae = AutoencoderKL::new(VarBuilder::from_tensors(vae_weights, DType::F32, &Device::Cpu), vae_cfg)?;
    let fx = load("vae.safetensors")?;
    check("vae encode mean", vae.encode(&fx["image"])?.mean(), &fx["mean"], 1e-4)?;
    check("vae decode", &vae.decode(&fx["latents"])?, &fx["decoded"], 1e-4)?;

    // 3. Gradients against PyTorch's (tests/gradients.rs's fixture, f32 tolerances): the
    //    context's through frozen weights (stage 1), also in bf16 as the GPU runs it (to bf16's
    //    precision, as the device check's), and every weight's when all train.
    let fx = load("grads.safetensors")?;
    let timestep = fx["timestep"].to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let backward = |unet: &UNet2DConditionModel, context: &Var| -> Result<candle_core::backprop::GradStore> {
        let dtype = context.dtype();
        let out = unet.forward(&fx["sample"].to_dtype(dtype)?, timestep, context.as_tensor())?;
        Ok((out.to_dtype(DType::F32)? - fx["noise"].to_dtype(DType::F32)?)?.sqr()?.mean_all()?.backward()?)
    };
    let context = Var::from_tensor(&fx["context"].to_dtype(DType::F32)?)?;
    let grads = backward(&frozen, &context)?;
    check("frozen: grad.context", grads.get(context.as_tensor()).ok_or("no context gradient")?, &fx["grad.context"], 1e-3)?;
    let context_bf16 = Var::from_tensor(&fx["context"].to_dtype(DType::BF16)?)?;
    let grads = backward(&unet(DType::BF16, false)?.0, &context_bf16)?;
    let grad = grads.get(context_bf16.as_tensor()).ok_or("no context gradient")?;
    // bf16 keeps 8 bits through some hundred ops each way: the CPU's own bf16 path is 4.4e-2
    // off here, this one 5.0e-2 to 5.3e-2 (its attention in bf16, as the GPU runs it); a wrong
    // layout or formula is off by the gradient's size.
    check("frozen, bf16: grad.context", grad, &fx["grad.context"], 1e-1)?;
    let (trainable, vars) = unet(DType::F32, true)?;
    let grads = backward(&trainable, &context)?;
    check("trainable: grad.context", grads.get(context.as_tensor()).ok_or("no context gradient")?, &fx["grad.context"], 1e-3)?;
    let mut worst = (0f32, String::new());
    for (name, var) in &vars {
        let ours = grads.get(var.as_tensor()).ok_or(format!("{name}: no gradient"))?;
        let err = rel_err(ours, &fx[&format!("grad.{name}")])?;
        assert!(err <= 1e-3, "grad.{name}: relative error {err:e}");
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    eprintln!("trainable: {} weights' gradients, worst relative error {:.3e} ({})", vars.len(), worst.0, worst.1);

    // 4. The attention alone in bf16, through the fused attention's forward and backward (the
    //    UNet's heads are 8 and 16 wide; these are SD's 40 and 80), against candle's autograd
    //    through the composed formula in f32 on the same values.
    for (n, seq_q, seq_k, d) in [(4, 70, 100, 40), (2, 30, 77, 80)] {
        let randn = |seq: usize| Tensor::randn(0f32, 1.0, (n, seq, d), &Device::Cpu)?.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let (q, k, v, g) = (randn(seq_q)?, randn(seq_k)?, randn(seq_k)?, randn(seq_q)?);
        let scale = 1.0 / (d as f64).sqrt();
        let gradients = |dtype: DType, fused: bool| -> Result<Vec<Tensor>> {
            let vars = [&q, &k, &v].iter().map(|t| Var::from_tensor(&t.to_dtype(dtype)?)).collect::<candle_core::Result<Vec<_>>>()?;
            let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor());
            let out = match fused {
                true => layerdiff::models::nn::attention(q, k, v, scale, None)?,
                false => {
                    let s = (q.matmul(&k.t()?)? * scale)?;
                    let e = s.broadcast_sub(&s.max_keepdim(2)?)?.exp()?;
                    e.broadcast_div(&e.sum_keepdim(2)?)?.matmul(v)?
                }
            };
            let grads = (out.to_dtype(DType::F32)? * &g)?.sum_all()?.backward()?;
            let mut all = vec![out.to_dtype(DType::F32)?];
            for var in &vars {
                all.push(grads.get(var.as_tensor()).ok_or("no gradient")?.to_dtype(DType::F32)?);
            }
            Ok(all)
        };
        let calls = |name: &str| cuda_kernels::emulated_calls().iter().find(|(n, _)| *n == name).map_or(0, |c| c.1);
        let before = calls("flash_attention_backward");
        let (ours, reference) = (gradients(DType::BF16, true)?, gradients(DType::F32, false)?);
        assert_eq!(calls("flash_attention_backward"), before + 1, "the fused attention's backward did not run");
        for ((ours, reference), what) in ours.iter().zip(&reference).zip(["out", "dq", "dk", "dv"]) {
            // bf16's rounding of the output and the gradients, the sums in f32.
            check(&format!("attention {:?}: {what}", (n, seq_q, seq_k, d)), ours, reference, 1e-2)?;
        }
    }
    Ok(())
}

/// Each of the kernels ran emulated (since the process started; `what` names the runs).
fn every_kernel_ran(what: &str) -> Result<()> {
    let calls = cuda_kernels::emulated_calls();
    eprintln!("emulated kernel calls, {what}: {calls:?}");
    for kernel in [
        "softmax_rows",
        "softmax_input_grad",
        "norm_input_grad",
        "norm_param_grads",
        "group_norm_rows",
        "add_bias",
        "silu_input_grad",
        "geglu",
        "geglu_input_grad",
        "swap_axes",
        "im2col_per_image",
        "flash_attention",
        "flash_attention_backward",
    ] {
        assert!(calls.iter().any(|(name, n)| *name == kernel && *n > 0), "{what}: {kernel} never ran: {calls:?}");
    }
    Ok(())
}
