//! Stage 2, layered diffusion fine-tuning (paper Eq. 4-6): with `e_bar` frozen, fine-tune the UNet
//! with Adam on
//! ```text
//! L = lambda_o ||M_s (.) (eps - eps_theta(z_s,t, t, e_bar))||^2 + lambda_b ||(1 - M_b) (.) (eps - eps_theta(z_b,t, t, e_bar))||^2
//! ```
//! Either every UNet weight trains (`FinetuneMode::Full`, the paper's) or only low-rank adapters
//! on the attention projections (`FinetuneMode::Lora`: `to_q`, `to_k`, `to_v`, `to_out.0` of every
//! `attn1` and `attn2`; `A` `[r, in]` kaiming-uniform as PEFT's, `B` `[out, r]` zero, so at step 0
//! the model is the base model exactly; scale `lora_alpha / r = 1`).
//!
//! What a session stores ([`LayeredFinetune::trained_tensors`]):
//! - full: every trained weight itself, under its diffusers name. Not the delta `new - original`:
//!   `original + (new - original)` need not round back to `new` in floating point, and the
//!   sampled images must not depend on whether the model came from a session. (A delta would be no
//!   smaller: every weight changes.)
//! - LoRA: the adapters, `<module>.lora_A.weight` / `<module>.lora_B.weight` (PEFT's names).
//!
//! [`LayeredFinetune::load_trained`] rebuilds the same model from the original weights and those
//! tensors, bit for bit.

use super::adam::{Adam, AdamParams};
use super::optimize::{
    check_finite, check_layers, check_lr, entry, finite_step, layer_batch, layer_terms_of, losses_from, losses_tensor,
    master_dtype, noisy_step, object_term_of, prefixed, snapshot, step_tensor, unprefixed, NoisyStep, STAGE2_STREAM,
};
use super::{FinetuneMode, LayeredLatents, StepLoss};
use crate::error::{bad_input, Result};
use crate::models::checkpoint::Tape;
use crate::models::nn::{LORA_A, LORA_B};
use crate::models::unet_2d::{UNet2DConditionModel, UNet2DConditionModelConfig};
use crate::schedulers::TrainSchedule;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use std::collections::HashMap;

const STAGE2: &str = "stage 2 (layered fine-tuning)";

/// Eq. 6: `L = lambda_o L_o + lambda_b L_b` with Eq. 4 `L_o = ||M_s (.) (eps - eps_theta(z_s,t, t, e_bar))||^2`
/// and Eq. 5 `L_b = ||(1 - M_b) (.) (eps - eps_theta(z_b,t, t, e_bar))||^2`, both layers in one
/// batched UNet forward.
pub fn layered_finetune(
    unet: &UNet2DConditionModel,
    e_bar: &Tensor,
    lambda_object: f64,
    lambda_background: f64,
    noisy: &super::optimize::NoisyStep,
    data: &LayeredLatents,
) -> Result<Tensor> {
    let (input, context) = layer_batch(noisy, e_bar, e_bar)?;
    let pred = unet.forward(&input, noisy.t as f64, &context)?;
    layered_finetune_of(&pred, lambda_object, lambda_background, noisy, data)
}

/// [`layered_finetune`] from the UNet's prediction for [`layer_batch`].
pub fn layered_finetune_of(
    pred: &Tensor,
    lambda_object: f64,
    lambda_background: f64,
    noisy: &NoisyStep,
    data: &LayeredLatents,
) -> Result<Tensor> {
    let (object, background) = layer_terms_of(pred, noisy, data)?;
    Ok(((object * lambda_object)? + (background * lambda_background)?)?)
}

/// Small-subject rule: `lambda_o = 2`, or 3 when the subject covers under 10 % of the image; an
/// explicit value wins.
pub fn lambda_object(explicit: Option<f64>, subject_area_fraction: f64) -> f64 {
    explicit.unwrap_or(if subject_area_fraction < 0.1 { 3.0 } else { 2.0 })
}

/// The module prefix of a weight LoRA adapts: `<...>.attn{1,2}.to_{q,k,v}` or
/// `<...>.attn{1,2}.to_out.0`, from `<prefix>.weight`.
fn lora_target(name: &str) -> Option<&str> {
    let prefix = name.strip_suffix(".weight")?;
    let attn = ["to_q", "to_k", "to_v", "to_out.0"].iter().find_map(|p| prefix.strip_suffix(p)?.strip_suffix('.'))?;
    (attn.ends_with(".attn1") || attn.ends_with(".attn2") || attn == "attn1" || attn == "attn2").then_some(prefix)
}

/// A deterministic seed for one adapter's initialization (FNV-1a of its name).
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Fresh adapters for every attention projection in `weights`: `A ~ U(-1/sqrt(in), 1/sqrt(in))`
/// (PEFT's `kaiming_uniform_(a=sqrt(5))`), seeded by the module's name; `B = 0`.
fn fresh_adapters(
    weights: &HashMap<String, Tensor>,
    rank: usize,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut adapters = HashMap::new();
    for (name, w) in weights {
        let Some(prefix) = lora_target(name) else { continue };
        let Ok((out_dim, in_dim)) = w.dims2() else { continue };
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a = seeded_uniform(name_seed(prefix), (rank, in_dim), bound)?.to_dtype(dtype)?.to_device(device)?;
        adapters.insert(format!("{prefix}.{LORA_A}"), a);
        adapters.insert(format!("{prefix}.{LORA_B}"), Tensor::zeros((out_dim, rank), dtype, device)?);
    }
    if adapters.is_empty() {
        return Err(bad_input(
            "--finetune lora",
            "the UNet has no attention projections (attn1/attn2 to_q, to_k, to_v, to_out.0)",
            "use --finetune full",
        ));
    }
    Ok(adapters)
}

/// `U(-bound, bound)` in f32 on the CPU from a seed.
fn seeded_uniform(seed: u64, shape: (usize, usize), bound: f64) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.0 * shape.1;
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-bound as f32..bound as f32)).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// The weights on `device` in `dtype`.
fn to_model(weights: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    weights.into_iter().map(|(k, v)| Ok((k, v.to_device(device)?.to_dtype(dtype)?))).collect()
}

fn build_unet(
    tensors: HashMap<String, Tensor>,
    cfg: &UNet2DConditionModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<UNet2DConditionModel> {
    Ok(UNet2DConditionModel::new(VarBuilder::from_tensors(tensors, dtype, device), cfg.clone())?)
}

/// Stage 2 state: a trainable copy of the UNet (full: every weight a `Var`; LoRA: the adapters
/// only) and its optimizer.
pub struct LayeredFinetune {
    /// Steps done so far.
    pub step: usize,
    /// The loss of every step done, `losses[i].step == i` (steps are numbered from 0).
    pub losses: Vec<StepLoss>,
    mode: FinetuneMode,
    /// The model that trains: its trained tensors are the `Var`s (for a half-precision model,
    /// the optimizer's copies of them in its dtype).
    train_unet: UNet2DConditionModel,
    /// The same weights, detached, sharing their storage: the model to sample from.
    unet: UNet2DConditionModel,
    /// The trained tensors' variables (f32 master copies for a half-precision model: f16 weights
    /// would round the updates of a 2e-6 learning rate away), with their optimizer.
    adam: Adam,
    /// Only the object term, `lambda_o L_o` (one UNet forward of batch 1 per step).
    object_only: bool,
    /// Recompute activations in the backward instead of keeping them (see
    /// [`checkpoint`](crate::models::checkpoint)).
    gradient_checkpointing: bool,
}

impl LayeredFinetune {
    /// `weights`: the UNet's tensors by diffusers name (`ModelFiles::tensors(Component::Unet, ..)`),
    /// `cfg` its config. Full mode copies them into variables; LoRA mode keeps them as frozen
    /// tensors and adds rank-`lora_rank` adapters.
    pub fn new(
        weights: HashMap<String, Tensor>,
        cfg: UNet2DConditionModelConfig,
        mode: FinetuneMode,
        lora_rank: usize,
        lr: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let weights = to_model(weights, dtype, device)?;
        let trained = match mode {
            FinetuneMode::Full => weights.clone(),
            FinetuneMode::Lora => {
                if lora_rank == 0 {
                    return Err(bad_input("--lora-rank", "0", "give a rank of at least 1 (4 is the default)"));
                }
                fresh_adapters(&weights, lora_rank, dtype, device)?
            }
        };
        Self::build(weights, &cfg, mode, trained, 0, Vec::new(), lr, dtype, device)
    }

    /// The model with `trained` (names as [`LayeredFinetune::trained_tensors`]) as variables.
    #[allow(clippy::too_many_arguments)]
    fn build(
        weights: HashMap<String, Tensor>,
        cfg: &UNet2DConditionModelConfig,
        mode: FinetuneMode,
        trained: HashMap<String, Tensor>,
        step: usize,
        losses: Vec<StepLoss>,
        lr: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        check_lr(lr, "--finetune-lr")?;
        // Each tensor given is dropped once its variable is made, before Adam's moments exist:
        // for full fine-tuning the given weights are a model's worth of memory at the peak.
        let frozen = match mode {
            FinetuneMode::Full => {
                drop(weights);
                HashMap::new()
            }
            FinetuneMode::Lora => weights,
        };
        let mut trained: Vec<(String, Tensor)> = trained.into_iter().collect();
        trained.sort_by(|a, b| a.0.cmp(&b.0));
        let master = master_dtype(dtype);
        let vars = trained
            .into_iter()
            .map(|(name, t)| Ok((name, Var::from_tensor(&t.to_device(device)?.to_dtype(master)?.detach())?)))
            .collect::<Result<Vec<(String, Var)>>>()?;
        let adam = Adam::with_model_copies(vars, AdamParams { lr, ..Default::default() }, dtype)?;
        let (train_unet, unet) = Self::models(&adam, &frozen, cfg, dtype, device)?;
        Ok(Self {
            step,
            losses,
            mode,
            train_unet,
            unet,
            adam,
            object_only: false,
            gradient_checkpointing: false,
        })
    }

    /// Trains on `lambda_o L_o` alone (Eq. 4, one UNet forward of batch 1 per step; `lambda_b` is
    /// ignored and the background layer's data unused). Imagic's stage 2.
    pub fn object_only(mut self) -> Self {
        self.object_only = true;
        self
    }

    /// Gradient checkpointing (see [`checkpoint`](crate::models::checkpoint)): each step keeps
    /// the outputs of the UNet's layers (resnets, transformers, samplers) only and runs each layer
    /// again in its backward, a third more arithmetic for a fraction of the activations' memory.
    /// Either way full fine-tuning's backward goes a layer at a time, Adam stepping each layer's
    /// weights as soon as their gradients exist (with checkpointing LoRA's does too).
    /// The same steps as without, to rounding (sums in another order).
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.gradient_checkpointing = on;
        self
    }

    /// The UNet of the frozen weights and the trained ones on the graph, and the same detached
    /// (the model to sample from, and the gradient-checkpointed forward's). The two share storage,
    /// the variables' or, for a half-precision model, their copies in its dtype, which every step
    /// updates in place: built once, they stay current.
    fn models(
        adam: &Adam,
        frozen: &HashMap<String, Tensor>,
        cfg: &UNet2DConditionModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<(UNet2DConditionModel, UNet2DConditionModel)> {
        let (mut train, mut detached) = (frozen.clone(), frozen.clone());
        for (name, var) in adam.model_vars() {
            detached.insert(name.to_string(), var.as_tensor().detach());
            train.insert(name.to_string(), var.as_tensor().clone());
        }
        Ok((build_unet(train, cfg, dtype, device)?, build_unet(detached, cfg, dtype, device)?))
    }

    pub fn mode(&self) -> FinetuneMode {
        self.mode
    }

    /// Eq. 4-6: runs steps `self.step .. until` (numbered from 0; errors count from 1), `e_bar` frozen (detached, never changed).
    /// Same batching and randomness rule as stage 1, from a different random stream.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        e_bar: &Tensor,
        lambda_object: f64,
        lambda_background: f64,
        schedule: &TrainSchedule,
        data: &LayeredLatents,
        seed: u64,
        until: usize,
        on_step: &mut dyn FnMut(StepLoss),
    ) -> Result<()> {
        check_layers(data)?;
        for (flag, v) in [("--lambda-object", lambda_object), ("--lambda-background", lambda_background)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad_input(flag, format!("{v} is not a non-negative weight"), "give a number >= 0"));
            }
        }
        let e_bar = e_bar.detach();
        let fix = format!("lower --finetune-lr (now {})", self.adam.params().lr);
        // The frozen convolutions' flipped kernels (LoRA's: all of them), made once for the loop.
        let _kept = crate::models::nn::keep_flipped_kernels()?;
        let start = self.step;
        while self.step < until {
            let noisy = noisy_step(schedule, data, seed, STAGE2_STREAM, self.step)?;
            let value = self.train_step(&noisy, data, &e_bar, lambda_object, lambda_background, &fix)?;
            let step_loss = StepLoss { step: self.step, loss: value };
            self.step += 1;
            self.losses.push(step_loss);
            on_step(step_loss);
        }
        // Weights that overflowed in the last step would only show when sampling: check once.
        if self.step > start {
            let weights = self.adam.vars().map(|(name, var)| (format!("the weight {name}"), var.as_tensor()));
            check_finite(weights, STAGE2, self.step, &fix)?;
        }
        Ok(())
    }

    /// One step: the loss (Eq. 6, or `lambda_o L_o` alone), its gradients, Adam. Returns the loss.
    fn train_step(
        &mut self,
        noisy: &NoisyStep,
        data: &LayeredLatents,
        e_bar: &Tensor,
        lambda_object: f64,
        lambda_background: f64,
        fix: &str,
    ) -> Result<f64> {
        let (input, context) =
            if self.object_only { (noisy.subject.clone(), e_bar.clone()) } else { layer_batch(noisy, e_bar, e_bar)? };
        let timesteps = Tensor::full(noisy.t as f32, input.dim(0)?, input.device())?;
        let loss_of = |pred: &Tensor| -> Result<Tensor> {
            if self.object_only {
                Ok((object_term_of(pred, noisy, data)? * lambda_object)?)
            } else {
                layered_finetune_of(pred, lambda_object, lambda_background, noisy, data)
            }
        };
        // LoRA's gradients are small: one backward, and Adam's steps batched over all adapters.
        if !self.gradient_checkpointing && self.mode == FinetuneMode::Lora {
            let loss = loss_of(&self.train_unet.forward_timesteps(&input, &timesteps, &context)?)?;
            self.adam.backward_step(&loss)?;
            return finite_step(&loss, &[], "", STAGE2, self.step + 1, fix);
        }
        // Full fine-tuning's gradients are as large as the weights: each segment's are stepped
        // and gone before the next segment's backward.
        let mut tape = if self.gradient_checkpointing {
            Tape::checkpointed(&self.unet, &self.train_unet)
        } else {
            Tape::keeping(&self.train_unet)
        };
        let (x, t, c) = (tape.input(&input, false), tape.input(&timesteps, false), tape.input(&context, false));
        let out = self.train_unet.forward_segments(&mut tape, x, t, c)?;
        let pred = Var::from_tensor(tape.value(out))?;
        let loss = loss_of(pred.as_tensor())?;
        let grad = loss.backward()?.get(pred.as_tensor()).cloned();
        let grad = grad.ok_or_else(|| candle_core::Error::Msg("the loss does not depend on the prediction".into()))?;
        let adam = &mut self.adam;
        tape.backward(vec![(out, grad)], |grads| adam.step(grads))?;
        finite_step(&loss, &[], "", STAGE2, self.step + 1, fix)
    }

    /// The fine-tuned UNet to sample from (stage 3): frozen weights sharing storage with the
    /// trained variables, so it is always current and records no graph.
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// [`LayeredFinetune::unet`] alone, the training state freed: Adam's moments, the f32
    /// masters of a half-precision model and the model on the graph. For full fine-tuning that
    /// is six times the UNet's bf16 size (6.9 GB of moments, 3.4 GB of masters), which sampling
    /// does not need.
    pub fn into_unet(self) -> UNet2DConditionModel {
        self.unet
    }

    /// The fine-tuned tensors to store in a session (snapshots, on the host): full → every
    /// trained weight by its diffusers name (not a delta: see the module docs); LoRA → the
    /// adapters, `<module>.lora_A.weight` `[r, in]` and `<module>.lora_B.weight` `[out, r]`.
    /// In the model's dtype, so a session holds what the sampling model used. On the host because
    /// they go to disk: snapshots on a GPU were a model's size more at a full fine-tuning edit's
    /// peak.
    pub fn trained_tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.adam.model_vars().map(|(name, var)| Ok((name.to_string(), snapshot(var)?))).collect()
    }

    /// Rebuilds the fine-tuned UNet (no optimizer) from the original weights and
    /// [`LayeredFinetune::trained_tensors`]; its outputs equal those of [`LayeredFinetune::unet`]
    /// bit for bit.
    pub fn load_trained(
        weights: HashMap<String, Tensor>,
        cfg: UNet2DConditionModelConfig,
        mode: FinetuneMode,
        lora_rank: usize,
        trained: &HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<UNet2DConditionModel> {
        let mut tensors = to_model(weights, dtype, device)?;
        check_trained(&tensors, mode, lora_rank, trained)?;
        for (name, t) in trained {
            tensors.insert(name.clone(), t.to_device(device)?.to_dtype(dtype)?);
        }
        build_unet(tensors, &cfg, dtype, device)
    }

    /// Everything needed to resume bit for bit: the variables under `var.` (f32 for a
    /// half-precision model), the optimizer's
    /// state under `adam.`, `step` (i64 scalar) and `losses` (f64). The `var.` tensors are views of
    /// the live variables, not copies (a full UNet copy would cost its size again in device memory):
    /// write them out before the next [`LayeredFinetune::run`].
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut state: HashMap<String, Tensor> = prefixed(self.adam.state(), "adam.").collect();
        state.extend(self.adam.vars().map(|(name, var)| (format!("var.{name}"), var.as_tensor().detach())));
        state.insert("step".into(), step_tensor(self.step));
        state.insert("losses".into(), losses_tensor(&self.losses));
        state
    }

    /// Resumes from [`LayeredFinetune::state`], with the same original weights, mode and rank.
    #[allow(clippy::too_many_arguments)]
    pub fn from_state(
        weights: HashMap<String, Tensor>,
        cfg: UNet2DConditionModelConfig,
        mode: FinetuneMode,
        lora_rank: usize,
        lr: f64,
        dtype: DType,
        device: &Device,
        state: &HashMap<String, Tensor>,
    ) -> Result<Self> {
        let what = "stage 2 checkpoint";
        let weights = to_model(weights, dtype, device)?;
        let trained = unprefixed(state, "var.");
        check_trained(&weights, mode, lora_rank, &trained)?;
        let step = entry(state, "step", what)?.to_dtype(DType::F64)?.to_scalar::<f64>()? as usize;
        let losses = losses_from(entry(state, "losses", what)?)?;
        let mut s = Self::build(weights, &cfg, mode, trained, step, losses, lr, dtype, device)?;
        s.adam.load_state(&unprefixed(state, "adam."), what)?;
        Ok(s)
    }
}

/// Trained tensors fit the mode and the model: full → weights of the model, all of them when
/// resuming; LoRA → adapters of its attention projections.
fn check_trained(
    weights: &HashMap<String, Tensor>,
    mode: FinetuneMode,
    lora_rank: usize,
    trained: &HashMap<String, Tensor>,
) -> Result<()> {
    let what = "fine-tuned weights";
    if trained.is_empty() {
        return Err(bad_input(what, "none stored", "store the session's fine-tuned weights, or run stage 2 again"));
    }
    for (name, t) in trained {
        let ok = match mode {
            FinetuneMode::Full => weights.get(name).is_some_and(|w| w.dims() == t.dims()),
            FinetuneMode::Lora => {
                let module =
                    name.strip_suffix(&format!(".{LORA_A}")).or_else(|| name.strip_suffix(&format!(".{LORA_B}")));
                let rank = if name.ends_with(LORA_A) { t.dim(0).ok() } else { t.dim(1).ok() };
                rank == Some(lora_rank)
                    && module.is_some_and(|m| {
                        weights.contains_key(&format!("{m}.weight")) && lora_target(&format!("{m}.weight")).is_some()
                    })
            }
        };
        if !ok {
            let mode_name = match mode {
                FinetuneMode::Full => "full",
                FinetuneMode::Lora => "lora",
            };
            return Err(bad_input(
                what,
                format!(
                    "`{name}` ({:?}) does not fit this UNet with --finetune {mode_name} (--lora-rank {lora_rank})",
                    t.dims()
                ),
                "use the model, --finetune mode and --lora-rank the session was made with",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_targets_are_the_attention_projections() {
        let tb = "down_blocks.0.attentions.0.transformer_blocks.0";
        for p in ["attn1.to_q", "attn1.to_k", "attn2.to_v", "attn2.to_out.0"] {
            assert_eq!(lora_target(&format!("{tb}.{p}.weight")), Some(format!("{tb}.{p}").as_str()));
        }
        for n in [
            format!("{tb}.attn2.to_out.0.bias"),
            format!("{tb}.ff.net.2.weight"),
            format!("{tb}.norm1.weight"),
            "down_blocks.0.attentions.0.proj_in.weight".to_string(),
            "mid_block.attentions.0.to_q.weight".to_string(),
        ] {
            assert_eq!(lora_target(&n), None, "{n}");
        }
    }

    #[test]
    fn lambda_object_rule() {
        assert_eq!(lambda_object(None, 0.5), 2.0);
        assert_eq!(lambda_object(None, 0.05), 3.0);
        assert_eq!(lambda_object(None, 0.1), 2.0);
        assert_eq!(lambda_object(Some(1.5), 0.05), 1.5);
    }
}
