//! Forward parity of the UNet, VAE and CLIP text encoder with diffusers 0.42.1 / transformers 5.23.0
//! (fixtures from `tools/make_fixtures.py`, tiny random-weight models), in f32; on the CPU, or on
//! the GPU with `LAYERDIFF_TEST_DEVICE=cuda`; there also the UNet's gradients against the CPU's.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use layerdiff::models::clip_text::{ClipTextConfig, ClipTextTransformer};
use layerdiff::models::unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
use layerdiff::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const TOL: f32 = 1e-4;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn read_json(rel: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(fixture(rel))?)?)
}

/// The CPU, or the GPU with `LAYERDIFF_TEST_DEVICE=cuda` (a `cuda` build: scripts/gpu-check.sh).
/// The device's settings come from the environment as the binary's do (`configure_cuda`).
fn device() -> Result<Device> {
    let device = match std::env::var("LAYERDIFF_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0)?,
        Ok("cpu") | Err(_) => Device::Cpu,
        Ok(other) => return Err(format!("LAYERDIFF_TEST_DEVICE={other}: use cpu or cuda").into()),
    };
    layerdiff::pipeline::configure_cuda(&device);
    Ok(device)
}

fn tensors(rel: &str) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(fixture(rel), &device()?)?)
}

fn weights(rel: &str, dtype: DType) -> Result<VarBuilder<'static>> {
    // SAFETY: the fixture files are not modified while the tests run.
    Ok(unsafe { VarBuilder::from_mmaped_safetensors(&[fixture(rel)], dtype, &device()?)? })
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

fn check(component: &str, ours: &Tensor, theirs: &Tensor) -> Result<f32> {
    let err = max_abs_diff(ours, theirs)?;
    eprintln!("{component}: max abs error {err:.3e}");
    assert!(err <= TOL, "{component}: max abs error {err:e} > {TOL:e}");
    Ok(err)
}

fn unet(slice_size: Option<usize>) -> Result<UNet2DConditionModel> {
    let mut cfg = UNet2DConditionModelConfig::from_json(&read_json("tiny-sd/unet/config.json")?)?;
    cfg.attention_slice_size = slice_size;
    let vb = weights("tiny-sd/unet/diffusion_pytorch_model.safetensors", DType::F32)?;
    Ok(UNet2DConditionModel::new(vb, cfg)?)
}

#[test]
fn unet_matches_diffusers() -> Result<()> {
    let unet = unet(None)?;
    let fx = tensors("unet.safetensors")?;
    for case in ["a", "b"] {
        let t = fx[&format!("{case}.timestep")].to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let out = unet.forward(&fx[&format!("{case}.sample")], t, &fx[&format!("{case}.context")])?;
        check(&format!("unet case {case} (t = {t})"), &out, &fx[&format!("{case}.out")])?;
    }
    Ok(())
}

#[test]
fn unet_sliced_attention_matches_unsliced() -> Result<()> {
    let fx = tensors("unet.safetensors")?;
    let (sample, context) = (&fx["a.sample"], &fx["a.context"]);
    let full = unet(None)?.forward(sample, 981., context)?;
    // Batch 2 x 4 heads = 8 (batch, head) pairs: slices of 3 leave a remainder.
    for slice in [1, 3] {
        let sliced = unet(Some(slice))?.forward(sample, 981., context)?;
        let err = max_abs_diff(&full, &sliced)?;
        eprintln!("unet attention slice {slice}: max abs difference to unsliced {err:.3e}");
        // The fused softmax sums each row in another order per slice size: 1.0e-6 apart on an
        // H200. A wrong slice is off by the output's own size.
        assert!(err <= 1e-5, "slice {slice}: {err:e}");
    }
    Ok(())
}

/// The tiny UNet on `device` in `dtype` with its weights frozen, or each a variable (returned by
/// name).
fn unet_on(device: &Device, dtype: DType, trainable: bool) -> Result<(UNet2DConditionModel, Vec<(String, Var)>)> {
    let cfg = UNet2DConditionModelConfig::from_json(&read_json("tiny-sd/unet/config.json")?)?;
    let path = fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors");
    let weights = candle_core::safetensors::load(path, device)?;
    let weights: HashMap<String, Tensor> = weights.into_iter().map(|(k, v)| Ok((k, v.to_dtype(dtype)?))).collect::<Result<_>>()?;
    if !trainable {
        return Ok((UNet2DConditionModel::new(VarBuilder::from_tensors(weights, dtype, device), cfg)?, Vec::new()));
    }
    let mut vars: Vec<(String, Var)> = weights.into_iter().map(|(k, v)| Ok((k, Var::from_tensor(&v)?))).collect::<Result<_>>()?;
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    Ok((UNet2DConditionModel::new(VarBuilder::from_tensors(tensors, dtype, device), cfg)?, vars))
}

/// Gradients on the test device equal the CPU's (which tests/gradients.rs holds to PyTorch's):
/// the context's through frozen weights (stage 1's backward, twice, as the second reads the
/// flipped kernels the first kept) and every weight's when all train (full fine-tuning), in f32;
/// off the CPU also the context's in bf16 (against the CPU's f32, to bf16's precision, 1e-1). For
/// `LAYERDIFF_TEST_DEVICE=cuda`: the device's own backward paths (strided convolutions' input
/// gradients, kept kernels, the fused kernels of the norms and the attention scores, the
/// upsampling's reduction, cuDNN's convolutions in a `cudnn` build); on the CPU both sides are
/// the CPU.
#[test]
fn unet_gradients_match_the_cpus() -> Result<()> {
    let fx = candle_core::safetensors::load(fixture("unet.safetensors"), &Device::Cpu)?;
    let rel = |ours: &Tensor, cpu: &Tensor| -> Result<f32> { Ok(max_abs_diff(&ours.to_device(&Device::Cpu)?, cpu)? / max_abs_diff(cpu, &cpu.zeros_like()?)?) };
    let backward = |device: &Device, dtype: DType, trainable: bool| -> Result<(Tensor, Vec<(String, Tensor)>)> {
        let (unet, vars) = unet_on(device, dtype, trainable)?;
        let context = Var::from_tensor(&fx["a.context"].to_device(device)?.to_dtype(dtype)?)?;
        let mut context_grads = Vec::new();
        let mut grads = None;
        for _ in 0..if trainable { 1 } else { 2 } {
            let out = unet.forward(&fx["a.sample"].to_device(device)?.to_dtype(dtype)?, 981., context.as_tensor())?;
            let g = out.to_dtype(DType::F32)?.sqr()?.mean_all()?.backward()?;
            context_grads.push(g.get(context.as_tensor()).ok_or("no context gradient")?.clone());
            grads = Some(g);
        }
        if let [first, second] = &context_grads[..] {
            // cuDNN's backward algorithms may sum in another order on each call (2.9e-10 apart
            // on an H200); a wrong kept kernel is off by the gradient's own size.
            let gap = max_abs_diff(first, second)? / max_abs_diff(first, &first.zeros_like()?)?;
            assert!(gap <= 1e-6, "the second backward differs from the first by {gap:e}");
        }
        let grads = grads.ok_or("no backward")?;
        let weights = vars.iter().map(|(k, v)| Ok((k.clone(), grads.get(v.as_tensor()).ok_or(format!("{k}: no gradient"))?.clone()))).collect::<Result<_>>()?;
        Ok((context_grads.remove(0), weights))
    };
    let device = device()?;
    if std::env::var("LAYERDIFF_FUSED").as_deref() != Ok("0") && device.is_cuda() {
        // Else this would pass on the composed ops (the warning logged says why).
        assert!(layerdiff::models::cuda_kernels::ready(&device), "the fused kernels cannot be used here");
    }
    if cfg!(feature = "cudnn") && std::env::var("LAYERDIFF_CUDNN").as_deref() != Ok("0") && device.is_cuda() {
        assert!(layerdiff::models::cudnn_conv::ready(&device), "a `cudnn` build, but cuDNN cannot be used here");
    }
    let mut cases = vec![(DType::F32, false, 1e-3), (DType::F32, true, 1e-3)];
    if !device.is_cpu() {
        // bf16's precision: the CPU's own bf16 path is 4.4e-2 off the f32 gradient, the GPU's
        // path emulated on the CPU 4.5e-2 (tests/fused_emulated.rs).
        cases.push((DType::BF16, false, 1e-1));
    }
    for (dtype, trainable, tol) in cases {
        let ((context, weights), (cpu_context, cpu_weights)) = (backward(&device, dtype, trainable)?, backward(&Device::Cpu, DType::F32, trainable)?);
        let mut worst = (rel(&context, &cpu_context)?, "context".to_string());
        for ((name, ours), (cpu_name, cpu)) in weights.iter().zip(&cpu_weights) {
            assert_eq!(name, cpu_name);
            let err = rel(ours, cpu)?;
            if err > worst.0 {
                worst = (err, name.clone());
            }
        }
        eprintln!("{device:?}, {dtype:?}, trainable {trainable}: gradients' worst relative error to the CPU's {:.3e} ({})", worst.0, worst.1);
        assert!(worst.0 <= tol, "{dtype:?}, trainable {trainable}: {}: relative error {:e}", worst.1, worst.0);
    }
    Ok(())
}

/// Attention in bf16 on the test device, forward and backward, against the CPU's in f32 to bf16's
/// precision: SD's self-attention at head dimension 40 (partial blocks of queries and tiles of
/// keys), its cross-attention's 77 keys at 160, and 80. For `LAYERDIFF_TEST_DEVICE=cuda`: the
/// fused attention kernels (`cuda_kernels::flash_attention` and, up to head dimension 96, its
/// backward), which must run there.
#[test]
fn attention_in_bf16_matches_the_cpus() -> Result<()> {
    use layerdiff::models::{cuda_kernels, nn::attention};
    let device = device()?;
    for (n, seq_q, seq_k, d) in [(8, 300, 300, 40), (8, 300, 77, 160), (4, 130, 130, 80)] {
        let scale = 1.0 / (d as f64).sqrt();
        // Values bf16 holds exactly, so that both sides start from the same inputs.
        let randn = |seq: usize| Tensor::randn(0f32, 1.0, (n, seq, d), &Device::Cpu)?.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let (q, k, v, g) = (randn(seq_q)?, randn(seq_k)?, randn(seq_k)?, randn(seq_q)?);
        let run = |device: &Device, dtype: DType| -> Result<Vec<Tensor>> {
            let vars = [&q, &k, &v].iter().map(|t| Var::from_tensor(&t.to_device(device)?.to_dtype(dtype)?)).collect::<candle_core::Result<Vec<_>>>()?;
            let out = attention(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), scale, None)?;
            let grads = (out.to_dtype(DType::F32)? * g.to_device(device)?)?.sum_all()?.backward()?;
            let mut all = vec![out.to_dtype(DType::F32)?.to_device(&Device::Cpu)?];
            for var in &vars {
                all.push(grads.get(var.as_tensor()).ok_or("no gradient")?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
            }
            Ok(all)
        };
        let fused = device.is_cuda() && std::env::var("LAYERDIFF_FUSED").as_deref() != Ok("0") && std::env::var("LAYERDIFF_FLASH").as_deref() != Ok("0");
        if fused {
            let [q, k, v, g] = [&q, &k, &v, &g].map(|t| t.to_device(&device).and_then(|t| t.to_dtype(DType::BF16)));
            let (q, k, v, g) = (q?, k?, v?, g?);
            let (out, lse) = cuda_kernels::flash_attention(&q, &k, &v, scale)?.ok_or("the fused attention kernel does not run here")?;
            // Its backward's kernels stop at head dimension 96.
            let backward = cuda_kernels::flash_attention_backward(&q, &k, &v, &out, &g, &lse, scale)?;
            assert_eq!(backward.is_some(), d <= 96, "the fused attention's backward, head dimension {d}");
        }
        let (ours, cpu) = (run(&device, DType::BF16)?, run(&Device::Cpu, DType::F32)?);
        // On a GPU the fused kernels keep the scores in f32 (products on the tensor cores, f32
        // sums; about 3e-3 emulated on the CPU: tests/fused_emulated.rs), where the composed
        // ops round them to bf16 (as the backward past head dimension 96 does). The CPU's own
        // bf16 softmax sums in bf16: up to 1.4e-1 seen here, so on the CPU this only catches a
        // wrong layout or formula, off by the values' size.
        let tolerances = match (device.is_cpu(), fused) {
            (true, _) => [3e-1; 4],
            (false, true) if d <= 96 => [2e-2; 4],
            (false, true) => [2e-2, 1e-1, 1e-1, 1e-1],
            (false, false) => [1e-1; 4],
        };
        for (((ours, cpu), what), tol) in ours.iter().zip(&cpu).zip(["out", "dq", "dk", "dv"]).zip(tolerances) {
            let err = max_abs_diff(ours, cpu)? / max_abs_diff(cpu, &cpu.zeros_like()?)?;
            eprintln!("{device:?}, attention {:?}, {what}: relative error {err:.3e}", (n, seq_q, seq_k, d));
            assert!(err <= tol, "attention {:?}, {what}: relative error {err:e}", (n, seq_q, seq_k, d));
        }
    }
    Ok(())
}

/// Adam on the test device steps as on the CPU, bit for bit: f32 variables read by the model as
/// they are and through bf16 copies, with weight decay, over steps whose bias corrections differ
/// (a linear loss, so each device's gradient is the same `r`). For `LAYERDIFF_TEST_DEVICE=cuda`:
/// the fused step (`cuda_kernels::adam_step`), which must have run there.
#[test]
fn adam_steps_as_on_the_cpu_bit_for_bit() -> Result<()> {
    use layerdiff::method::adam::{fused_step_ready, Adam, AdamParams};
    let device = device()?;
    if std::env::var("LAYERDIFF_FUSED").as_deref() != Ok("0") && device.is_cuda() {
        assert!(fused_step_ready(&device), "Adam's fused step cannot be used here");
    }
    let n = 10_000;
    let init = (Tensor::randn(0f32, 1.0, n, &Device::Cpu)? * 3.0)?;
    let r: Vec<Tensor> = (0..3).map(|t| Tensor::randn(0f32, 1.0, n, &Device::Cpu)? * 10f64.powi(t - 1)).collect::<candle_core::Result<_>>()?;
    for model_dtype in [DType::F32, DType::BF16] {
        let params = AdamParams { lr: 2e-3, weight_decay: 0.01, ..Default::default() };
        let run = |device: &Device| -> Result<Vec<u32>> {
            let var = Var::from_tensor(&init.to_device(device)?)?;
            let mut adam = Adam::with_model_copies(vec![("x".into(), var.clone())], params, model_dtype)?;
            let model = adam.model_vars().next().ok_or("no variable")?.1.clone();
            for r in &r {
                let loss = (model.as_tensor() * r.to_device(device)?.to_dtype(model_dtype)?)?.sum_all()?;
                adam.backward_step(&loss)?;
            }
            let mut bits: Vec<u32> = var.as_tensor().to_device(&Device::Cpu)?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect();
            let model = model.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
            bits.extend(model.iter().map(|v| v.to_bits()));
            Ok(bits)
        };
        let (ours, cpu) = (run(&device)?, run(&Device::Cpu)?);
        let differing = ours.iter().zip(&cpu).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{device:?}, model in {model_dtype:?}: elements of the variable and the model's copy differing from the CPU's");
    }
    Ok(())
}

#[test]
fn unet_config_from_json() -> Result<()> {
    let json = read_json("tiny-sd/unet/config.json")?;
    let cfg = UNet2DConditionModelConfig::from_json(&json)?;
    assert_eq!(cfg.blocks.len(), 3);
    assert_eq!(cfg.blocks.iter().map(|b| b.out_channels).collect::<Vec<_>>(), [32, 64, 64]);
    assert_eq!(cfg.blocks.iter().map(|b| b.down_cross_attn).collect::<Vec<_>>(), [true, true, false]);
    assert_eq!(cfg.blocks.iter().map(|b| b.up_cross_attn).collect::<Vec<_>>(), [true, true, false]);
    // `attention_head_dim` is the number of heads when `num_attention_heads` is null.
    assert!(cfg.blocks.iter().all(|b| b.num_attention_heads == 4));
    assert_eq!((cfg.norm_num_groups, cfg.cross_attention_dim, cfg.layers_per_block), (8, 32, 2));
    // `num_attention_heads` wins when given; missing keys take diffusers' defaults.
    let mut j = json.clone();
    j["num_attention_heads"] = serde_json::json!([2, 4, 8]);
    let cfg = UNet2DConditionModelConfig::from_json(&j)?;
    assert_eq!(cfg.blocks.iter().map(|b| b.num_attention_heads).collect::<Vec<_>>(), [2, 4, 8]);
    let cfg = UNet2DConditionModelConfig::from_json(&serde_json::json!({"cross_attention_dim": 768}))?;
    assert_eq!(cfg, UNet2DConditionModelConfig { sample_size: None, ..Default::default() });
    // Features this UNet lacks are refused, naming the file and the key.
    for (key, value) in [
        ("dual_cross_attention", serde_json::json!(true)),
        ("class_embed_type", serde_json::json!("timestep")),
        ("addition_embed_type", serde_json::json!("text_time")),
        ("only_cross_attention", serde_json::json!([true, false, false])),
        ("time_cond_proj_dim", serde_json::json!(256)),
        ("mid_block_type", serde_json::json!("UNetMidBlock2DSimpleCrossAttn")),
        ("down_block_types", serde_json::json!(["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"])),
    ] {
        let mut j = json.clone();
        j[key] = value;
        let err = UNet2DConditionModelConfig::from_json(&j).expect_err(key).to_string();
        assert!(err.starts_with("unet/config.json: ") && err.contains(&format!("`{key}`")), "{err}");
    }
    Ok(())
}

#[test]
fn vae_matches_diffusers() -> Result<()> {
    let cfg = AutoencoderKLConfig::from_json(&read_json("tiny-sd/vae/config.json")?)?;
    let vae = AutoencoderKL::new(weights("tiny-sd/vae/diffusion_pytorch_model.safetensors", DType::F32)?, cfg)?;
    assert_eq!(vae.downsampling_factor(), 8);
    assert_eq!(vae.scaling_factor(), 0.18215);
    let fx = tensors("vae.safetensors")?;
    let posterior = vae.encode(&fx["image"])?;
    check("vae encode mean", posterior.mean(), &fx["mean"])?;
    check("vae encode logvar", posterior.logvar(), &fx["logvar"])?;
    let std = max_abs_diff(posterior.std(), &(&fx["logvar"] * 0.5)?.exp()?)?;
    assert!(std <= TOL, "std {std:e}");
    let noise = fx["latents"].clone();
    let sample = posterior.sample(&noise)?;
    let expected = (&fx["mean"] + (&fx["logvar"] * 0.5)?.exp()?.mul(&noise)?)?;
    check("vae posterior sample", &sample, &expected)?;
    check("vae decode", &vae.decode(&fx["latents"])?, &fx["decoded"])?;
    // Configs outside AutoencoderKL are refused with the file and key.
    let mut j = read_json("tiny-sd/vae/config.json")?;
    j["shift_factor"] = serde_json::json!(0.1159);
    let err = AutoencoderKLConfig::from_json(&j).expect_err("shift_factor").to_string();
    assert!(err.starts_with("vae/config.json: ") && err.contains("`shift_factor`"), "{err}");
    Ok(())
}

fn check_text_encoder(dir: &str, key: &str, label: &str) -> Result<()> {
    let cfg = ClipTextConfig::from_json(&read_json(&format!("{dir}/config.json"))?)?;
    let clip = ClipTextTransformer::new(weights(&format!("{dir}/model.safetensors"), DType::F32)?, cfg)?;
    let fx = tensors("text.safetensors")?;
    let n_prompts = read_json("prompts.json")?["prompts"].as_array().map_or(0, Vec::len);
    assert!(n_prompts > 0);
    let mut worst = 0f32;
    for i in 0..n_prompts {
        let hidden = clip.forward(&fx[&format!("ids.{i}")])?;
        worst = worst.max(check(&format!("clip {label} prompt {i}"), &hidden, &fx[&format!("{key}.{i}")])?);
    }
    eprintln!("clip {label}: worst max abs error over {n_prompts} prompts {worst:.3e}");
    Ok(())
}

#[test]
fn clip_quick_gelu_matches_transformers() -> Result<()> {
    check_text_encoder("tiny-sd/text_encoder", "hidden", "quick_gelu")
}

#[test]
fn clip_gelu_matches_transformers() -> Result<()> {
    let cfg = ClipTextConfig::from_json(&read_json("tiny-text-gelu/config.json")?)?;
    assert_eq!(cfg.hidden_act, layerdiff::models::clip_text::Activation::Gelu);
    check_text_encoder("tiny-text-gelu", "hidden_gelu", "gelu")
}

/// A config asking for what the models do not implement is refused with a one-line error that
/// names the file and the key, instead of building a different network.
#[test]
fn unsupported_config_values_are_refused() {
    use layerdiff::models::{AutoencoderKLConfig, ClipTextConfig, UNet2DConditionModelConfig};
    let read = |c: &str| -> serde_json::Value {
        let path = format!("{}/tests/fixtures/tiny-sd/{c}/config.json", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let with = |mut v: serde_json::Value, key: &str, value: serde_json::Value| {
        v[key] = value;
        v
    };
    let cases = [
        UNet2DConditionModelConfig::from_json(&with(read("unet"), "class_embed_type", "timestep".into())).err(),
        UNet2DConditionModelConfig::from_json(&with(read("unet"), "down_block_types", serde_json::json!(["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D"]))).err(),
        AutoencoderKLConfig::from_json(&with(read("vae"), "act_fn", "relu".into())).err(),
        ClipTextConfig::from_json(&with(read("text_encoder"), "hidden_act", "swish".into())).err(),
    ];
    for (err, (file, key)) in cases.into_iter().zip([
        ("unet/config.json", "class_embed_type"),
        ("unet/config.json", "down_block_types"),
        ("vae/config.json", "act_fn"),
        ("text_encoder/config.json", "hidden_act"),
    ]) {
        let msg = err.expect("refused").to_string();
        assert!(msg.contains(file) && msg.contains(key) && !msg.contains('\n'), "{msg}");
    }
}
