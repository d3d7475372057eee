//! Stage 1, layered controlled optimization (paper Eq. 2) and the embedding interpolation (Eq. 3).
//!
//! With the UNet frozen, the object embedding `e_o` (from `c(T_o)`) and the background embedding
//! `e_b` (from `c(T_b)`) are optimized together with Adam:
//! ```text
//! L1 = || M_s (.) (eps - eps_theta(z_s,t, t, e_o)) ||^2 + || (1 - M_b) (.) (eps - eps_theta(z_b,t, t, e_b)) ||^2
//! ```
//! then mixed, `e_bar = alpha e_o* + (1 - alpha) e_b*` ([`interpolate_embeddings`]).
//!
//! The pieces shared with stage 2 live here too: the masked loss ([`masked_mse`]), the step's
//! noisy latents ([`noisy_step`], a pure function of the seed and the step) and the two layer terms
//! from one batched UNet forward ([`layer_terms`]).

use super::adam::{Adam, AdamParams};
use super::{LayeredLatents, StepLoss};
use crate::error::{bad_input, Result};
use crate::models::unet_2d::UNet2DConditionModel;
use crate::pipeline::{seeded_noise, splitmix64};
use crate::schedulers::TrainSchedule;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// Random streams of the stages: stage 1 and stage 2 draw different `t` and noise for the same
/// seed and step.
pub(crate) const STAGE1_STREAM: u64 = 0x5354_4147_4531; // "STAGE1"
pub(crate) const STAGE2_STREAM: u64 = 0x5354_4147_4532; // "STAGE2"

/// The seed of one draw of one step of one stage.
fn draw_seed(seed: u64, stream: u64, step: usize, draw: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed ^ stream) ^ step as u64) ^ draw)
}

/// `||mask (.) (eps - pred)||^2`: the mean over all latent elements of `(mask * (eps - pred))^2`,
/// the mask `[b, 1, h, w]` broadcast over the channels. Computed in f32 at least.
pub fn masked_mse(pred: &Tensor, eps: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let dtype = match pred.dtype() {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let residual = (eps.to_dtype(dtype)? - pred.to_dtype(dtype)?)?;
    Ok(residual.broadcast_mul(&mask.to_dtype(dtype)?)?.sqr()?.mean_all()?)
}

/// One training step's draw: the timestep, the noisy latents of each layer and the UNet's target
/// for them.
#[derive(Debug, Clone)]
pub struct NoisyStep {
    /// `t ~ U{0 .. num_train_timesteps - 1}`.
    pub t: usize,
    /// The subject layer's target (`eps`, or `v` for a v-prediction model, see
    /// [`TrainSchedule::target`]) and `z_s,t = sqrt(abar_t) z_s + sqrt(1 - abar_t) eps`.
    pub subject_target: Tensor,
    pub subject: Tensor,
    /// The background layer's target and `z_b,t`.
    pub background_target: Tensor,
    pub background: Tensor,
}

/// The draw of step `step` of the stage `stream` (a pure function of `(seed, stream, step)`, so a
/// run in chunks or resumed draws exactly what one uninterrupted run draws). The noise is drawn on
/// the CPU ([`seeded_noise`]), so a seed gives the same draw on every device.
pub fn noisy_step(schedule: &TrainSchedule, data: &LayeredLatents, seed: u64, stream: u64, step: usize) -> Result<NoisyStep> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(draw_seed(seed, stream, step, 0));
    let t = rng.random_range(0..schedule.num_timesteps()?);
    let noisy = |z: &Tensor, draw: u64| -> Result<(Tensor, Tensor)> {
        let eps = seeded_noise(draw_seed(seed, stream, step, draw), z.dims(), z.device(), z.dtype())?;
        Ok((schedule.target(z, &eps, &[t])?, schedule.add_noise(z, &eps, &[t])?))
    };
    let (subject_target, subject) = noisy(&data.subject, 1)?;
    let (background_target, background) = noisy(&data.background, 2)?;
    Ok(NoisyStep { t, subject_target, subject, background_target, background })
}

/// Checks that the two layers can share one batched UNet call: latents `[1, c, h, w]` of one
/// size, masks `[1, 1, h, w]`.
pub fn check_layers(data: &LayeredLatents) -> Result<()> {
    let z = data.subject.dims();
    if z.len() != 4 || z[0] != 1 {
        return Err(bad_input(
            "subject latents",
            format!("shape {z:?}, expected [1, channels, h, w]"),
            "encode one subject image",
        ));
    }
    if data.background.dims() != z {
        return Err(bad_input(
            "background latents",
            format!("shape {:?}, the subject's is {z:?}", data.background.dims()),
            "give a background image of the subject image's size",
        ));
    }
    let mask_shape = [1, 1, z[2], z[3]];
    for (what, m) in [("subject mask", &data.subject_mask), ("background mask", &data.background_mask)] {
        if m.dims() != mask_shape {
            return Err(bad_input(
                what,
                format!("shape {:?} at latent size, expected {mask_shape:?}", m.dims()),
                "resize the mask to the image's size",
            ));
        }
    }
    Ok(())
}

/// The two layer terms from ONE batched UNet forward (batch `[z_s,t; z_b,t]`, contexts
/// `[context_object; context_background]`, the step's `t` for both):
/// `(||M_s (.) (eps_s - eps_theta(z_s,t, t, context_object))||^2,
///   ||(1 - M_b) (.) (eps_b - eps_theta(z_b,t, t, context_background))||^2)`.
pub fn layer_terms(
    unet: &UNet2DConditionModel,
    noisy: &NoisyStep,
    data: &LayeredLatents,
    context_object: &Tensor,
    context_background: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (input, context) = layer_batch(noisy, context_object, context_background)?;
    let pred = unet.forward(&input, noisy.t as f64, &context)?;
    layer_terms_of(&pred, noisy, data)
}

/// The batch of one UNet call for both layers: `[z_s,t; z_b,t]` and `[context_object; context_background]`.
pub fn layer_batch(noisy: &NoisyStep, context_object: &Tensor, context_background: &Tensor) -> Result<(Tensor, Tensor)> {
    let input = Tensor::cat(&[&noisy.subject, &noisy.background], 0)?;
    Ok((input, Tensor::cat(&[context_object, context_background], 0)?))
}

/// [`layer_terms`] from the UNet's prediction for [`layer_batch`].
pub fn layer_terms_of(pred: &Tensor, noisy: &NoisyStep, data: &LayeredLatents) -> Result<(Tensor, Tensor)> {
    let object = masked_mse(&pred.narrow(0, 0, 1)?, &noisy.subject_target, &data.subject_mask)?;
    let background_weight = data.background_mask.affine(-1.0, 1.0)?;
    let background = masked_mse(&pred.narrow(0, 1, 1)?, &noisy.background_target, &background_weight)?;
    Ok((object, background))
}

/// The object layer's term alone, from a UNet forward of batch 1 (half the cost of
/// [`layer_terms`]): `||M_s (.) (eps_s - eps_theta(z_s,t, t, context))||^2`. For the baselines
/// (Imagic) that train on one image with no background layer.
pub fn object_term(
    unet: &UNet2DConditionModel,
    noisy: &NoisyStep,
    data: &LayeredLatents,
    context: &Tensor,
) -> Result<Tensor> {
    let pred = unet.forward(&noisy.subject, noisy.t as f64, context)?;
    object_term_of(&pred, noisy, data)
}

/// [`object_term`] from the UNet's prediction for `z_s,t`.
pub fn object_term_of(pred: &Tensor, noisy: &NoisyStep, data: &LayeredLatents) -> Result<Tensor> {
    masked_mse(pred, &noisy.subject_target, &data.subject_mask)
}

/// Eq. 2: `L1 = ||M_s (.) (eps - eps_theta(z_s,t, t, e_o))||^2 + ||(1 - M_b) (.) (eps - eps_theta(z_b,t, t, e_b))||^2`.
pub fn layered_optimization(
    unet: &UNet2DConditionModel,
    e_o: &Tensor,
    e_b: &Tensor,
    noisy: &NoisyStep,
    data: &LayeredLatents,
) -> Result<Tensor> {
    let (object, background) = layer_terms(unet, noisy, data, e_o, e_b)?;
    Ok((object + background)?)
}

/// The step's loss as a finite number, or the one-line error of a diverged stage, also when one
/// of `tensors` (named `what`) holds an inf or a NaN; read from the device in one transfer.
///
/// Call it once the step's work is all issued: a read waits for the device to finish everything
/// before it, and a read between the forward and the backward would leave a GPU idle while the
/// host issues the backward (a training step on a GPU is mostly the host's cost per op).
pub(crate) fn finite_step(loss: &Tensor, tensors: &[&Tensor], what: &str, stage: &str, step: usize, fix: &str) -> Result<f64> {
    let mut values = vec![loss.to_dtype(DType::F64)?.reshape(1)?];
    for t in tensors {
        values.push(nonfinite_probe(t)?.reshape(1)?);
    }
    let values = Tensor::cat(&values, 0)?.to_vec1::<f64>()?;
    if !values[0].is_finite() {
        return Err(bad_input(stage, format!("the loss became {} at step {step}", values[0]), fix));
    }
    if let Some(i) = values[1..].iter().position(|v| !v.is_finite()) {
        return Err(diverged(tensors[i], stage, what, step, fix));
    }
    Ok(values[0])
}

/// The error of a diverged stage when one of `tensors` (each with its name) holds an inf or a
/// NaN; read from the device in one transfer.
pub(crate) fn check_finite<'a>(tensors: impl IntoIterator<Item = (String, &'a Tensor)>, stage: &str, step: usize, fix: &str) -> Result<()> {
    let tensors: Vec<(String, &Tensor)> = tensors.into_iter().collect();
    if tensors.is_empty() {
        return Ok(());
    }
    let probes = tensors.iter().map(|(_, t)| Ok(nonfinite_probe(t)?.reshape(1)?)).collect::<Result<Vec<_>>>()?;
    let probes = Tensor::cat(&probes, 0)?.to_vec1::<f64>()?;
    match probes.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(diverged(tensors[i].1, stage, &tensors[i].0, step, fix)),
        None => Ok(()),
    }
}

/// `sum(0 t)`, as f64: 0 where every element of `t` is finite, NaN where one is not (`0 inf` and
/// `0 NaN` are NaN, and NaN propagates through a sum, where a max would skip it). In `t`'s dtype,
/// each row of `t` as a matrix summed apart first: on a GPU a reduction runs a block per output,
/// so a sum of all of a weight ran on one block (72 ms over full fine-tuning's weights on an
/// H200; a sum of `|t|` in f64 took 0.86 s). Detached: on a variable's graph each probe would keep
/// its `0 t`, a copy of every weight while the probes are gathered.
fn nonfinite_probe(t: &Tensor) -> Result<Tensor> {
    let t = t.detach();
    let rows = if t.rank() >= 2 { t.flatten_from(1)? } else { t.reshape((1, t.elem_count()))? };
    Ok(rows.affine(0.0, 0.0)?.sum(1)?.sum_all()?.to_dtype(DType::F64)?)
}

/// The error of `t` (named `what`) holding an inf or a NaN: which, from `sum |t|` in f64 (NaN
/// where one is NaN, else infinite).
fn diverged(t: &Tensor, stage: &str, what: &str, step: usize, fix: &str) -> crate::error::Error {
    let sum = t.to_dtype(DType::F64).and_then(|t| t.abs()?.sum_all()?.to_scalar::<f64>());
    let kind = match sum {
        Ok(sum) if sum.is_nan() => "NaN",
        Ok(_) => "infinite",
        Err(_) => "not finite",
    };
    bad_input(stage, format!("{what} became {kind} at step {step}"), fix)
}

/// The step count as an i64 scalar on the CPU.
pub(crate) fn step_tensor(step: usize) -> Tensor {
    Tensor::new(step as i64, &Device::Cpu).expect("a scalar tensor")
}

/// Losses as a CPU f64 tensor, for checkpoints.
pub(crate) fn losses_tensor(losses: &[StepLoss]) -> Tensor {
    let values: Vec<f64> = losses.iter().map(|l| l.loss).collect();
    Tensor::from_vec(values, losses.len(), &Device::Cpu).expect("a 1-D tensor")
}

/// Reads back [`losses_tensor`]: step `i`'s loss at `i`.
pub(crate) fn losses_from(t: &Tensor) -> Result<Vec<StepLoss>> {
    let values = t.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.to_vec1::<f64>()?;
    Ok(values.into_iter().enumerate().map(|(step, loss)| StepLoss { step, loss }).collect())
}

/// A checkpoint's entry, or the error naming what is missing.
pub(crate) fn entry<'a>(state: &'a HashMap<String, Tensor>, key: &str, what: &str) -> Result<&'a Tensor> {
    state.get(key).ok_or_else(|| {
        bad_input(
            what,
            format!("the checkpoint lacks `{key}`"),
            "resume from a checkpoint of the same stage, or start over",
        )
    })
}

/// The optimizer's part of a checkpoint, under `adam.`.
pub(crate) fn prefixed(state: HashMap<String, Tensor>, prefix: &str) -> impl Iterator<Item = (String, Tensor)> + '_ {
    state.into_iter().map(move |(k, v)| (format!("{prefix}{k}"), v))
}

pub(crate) fn unprefixed(state: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    state.iter().filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone()))).collect()
}

/// A snapshot of a variable's current value (the variable's own storage is overwritten by later
/// steps), on the host, where what it is taken for (a session) goes to disk.
pub(crate) fn snapshot(var: &Var) -> Result<Tensor> {
    let t = var.as_tensor().detach();
    Ok(if t.device().is_cpu() { t.copy()? } else { t.to_device(&Device::Cpu)? })
}

const STAGE1: &str = "stage 1 (layered optimization)";

/// Stage 1 state: the two embeddings being optimized and their optimizer (resumable).
pub struct LayeredOptimization {
    /// Steps done so far.
    pub step: usize,
    /// The loss of every step done, `losses[i].step == i` (steps are numbered from 0).
    pub losses: Vec<StepLoss>,
    /// The variables, in f32 for a half-precision model (master copies: an f16 embedding would
    /// round small Adam updates away), in the model's dtype otherwise.
    e_o: Var,
    e_b: Var,
    /// The model's dtype.
    dtype: DType,
    /// The embeddings in the model's dtype, detached: views of the variables (always current)
    /// when the dtypes agree, refreshed after each step otherwise.
    object: Tensor,
    background: Tensor,
    adam: Adam,
    /// Only the object term ([`object_term`]): `e_b` gets no gradient and stays as it started.
    object_only: bool,
}

/// The dtype trained variables are kept in: f32 for half-precision models.
pub(crate) fn master_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

impl LayeredOptimization {
    /// Starts from `e_o = c(T_o)`, `e_b = c(T_b)` (each `[1, 77, D]`; copied, not modified).
    pub fn new(e_o: &Tensor, e_b: &Tensor, lr: f64) -> Result<Self> {
        if e_o.dims() != e_b.dims() || e_o.rank() != 3 || e_o.dim(0)? != 1 {
            return Err(bad_input(
                "stage 1 embeddings",
                format!("shapes {:?} and {:?}, expected two [1, tokens, dim]", e_o.dims(), e_b.dims()),
                "encode both layer texts with the same text encoder",
            ));
        }
        Self::with_vars(e_o, e_b, e_o.dtype(), 0, Vec::new(), lr)
    }

    /// Variables copied from `e_o`, `e_b` for a model in `dtype`.
    fn with_vars(
        e_o: &Tensor,
        e_b: &Tensor,
        dtype: DType,
        step: usize,
        losses: Vec<StepLoss>,
        lr: f64,
    ) -> Result<Self> {
        check_lr(lr, "--embedding-lr")?;
        let var = |e: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&e.detach().to_dtype(master_dtype(dtype))?)?) };
        let (e_o, e_b) = (var(e_o)?, var(e_b)?);
        let vars = vec![("e_o".to_string(), e_o.clone()), ("e_b".to_string(), e_b.clone())];
        let adam = Adam::new(vars, AdamParams { lr, ..Default::default() })?;
        let (object, background) =
            (e_o.as_tensor().detach().to_dtype(dtype)?, e_b.as_tensor().detach().to_dtype(dtype)?);
        Ok(Self { step, losses, e_o, e_b, dtype, object, background, adam, object_only: false })
    }

    /// Trains on the object term alone (one UNet forward of batch 1 per step): the loss is
    /// `||M_s (.) (eps - eps_theta(z_s,t, t, e_o))||^2`, `e_b` never changes. Imagic's stage 1.
    pub fn object_only(mut self) -> Self {
        self.object_only = true;
        self
    }

    /// Eq. 2: runs steps `self.step .. until` (numbered from 0; nothing when `until <= self.step`), the UNet
    /// frozen. Each step draws `t` and the noise of both layers from `(seed, step)` alone
    /// ([`noisy_step`]), so chunks and resumed runs equal one uninterrupted run bit for bit.
    /// `on_step` gets each step's loss.
    pub fn run(
        &mut self,
        unet: &UNet2DConditionModel,
        schedule: &TrainSchedule,
        data: &LayeredLatents,
        seed: u64,
        until: usize,
        on_step: &mut dyn FnMut(StepLoss),
    ) -> Result<()> {
        check_layers(data)?;
        // The frozen UNet's flipped kernels, made once for the loop (on a GPU).
        let _kept = crate::models::nn::keep_flipped_kernels()?;
        let fix = format!("lower --embedding-lr (now {})", self.adam.params().lr);
        while self.step < until {
            let noisy = noisy_step(schedule, data, seed, STAGE1_STREAM, self.step)?;
            // In the model's dtype, on the graph (a no-op when the dtypes agree).
            let (e_o, e_b) = (self.e_o.as_tensor().to_dtype(self.dtype)?, self.e_b.as_tensor().to_dtype(self.dtype)?);
            let loss = if self.object_only {
                object_term(unet, &noisy, data, &e_o)?
            } else {
                layered_optimization(unet, &e_o, &e_b, &noisy, data)?
            };
            self.adam.backward_step(&loss)?;
            if self.dtype != self.e_o.dtype() {
                self.object = self.e_o.as_tensor().detach().to_dtype(self.dtype)?;
                self.background = self.e_b.as_tensor().detach().to_dtype(self.dtype)?;
            }
            // A step can also blow the embeddings up without a bad loss yet: say so at this step.
            let embeddings = [self.e_o.as_tensor(), self.e_b.as_tensor()];
            let value = finite_step(&loss, &embeddings, "the embeddings", STAGE1, self.step + 1, &fix)?;
            let step_loss = StepLoss { step: self.step, loss: value };
            self.step += 1;
            self.losses.push(step_loss);
            on_step(step_loss);
        }
        Ok(())
    }

    /// `e_o*` in the model's dtype, detached; may be a view of the live variable (later steps
    /// change it; `.copy()` keeps a snapshot).
    pub fn object(&self) -> &Tensor {
        &self.object
    }

    /// `e_b*` in the model's dtype, as [`LayeredOptimization::object`].
    pub fn background(&self) -> &Tensor {
        &self.background
    }

    /// Everything needed to resume bit for bit: the variables `e_o`, `e_b` (f32 for a
    /// half-precision model), `object` (`e_o*` in the model's dtype, which [`Self::from_state`]
    /// reads the dtype from), `step` (i64 scalar), `losses` (f64), and the optimizer's state under
    /// `adam.`. Views of the live variables: write them out before the next
    /// [`LayeredOptimization::run`].
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut state: HashMap<String, Tensor> = prefixed(self.adam.state(), "adam.").collect();
        state.insert("e_o".into(), self.e_o.as_tensor().detach());
        state.insert("e_b".into(), self.e_b.as_tensor().detach());
        state.insert("object".into(), self.object.clone());
        state.insert("step".into(), step_tensor(self.step));
        state.insert("losses".into(), losses_tensor(&self.losses));
        state
    }

    /// Resumes from [`LayeredOptimization::state`] (the tensors on the device to run on).
    pub fn from_state(state: &HashMap<String, Tensor>, lr: f64) -> Result<Self> {
        let what = "stage 1 checkpoint";
        let (e_o, e_b) = (entry(state, "e_o", what)?, entry(state, "e_b", what)?);
        let dtype = entry(state, "object", what)?.dtype();
        let step = entry(state, "step", what)?.to_dtype(DType::F64)?.to_scalar::<f64>()? as usize;
        let losses = losses_from(entry(state, "losses", what)?)?;
        let mut s = Self::with_vars(e_o, e_b, dtype, step, losses, lr)?;
        s.adam.load_state(&unprefixed(state, "adam."), what)?;
        Ok(s)
    }
}

pub(crate) fn check_lr(lr: f64, flag: &str) -> Result<()> {
    if !(lr.is_finite() && lr > 0.0) {
        return Err(bad_input(flag, format!("{lr} is not a positive learning rate"), "give a positive number"));
    }
    Ok(())
}

/// Eq. 3: `e_bar = alpha e_o* + (1 - alpha) e_b*`, alpha in [0, 1]. Alpha 1 and 0 give copies of
/// the pure layers exactly.
pub fn interpolate_embeddings(object: &Tensor, background: &Tensor, alpha: f64) -> Result<Tensor> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(bad_input(
            "--alpha",
            format!("{alpha} is outside [0, 1]"),
            "give the object layer's share, between 0 and 1 (0.7 is the default)",
        ));
    }
    if object.dims() != background.dims() {
        return Err(bad_input(
            "embeddings",
            format!("object {:?} and background {:?} differ in shape", object.dims(), background.dims()),
            "interpolate embeddings of the same text encoder",
        ));
    }
    let (object, background) = (object.detach(), background.detach());
    Ok(if alpha == 1.0 {
        object.copy()?
    } else if alpha == 0.0 {
        background.copy()?
    } else {
        ((object * alpha)? + (background * (1.0 - alpha))?)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The finiteness checks pass finite tensors, huge values included (a sum of them would
    /// overflow), and name the first tensor holding an inf or a NaN, and which, in f32 and bf16.
    #[test]
    fn finiteness_checks_name_the_tensor_and_the_kind() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let t = |v: &[f32]| -> Result<Tensor> { Ok(Tensor::new(v, &dev)?.to_dtype(dtype)?) };
            let (huge, inf, nan) = (t(&[3e38, 3e38, -1.0])?, t(&[1.0, f32::INFINITY, 2.0])?, t(&[f32::NAN, f32::NEG_INFINITY])?);
            fn named<'a>(ts: &[(&str, &'a Tensor)]) -> Vec<(String, &'a Tensor)> {
                ts.iter().map(|(n, t)| (n.to_string(), *t)).collect()
            }
            check_finite(named(&[("a", &huge)]), "stage 2", 7, "lower it")?;
            let err = check_finite(named(&[("a", &huge), ("b", &inf), ("c", &nan)]), "stage 2", 7, "lower it").unwrap_err().to_string();
            assert!(err.contains("b became infinite at step 7") && err.contains("lower it"), "{dtype:?}: {err}");
            let err = check_finite(named(&[("c", &nan), ("b", &inf)]), "stage 2", 7, "x").unwrap_err().to_string();
            assert!(err.contains("c became NaN"), "{dtype:?}: {err}");
            let loss = Tensor::new(0.5f32, &dev)?;
            assert_eq!(finite_step(&loss, &[&huge], "the embeddings", "stage 1", 3, "x")?, 0.5);
            let err = finite_step(&loss, &[&huge, &inf], "the embeddings", "stage 1", 3, "x").unwrap_err().to_string();
            assert!(err.contains("the embeddings became infinite at step 3"), "{dtype:?}: {err}");
        }
        Ok(())
    }

    /// A probe of a variable records no graph: on one, it would keep its weight-sized `0 t`
    /// alive, and the probes of full fine-tuning's weights a copy of the model (3.3 GB).
    #[test]
    fn finiteness_probes_of_variables_keep_no_graph() -> Result<()> {
        let var = candle_core::Var::from_tensor(&Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?)?;
        assert!(var.as_tensor().track_op());
        let probe = nonfinite_probe(var.as_tensor())?;
        assert!(!probe.track_op(), "the probe is on the variable's graph");
        assert_eq!(probe.to_scalar::<f64>()?, 0.0);
        Ok(())
    }

    #[test]
    fn masked_mse_is_the_mean_over_all_elements() -> Result<()> {
        let dev = Device::Cpu;
        let pred = Tensor::new(&[[[[1.0f64, 2.0]], [[3.0, 4.0]]]], &dev)?; // [1, 2, 1, 2]
        let eps = Tensor::zeros((1, 2, 1, 2), DType::F64, &dev)?;
        let mask = Tensor::new(&[[[[1.0f64, 0.5]]]], &dev)?; // [1, 1, 1, 2]
        let l = masked_mse(&pred, &eps, &mask)?.to_scalar::<f64>()?;
        // (1, 1, 9, 4) / 4
        assert_eq!(l, (1.0 + 1.0 + 9.0 + 4.0) / 4.0);
        Ok(())
    }

    #[test]
    fn draws_differ_between_steps_and_stages() {
        let a = draw_seed(7, STAGE1_STREAM, 3, 1);
        assert_ne!(a, draw_seed(7, STAGE1_STREAM, 4, 1));
        assert_ne!(a, draw_seed(7, STAGE2_STREAM, 3, 1));
        assert_ne!(a, draw_seed(7, STAGE1_STREAM, 3, 2));
        assert_eq!(a, draw_seed(7, STAGE1_STREAM, 3, 1));
    }
}
