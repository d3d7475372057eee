//! Training a tiny Stable Diffusion from scratch on the toy world ([`crate::toyworld`]), so that
//! edits can be scored exactly on a model that learned real text-to-image behaviour on a CPU.
//!
//! The model is ours end to end: the same [`UNet2DConditionModel`], [`AutoencoderKL`] and
//! [`ClipTextTransformer`] the editor runs (on the real SD v1 tokenizer), written in the diffusers
//! layout, so `layerdiff edit --model OUT` takes it as it takes SD v1.4. Two phases, each resumable:
//! 1. **VAE**: encoder and decoder on the images, `MSE(decode(sample(encode(x))), x) + kl * KL`;
//!    then the latent scaling factor is set to `1 / std` of the dataset's latents (SD's 0.18215
//!    was found the same way).
//! 2. **Diffusion**: UNet and text encoder together on the DDPM loss `||target - model(z_t, t, c)||^2`
//!    (v-prediction on a cosine schedule), 10 % of captions dropped to "" for classifier-free
//!    guidance, AdamW with warm-up and gradient clipping, an EMA of the weights (what is exported).
//!
//! At every checkpoint the EMA model is written to `OUT` and sampled on held-out scenes, and the
//! toy world's scorers read each sample ([`crate::toyworld::score`]): the accuracies say whether
//! the model draws what the caption asks.

pub mod optim;

use crate::error::{bad_input, io_err, Result};
use crate::method::adam::{Adam, AdamParams};
use crate::models::clip_text::{ClipTextConfig, ClipTextTransformer};
use crate::models::unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::pipeline::{generate, GenerateOptions, StableDiffusion};
use crate::schedulers::{DdimConfig, DdimScheduler, TrainSchedule};
use crate::sources::{ModelFiles, SourceOptions};
use crate::tiny::{seeded_model_with, write_json, write_pipeline, write_safetensors, WeightInit};
use crate::tokenizer::ClipTokenizer;
use crate::toyworld::data::{load_dataset, scene_for, Example};
use crate::toyworld::score::{read_scene, Accuracy};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use optim::{clip_grad_norm, warmup_lr, Ema};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The training state file inside `OUT` (weights, optimizer, EMA, progress).
pub const STATE_FILE: &str = "train-state.safetensors";
/// One line per checkpoint: step, losses and the scorers' accuracies.
pub const LOG_FILE: &str = "train-log.jsonl";

/// Every setting of a run. The defaults are the ones the committed toy model was trained with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainSettings {
    /// Seeds the initialization, the batches, the noise and the held-out scenes.
    pub seed: u64,
    pub vae_steps: usize,
    pub steps: usize,
    pub batch: usize,
    pub vae_lr: f64,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub clip: f64,
    pub ema: f64,
    /// The fraction of captions replaced by "" (the unconditional input of guidance).
    pub caption_dropout: f64,
    /// The weight of the VAE's KL term (per-element means).
    pub kl_weight: f64,
    /// Checkpoint (and evaluate) every this many steps of a phase, and at its end.
    pub checkpoint_every: usize,
    /// Held-out scenes sampled and scored at each diffusion checkpoint (0: none).
    pub eval_samples: usize,
    pub eval_steps: usize,
    pub eval_guidance: f64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            seed: 0,
            vae_steps: 1500,
            steps: 6000,
            batch: 32,
            vae_lr: 1e-3,
            lr: 1e-3,
            warmup: 200,
            weight_decay: 0.01,
            clip: 1.0,
            ema: 0.999,
            caption_dropout: 0.1,
            kl_weight: 1e-5,
            checkpoint_every: 500,
            eval_samples: 64,
            eval_steps: 25,
            eval_guidance: 3.0,
        }
    }
}

impl TrainSettings {
    /// Whether a run with `other` continues this one step for step: the lengths of the phases,
    /// the checkpoint period and the evaluation may change on resume (train longer, check more
    /// often); nothing that shapes a step may.
    pub fn continues(&self, other: &TrainSettings) -> bool {
        let lengths = |s: &TrainSettings| TrainSettings {
            vae_steps: 0,
            steps: 0,
            checkpoint_every: 1,
            eval_samples: 0,
            eval_steps: 0,
            eval_guidance: 0.0,
            ..s.clone()
        };
        lengths(self) == lengths(other)
    }
}

/// What [`train`] reports as it goes.
#[derive(Debug)]
pub enum TrainEvent<'a> {
    /// A phase (`"vae"` or `"diffusion"`) starts or resumes at `step` of `total`.
    Phase { phase: &'static str, step: usize, total: usize },
    /// One optimizer step done (`step` counts from 1).
    Step { phase: &'static str, step: usize, loss: f64 },
    /// Held-out samples being drawn for a checkpoint.
    Sampling { done: usize, total: usize },
    /// A checkpoint written; `accuracy` when samples were scored.
    Checkpoint { phase: &'static str, step: usize, accuracy: Option<&'a Accuracy> },
}

/// The toy model's architecture for `size` x `size` images: a VAE with factor 2, a UNet with
/// blocks (32, 64, 64) and cross-attention on a 2-layer width-64 CLIP text encoder over 24 tokens,
/// 1000-step cosine schedule with v-prediction.
pub fn toy_configs(size: u32) -> Value {
    // The tiny test pipeline's configs, with these changes.
    let mut configs = crate::tiny::default_configs();
    let changes = json!({
        "unet": { "sample_size": size / 2, "layers_per_block": 1, "cross_attention_dim": 64 },
        "vae": {
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "block_out_channels": [32, 64], "sample_size": size, "scaling_factor": 1.0
        },
        "text_encoder": { "hidden_size": 64, "intermediate_size": 256, "max_position_embeddings": 24, "projection_dim": 64 },
        "scheduler": {
            "beta_schedule": "squaredcos_cap_v2", "steps_offset": 0, "prediction_type": "v_prediction",
            "timestep_spacing": "trailing"
        }
    });
    crate::tiny::merge_overrides(&mut configs, &changes).expect("the changes name known components");
    configs
}

/// Where a run stands: the phase, steps done in it, and (diffusion) the VAE's scaling factor.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    phase: String,
    step: usize,
    scaling_factor: f64,
    settings: TrainSettings,
    data: PathBuf,
}

/// Named trainable weights, their optimizer and EMA.
struct Trainee {
    adam: Adam,
    ema: Ema,
}

impl Trainee {
    fn new(weights: BTreeMap<String, Tensor>, params: AdamParams, ema: f64, device: &Device) -> Result<Self> {
        let vars = weights
            .into_iter()
            .map(|(n, t)| Ok((n, Var::from_tensor(&t.to_device(device)?.to_dtype(DType::F32)?)?)))
            .collect::<Result<Vec<_>>>()?;
        let adam = Adam::new(vars, params)?;
        let ema = Ema::new(ema, adam.vars())?;
        Ok(Self { adam, ema })
    }

    /// The live weights of the component `prefix` (`"unet."`), unprefixed, for a `VarBuilder`.
    fn tensors(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.adam
            .vars()
            .filter_map(|(n, v)| Some((n.strip_prefix(prefix)?.to_string(), v.as_tensor().clone())))
            .collect()
    }

    /// The EMA weights of `prefix`, unprefixed, on the CPU.
    fn ema_tensors(&self, prefix: &str) -> Result<BTreeMap<String, Tensor>> {
        self.ema
            .shadow
            .iter()
            .filter_map(|(n, t)| Some((n.strip_prefix(prefix)?.to_string(), t)))
            .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
            .collect()
    }

    fn save(&self, path: &Path, progress: &Progress) -> Result<()> {
        let mut all = BTreeMap::new();
        for (name, var) in self.adam.vars() {
            all.insert(format!("param.{name}"), var.as_tensor().to_device(&Device::Cpu)?);
        }
        for (name, t) in &self.ema.shadow {
            all.insert(format!("ema.{name}"), t.to_device(&Device::Cpu)?);
        }
        for (name, t) in self.adam.state() {
            all.insert(format!("adam.{name}"), t.to_device(&Device::Cpu)?);
        }
        all.insert("ema_updates".into(), Tensor::new(self.ema.updates as i64, &Device::Cpu)?);
        let meta = serde_json::to_string(progress).map_err(|e| bad_input(path.display(), e, "report this bug"))?;
        write_safetensors(path, all, DType::F32, Some(HashMap::from([("progress".to_string(), meta)])))
    }

    fn load(&mut self, state: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        let entry = |key: &str| {
            state.get(key).ok_or_else(|| bad_input(what, format!("lacks `{key}`"), "resume the run that wrote it, or start over with another --out"))
        };
        for (name, var) in self.adam.vars() {
            var.set(&entry(&format!("param.{name}"))?.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
        for (name, t) in self.ema.shadow.iter_mut() {
            *t = entry(&format!("ema.{name}"))?.to_device(t.device())?.to_dtype(t.dtype())?;
        }
        self.ema.updates = entry("ema_updates")?.to_dtype(DType::F64)?.to_scalar::<f64>()? as usize;
        let adam_state: HashMap<String, Tensor> =
            state.iter().filter_map(|(k, v)| Some((k.strip_prefix("adam.")?.to_string(), v.clone()))).collect();
        self.adam.load_state(&adam_state, what)
    }

    /// One optimizer step on `loss`: backward, clip, AdamW at `lr`, EMA.
    fn step(&mut self, loss: &Tensor, lr: f64, clip: f64) -> Result<()> {
        let mut grads = loss.backward()?;
        let vars: Vec<Var> = self.adam.vars().map(|(_, v)| v.clone()).collect();
        clip_grad_norm(&mut grads, vars.iter(), clip)?;
        self.adam.set_lr(lr);
        self.adam.step(&grads)?;
        self.ema.update(self.adam.vars())
    }
}

/// A deterministic RNG for `(seed, phase, step)`, so a resumed run draws what an uninterrupted one does.
fn step_rng(seed: u64, phase: u64, step: usize) -> rand::rngs::StdRng {
    let mut z = seed ^ phase.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    rand::rngs::StdRng::seed_from_u64(z ^ (z >> 31))
}

fn randn(rng: &mut impl Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| Distribution::<f32>::sample(&StandardNormal, rng)).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)?)
}

/// The dataset's images as one `[n, 3, s, s]` tensor in [-1, 1].
fn image_tensor(examples: &[Example], device: &Device) -> Result<Tensor> {
    let all = examples
        .iter()
        .map(|e| crate::image_io::image_to_tensor(&e.image, &Device::Cpu, DType::F32))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&all, 0)?.to_device(device)?)
}

/// Trains (or resumes) a toy Stable Diffusion on the dataset in `data`, writing the model (EMA
/// weights) in the diffusers layout to `out`. Stops after `time_limit` at a step boundary with a
/// checkpoint, so a long run can be spread over sessions (`resume`).
pub fn train(
    data: &Path,
    out: &Path,
    settings: &TrainSettings,
    resume: bool,
    time_limit: Option<Duration>,
    device: &Device,
    events: &mut dyn FnMut(TrainEvent),
) -> Result<()> {
    let started = Instant::now();
    let out_of_time = || time_limit.is_some_and(|l| started.elapsed() >= l);
    let state_path = out.join(STATE_FILE);
    let (world, examples) = load_dataset(data)?;
    if settings.batch == 0 || settings.checkpoint_every == 0 {
        return Err(bad_input("--batch / --checkpoint-every", "0", "give at least 1"));
    }
    let configs = toy_configs(world.size);
    let vae_cfg = AutoencoderKLConfig::from_json(&configs["vae"])?;
    let unet_cfg = UNet2DConditionModelConfig::from_json(&configs["unet"])?;
    let clip_cfg = ClipTextConfig::from_json(&configs["text_encoder"])?;

    // 1. where the run stands
    let mut progress = if resume {
        let state = read_state(&state_path)?;
        if !state.0.settings.continues(settings) {
            return Err(bad_input(
                state_path.display(),
                "was written with other settings",
                "resume with the flags of the first run (only --steps, --vae-steps, --checkpoint-every and --eval-* may change), or train into another --out",
            ));
        }
        Some(state)
    } else if state_path.exists() {
        return Err(bad_input(out.display(), "holds a training run", "add --resume to continue it, or choose another --out"));
    } else {
        None
    };
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let images = image_tensor(&examples, device)?;
    let progress_at = |phase: &str, step: usize, scaling_factor: f64| Progress {
        phase: phase.into(),
        step,
        scaling_factor,
        settings: settings.clone(),
        data: data.to_path_buf(),
    };

    // 2. the VAE
    let vae_done = progress.as_ref().is_some_and(|(p, _)| p.phase == "diffusion");
    let scaling_factor = if vae_done {
        progress.as_ref().map(|(p, _)| p.scaling_factor).unwrap_or(1.0)
    } else {
        let (_, weights) = seeded_model_with(WeightInit::Torch, settings.seed, DType::F32, &Device::Cpu, |vb| {
            Ok(AutoencoderKL::new(vb, vae_cfg.clone())?)
        })?;
        let params = AdamParams { lr: settings.vae_lr, ..Default::default() };
        let mut trainee = Trainee::new(weights, params, settings.ema, device)?;
        let mut step = 0;
        if let Some((p, state)) = progress.take() {
            trainee.load(&state, &state_path.display().to_string())?;
            step = p.step;
        }
        events(TrainEvent::Phase { phase: "vae", step, total: settings.vae_steps });
        // Built once on the variables: the optimizer updates them in place.
        let vae = AutoencoderKL::new(VarBuilder::from_tensors(trainee.tensors(""), DType::F32, device), vae_cfg.clone())?;
        while step < settings.vae_steps {
            let mut rng = step_rng(settings.seed, 1, step);
            let x = batch_of(&images, settings.batch, &mut rng)?;
            let loss = vae_loss(&vae, &x, settings.kl_weight, &mut rng)?;
            let value = finite(&loss, "vae", step)?;
            trainee.step(&loss, warmup_lr(settings.vae_lr, settings.warmup, step), settings.clip)?;
            step += 1;
            events(TrainEvent::Step { phase: "vae", step, loss: value });
            if step % settings.checkpoint_every == 0 || step == settings.vae_steps || out_of_time() {
                trainee.save(&state_path, &progress_at("vae", step, 1.0))?;
                log_line(out, json!({"phase": "vae", "step": step, "loss": value}))?;
                events(TrainEvent::Checkpoint { phase: "vae", step, accuracy: None });
                if out_of_time() && step < settings.vae_steps {
                    return Ok(());
                }
            }
        }
        // The VAE is kept as trained (not its EMA): the decoder must invert this encoder exactly.
        let vae_weights: BTreeMap<String, Tensor> = trainee.tensors("").into_iter().map(|(k, v)| (k, v.detach())).collect();
        let vae = AutoencoderKL::new(VarBuilder::from_tensors(vae_weights.clone().into_iter().collect(), DType::F32, device), vae_cfg.clone())?;
        let scaling = 1.0 / latent_std(&vae, &images)?;
        write_safetensors(&out.join("vae/diffusion_pytorch_model.safetensors"), vae_weights, DType::F32, None)?;
        scaling
    };

    // 3. the latents and captions, once
    let mut configs = configs;
    configs["vae"]["scaling_factor"] = json!(scaling_factor);
    let vae = load_vae(out, &vae_cfg, device)?;
    let latents = (encode_all(&vae, &images)? * scaling_factor)?;
    crate::assets::write_clip_tokenizer(&out.join("tokenizer"), clip_cfg.max_position_embeddings)?;
    let tokenizer = ClipTokenizer::from_dir(&out.join("tokenizer"))?;
    let tokens = examples.iter().map(|e| tokenizer.encode(&e.caption)).collect::<Result<Vec<_>>>()?;
    let empty = tokenizer.encode("")?;
    let scheduler = DdimScheduler::new(DdimConfig::from_json(&configs["scheduler"])?)?;
    let schedule = TrainSchedule::from_scheduler(&scheduler);

    // 4. UNet and text encoder
    let (_, unet_w) = seeded_model_with(WeightInit::Torch, settings.seed.wrapping_add(1), DType::F32, &Device::Cpu, |vb| {
        Ok(UNet2DConditionModel::new(vb, unet_cfg.clone())?)
    })?;
    let (_, text_w) = seeded_model_with(WeightInit::Torch, settings.seed.wrapping_add(2), DType::F32, &Device::Cpu, |vb| {
        Ok(ClipTextTransformer::new(vb, clip_cfg.clone())?)
    })?;
    let weights: BTreeMap<String, Tensor> = unet_w
        .into_iter()
        .map(|(k, v)| (format!("unet.{k}"), v))
        .chain(text_w.into_iter().map(|(k, v)| (format!("text_encoder.{k}"), v)))
        .collect();
    let params = AdamParams { lr: settings.lr, weight_decay: settings.weight_decay, ..Default::default() };
    let mut trainee = Trainee::new(weights, params, settings.ema, device)?;
    let mut step = 0;
    if let Some((p, state)) = progress.take() {
        trainee.load(&state, &state_path.display().to_string())?;
        step = p.step;
    }
    events(TrainEvent::Phase { phase: "diffusion", step, total: settings.steps });
    let checkpoint = |trainee: &Trainee, step: usize, loss: f64, events: &mut dyn FnMut(TrainEvent)| -> Result<()> {
        trainee.save(&state_path, &progress_at("diffusion", step, scaling_factor))?;
        write_model(out, &configs, trainee)?;
        let accuracy = evaluate(out, world.seed, world.size, settings, device, events)?;
        let mut line = json!({"phase": "diffusion", "step": step, "loss": loss});
        if let Some(a) = &accuracy {
            line["accuracy"] = accuracy_json(a);
        }
        log_line(out, line)?;
        events(TrainEvent::Checkpoint { phase: "diffusion", step, accuracy: accuracy.as_ref() });
        Ok(())
    };
    if step == 0 {
        // The VAE phase's checkpoint must not be mistaken for this phase's on resume.
        trainee.save(&state_path, &progress_at("diffusion", 0, scaling_factor))?;
    }
    let unet = UNet2DConditionModel::new(VarBuilder::from_tensors(trainee.tensors("unet."), DType::F32, device), unet_cfg.clone())?;
    let text = ClipTextTransformer::new(VarBuilder::from_tensors(trainee.tensors("text_encoder."), DType::F32, device), clip_cfg.clone())?;
    while step < settings.steps {
        let mut rng = step_rng(settings.seed, 2, step);
        let loss = diffusion_loss(&unet, &text, &schedule, &latents, &tokens, &empty, settings, &mut rng)?;
        let value = finite(&loss, "diffusion", step)?;
        trainee.step(&loss, warmup_lr(settings.lr, settings.warmup, step), settings.clip)?;
        step += 1;
        events(TrainEvent::Step { phase: "diffusion", step, loss: value });
        if step % settings.checkpoint_every == 0 || step == settings.steps || out_of_time() {
            checkpoint(&trainee, step, value, events)?;
            if out_of_time() {
                return Ok(());
            }
        }
    }
    if settings.steps == 0 {
        write_model(out, &configs, &trainee)?;
    }
    Ok(())
}

fn read_state(path: &Path) -> Result<(Progress, HashMap<String, Tensor>)> {
    let fix = "train into a new --out without --resume";
    let bytes = std::fs::read(path).map_err(|_| bad_input(path.display(), "no training state to resume", fix))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad_input(path.display(), e, fix))?;
    let progress = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("progress"))
        .and_then(|p| serde_json::from_str::<Progress>(p).ok())
        .ok_or_else(|| bad_input(path.display(), "has no readable `progress` metadata", fix))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    Ok((progress, tensors))
}

/// `batch` rows of `all`, drawn uniformly with replacement.
fn batch_of(all: &Tensor, batch: usize, rng: &mut impl Rng) -> Result<Tensor> {
    let n = all.dim(0)?;
    let idx: Vec<u32> = (0..batch).map(|_| rng.random_range(0..n) as u32).collect();
    Ok(all.index_select(&Tensor::new(idx, all.device())?, 0)?)
}

fn finite(loss: &Tensor, phase: &str, step: usize) -> Result<f64> {
    let v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(bad_input(format!("{phase} step {step}"), format!("the loss is {v}"), "lower the learning rate, or resume from the last checkpoint"))
    }
}

/// `MSE(decode(z), x) + kl_weight * KL(q(z|x) || N(0, I))`, `z` sampled, both per-element means.
fn vae_loss(vae: &AutoencoderKL, x: &Tensor, kl_weight: f64, rng: &mut impl Rng) -> Result<Tensor> {
    let posterior = vae.encode(x)?;
    let noise = randn(rng, posterior.mean().dims(), x.device())?;
    let recon = vae.decode(&posterior.sample(&noise)?)?;
    let mse = (recon - x)?.sqr()?.mean_all()?;
    let var = posterior.logvar().exp()?;
    let kl = ((posterior.mean().sqr()? + var)? - 1.0)?.sub(posterior.logvar())?.mean_all()?.affine(0.5, 0.0)?;
    Ok((mse + (kl * kl_weight)?)?)
}

/// The latents' mean, `[n, c, s/f, s/f]`, encoded in batches.
fn encode_all(vae: &AutoencoderKL, images: &Tensor) -> Result<Tensor> {
    let n = images.dim(0)?;
    let mut parts = Vec::new();
    for start in (0..n).step_by(64) {
        parts.push(vae.encode(&images.narrow(0, start, 64.min(n - start))?)?.mean().clone());
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// The standard deviation of the dataset's latents (the first 1024 images).
fn latent_std(vae: &AutoencoderKL, images: &Tensor) -> Result<f64> {
    let sample = images.narrow(0, 0, images.dim(0)?.min(1024))?;
    let z = encode_all(vae, &sample)?.flatten_all()?.to_dtype(DType::F64)?;
    let mean = z.mean_all()?.to_scalar::<f64>()?;
    let var = (z - mean)?.sqr()?.mean_all()?.to_scalar::<f64>()?;
    Ok(var.sqrt().max(1e-6))
}

fn load_vae(out: &Path, cfg: &AutoencoderKLConfig, device: &Device) -> Result<AutoencoderKL> {
    let path = out.join("vae/diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&path, device)
        .map_err(|e| bad_input(path.display(), e, "train into a new --out without --resume"))?;
    Ok(AutoencoderKL::new(VarBuilder::from_tensors(tensors, DType::F32, device), cfg.clone())?)
}

/// The DDPM loss on one batch: `||target(z, eps, t) - unet(z_t, t, text(caption or ""))||^2`,
/// one timestep per sample.
#[allow(clippy::too_many_arguments)]
fn diffusion_loss(
    unet: &UNet2DConditionModel,
    text: &ClipTextTransformer,
    schedule: &TrainSchedule,
    latents: &Tensor,
    tokens: &[Vec<u32>],
    empty: &[u32],
    settings: &TrainSettings,
    rng: &mut impl Rng,
) -> Result<Tensor> {
    let device = latents.device();
    let n = latents.dim(0)?;
    let idx: Vec<u32> = (0..settings.batch).map(|_| rng.random_range(0..n) as u32).collect();
    let z = latents.index_select(&Tensor::new(idx.as_slice(), device)?, 0)?;
    let ids: Vec<u32> = idx
        .iter()
        .flat_map(|&i| if rng.random::<f64>() < settings.caption_dropout { empty } else { tokens[i as usize].as_slice() })
        .copied()
        .collect();
    let ids = Tensor::from_vec(ids, (settings.batch, empty.len()), device)?;
    let ts: Vec<usize> = (0..settings.batch).map(|_| rng.random_range(0..schedule.alphas_cumprod.len())).collect();
    let eps = randn(rng, z.dims(), device)?;
    let z_t = schedule.add_noise(&z, &eps, &ts)?;
    let target = schedule.target(&z, &eps, &ts)?;
    let context = text.forward(&ids)?;
    let t = Tensor::from_vec(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), settings.batch, device)?;
    let pred = unet.forward_timesteps(&z_t, &t, &context)?;
    Ok((pred - target)?.sqr()?.mean_all()?)
}

/// Writes the EMA UNet and text encoder, with the VAE already in `out`, as a diffusers pipeline.
fn write_model(out: &Path, configs: &Value, trainee: &Trainee) -> Result<()> {
    let vae_path = out.join("vae/diffusion_pytorch_model.safetensors");
    let vae: BTreeMap<String, Tensor> = candle_core::safetensors::load(&vae_path, &Device::Cpu)?.into_iter().collect();
    write_pipeline(out, configs, trainee.ema_tensors("unet.")?, vae, trainee.ema_tensors("text_encoder.")?, DType::F32)?;
    write_json(&out.join("training.json"), &json!({"note": "written by `layerdiff train`", "log": LOG_FILE}))
}

/// The held-out scenes of a world with seed `world_seed`: another stream of the same sampler.
pub fn held_out_seed(world_seed: u64) -> u64 {
    world_seed ^ 0x5EED_0F0E_1D00
}

/// Samples the model in `out` on `settings.eval_samples` held-out captions and scores them.
fn evaluate(
    out: &Path,
    world_seed: u64,
    size: u32,
    settings: &TrainSettings,
    device: &Device,
    events: &mut dyn FnMut(TrainEvent),
) -> Result<Option<Accuracy>> {
    if settings.eval_samples == 0 {
        return Ok(None);
    }
    let files = ModelFiles::resolve(&out.display().to_string(), &SourceOptions { offline: true, ..Default::default() })?;
    let sd = StableDiffusion::load(&files, device, DType::F32)?;
    let mut accuracy = Accuracy::default();
    for i in 0..settings.eval_samples {
        let scene = scene_for(held_out_seed(world_seed), i);
        let opts = GenerateOptions {
            prompt: scene.caption(),
            steps: settings.eval_steps,
            guidance_scale: settings.eval_guidance,
            width: size as usize,
            height: size as usize,
            seed: i as u64,
            ..Default::default()
        };
        let image = generate(&sd, &opts, &mut |_, _| {})?;
        let image = &crate::image_io::tensor_to_images(&image)?[0];
        accuracy.add(read_scene(image).hits(&scene));
        events(TrainEvent::Sampling { done: i + 1, total: settings.eval_samples });
    }
    Ok(Some(accuracy))
}

pub fn accuracy_json(a: &Accuracy) -> Value {
    json!({
        "n": a.total,
        "background": a.rate(a.background), "colour": a.rate(a.colour), "shape": a.rate(a.shape),
        "size": a.rate(a.size), "position": a.rate(a.position), "dot": a.rate(a.dot),
        "single": a.rate(a.single), "background_colour_shape": a.rate(a.all_of),
    })
}

fn log_line(out: &Path, line: Value) -> Result<()> {
    use std::io::Write;
    let path = out.join(LOG_FILE);
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
    writeln!(f, "{line}").map_err(io_err(&path))
}
