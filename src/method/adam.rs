//! Adam, exactly as `torch.optim.Adam` (betas 0.9 / 0.999, eps 1e-8, no weight decay, no amsgrad,
//! bias correction), over named [`Var`]s; with `weight_decay`, `torch.optim.AdamW`.
//!
//! Our own rather than `candle_nn::AdamW` because that one keeps its step count and moments
//! private: a checkpoint must hold them for a killed run to resume bit for bit. [`Adam::state`]
//! exports them as named tensors, [`Adam::load_state`] imports them.
//!
//! The arithmetic follows torch's single-tensor implementation step by step:
//! ```text
//! m <- m + (1 - beta1) (g - m)                    (exp_avg.lerp_(grad, 1 - beta1))
//! v <- beta2 v + ((1 - beta2) g) g                (exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2))
//! denom = sqrt(v) / sqrt(1 - beta2^t) + eps
//! p <- p + (-lr / (1 - beta1^t)) m / denom        (param.addcdiv_(exp_avg, denom, -step_size))
//! ```
//! Moments are kept in f32 for half-precision variables (f16, bf16), in the variable's dtype
//! otherwise; the update is computed in the moments' dtype and cast back to the variable's.
//!
//! On the CPU in f32 the step writes the moments and the variable in place, three multi-threaded
//! passes (`FirstMoment`, `SecondMoment`, `Update`) with the same f32 operations in the same
//! order as the composed ops, so bit for bit the same: the composed step is eleven candle ops per
//! variable, each a single-threaded pass that allocates its result (for the 860 M weights of full
//! fine-tuning, 6.5 s a step on this 2-core machine, more when memory is given back).
//!
//! On a GPU the step is one fused kernel per variable ([`cuda_kernels::adam_step`]) with the same
//! operations in the same order, moments, variable and the model's half-precision copy written
//! in place: for full fine-tuning's 860 M weights the composed ops read and wrote about 175 GB a
//! step, the kernel 24 GB. It is checked against the composed step, bit for bit, on each device
//! before its first use ([`fused_step_ready`]); where it differs or cannot run, the step is
//! composed.

use crate::error::{bad_input, Result};
use crate::models::cuda_kernels::{self, AdamScalars};
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, DType, Device, DeviceLocation, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Mutex;

/// Adam's hyper-parameters; defaults as torch's.
#[derive(Debug, Clone, Copy)]
pub struct AdamParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (`torch.optim.AdamW`: `p <- p (1 - lr wd)` before the step); 0 is Adam.
    pub weight_decay: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One parameter and its optimizer state.
struct Slot {
    name: String,
    var: Var,
    /// The half-precision copy of `var` a model reads and a backward differentiates, set from
    /// `var` after each step ([`Adam::with_model_copies`]); `None`: the model reads `var`.
    model: Option<Var>,
    /// Steps taken by this parameter (torch counts per parameter: one with no gradient is skipped).
    step: u64,
    /// First moment (`exp_avg`).
    m: Tensor,
    /// Second moment (`exp_avg_sq`).
    v: Tensor,
}

/// The scalars of one step of one variable.
struct StepScalars {
    params: AdamParams,
    /// `lr / (1 - beta1^t)`.
    step_size: f64,
    /// `sqrt(1 - beta2^t)`.
    bias_correction2_sqrt: f64,
}

impl StepScalars {
    /// The scalars of step `t` (counted from 1).
    fn new(params: AdamParams, t: u64) -> Self {
        let t = t as i32;
        Self {
            params,
            step_size: params.lr / (1.0 - params.beta1.powi(t)),
            bias_correction2_sqrt: (1.0 - params.beta2.powi(t)).sqrt(),
        }
    }

    /// The constants in f32, as the in-place steps (CPU and GPU) take them.
    fn in_f32(&self) -> AdamScalars {
        let AdamParams { lr, beta1, beta2, eps, weight_decay } = self.params;
        AdamScalars {
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            decay: (weight_decay != 0.0).then_some((1.0 - lr * weight_decay) as f32),
            neg_step_size: -self.step_size as f32,
            inv_bias_correction2_sqrt: (1.0 / self.bias_correction2_sqrt) as f32,
            eps: eps as f32,
        }
    }
}

impl Slot {
    /// Whether the composed step can take this slot and `other` as one flat tensor: the same
    /// device, dtypes and step count.
    fn steps_with(&self, other: &Slot) -> bool {
        let dtype = |s: &Slot| (s.var.dtype(), s.m.dtype(), s.model.as_ref().map(|m| m.dtype()));
        self.var.device().same_device(other.var.device()) && dtype(self) == dtype(other) && self.step == other.step
    }

    /// Writes the variable into the model's copy, if it has one.
    fn update_model(&self) -> Result<()> {
        if let Some(model) = &self.model {
            model.set(&self.var.as_tensor().to_dtype(model.dtype())?)?;
        }
        Ok(())
    }

    /// The step as candle ops, on any device and dtype.
    fn step_composed(&mut self, g: &Tensor, s: &StepScalars) -> Result<()> {
        let p = self.var.as_tensor().detach();
        let (p, m, v) = composed_step(&p, g, &self.m, &self.v, s)?;
        self.var.set(&p.to_dtype(self.var.dtype())?)?;
        self.m = m;
        self.v = v;
        Ok(())
    }

    /// The same step written into the moments and the variable (contiguous f32 on the CPU).
    fn step_in_place(&mut self, g: &Tensor, s: &StepScalars) -> Result<()> {
        let c = s.in_f32();
        self.m.inplace_op2(g, &FirstMoment(c))?;
        self.v.inplace_op2(g, &SecondMoment(c))?;
        self.var.as_tensor().inplace_op3(&self.m, &self.v, &Update(c))?;
        Ok(())
    }

    /// The same step on a GPU, one kernel writing the moments, the variable and the model's copy
    /// (`g` the gradient as the backward gave it); `false` where it does not run, nothing written.
    fn step_fused(&mut self, g: &Tensor, s: &StepScalars) -> Result<bool> {
        let model = self.model.as_ref().map(Var::as_tensor);
        Ok(cuda_kernels::adam_step(self.var.as_tensor(), g, &self.m, &self.v, model, s.in_f32())?)
    }
}

/// Whether the fused step ([`cuda_kernels::adam_step`]) runs on `device`: a GPU with the fused
/// kernels, where the kernel gave the composed step's bits on random variables (with and
/// without a bf16 model copy and weight decay, two steps), checked once per device. A mismatch
/// is logged once, and the step composed there.
pub fn fused_step_ready(device: &Device) -> bool {
    static CHECKED: Mutex<Vec<(DeviceLocation, bool)>> = Mutex::new(Vec::new());
    if !device.is_cuda() {
        return false;
    }
    let Ok(mut checked) = CHECKED.lock() else { return false };
    if let Some((_, ready)) = checked.iter().find(|(at, _)| *at == device.location()) {
        return *ready;
    }
    let ready = match cuda_kernels::ready(device).then(|| fused_step_differs(device)) {
        None => false,
        Some(Ok(None)) => true,
        Some(Ok(Some(why))) => {
            tracing::warn!("Adam's fused CUDA step is not the composed step here ({why}): composing it instead");
            false
        }
        Some(Err(e)) => {
            tracing::warn!("Adam's fused CUDA step could not be checked here ({e}): composing it instead");
            false
        }
    };
    checked.push((device.location(), ready));
    ready
}

/// What of the fused step differs from the composed one on `device`, if anything.
fn fused_step_differs(device: &Device) -> Result<Option<String>> {
    let n = 5_000;
    for (model_dtype, weight_decay) in [(DType::F32, 0.0), (DType::BF16, 0.01)] {
        let params = AdamParams { lr: 2e-3, weight_decay, ..Default::default() };
        let p = Tensor::randn(0f32, 1.0, n, device)?;
        let slot = |copy: bool| -> Result<Slot> {
            let model = copy.then(|| Var::from_tensor(&p.to_dtype(model_dtype)?)).transpose()?;
            let (m, v) = (Tensor::zeros(n, DType::F32, device)?, Tensor::zeros(n, DType::F32, device)?);
            Ok(Slot { name: "check".into(), var: Var::from_tensor(&p)?, model, step: 0, m, v })
        };
        let copy = model_dtype != DType::F32;
        let (mut fused, mut composed) = (slot(copy)?, slot(copy)?);
        for t in 1..=2 {
            let g = (Tensor::randn(0f32, 1.0, n, device)? * 10f64.powi(t - 2))?.to_dtype(model_dtype)?;
            let s = StepScalars::new(params, t as u64);
            if !fused.step_fused(&g, &s)? {
                return Ok(Some("it did not run".into()));
            }
            composed.step_composed(&g.to_dtype(DType::F32)?, &s)?;
            composed.update_model()?;
            let pairs = [(&fused.m, &composed.m, "exp_avg"), (&fused.v, &composed.v, "exp_avg_sq")];
            let vars = [(fused.var.as_tensor(), composed.var.as_tensor(), "the variable")];
            let models = fused.model.iter().zip(&composed.model).map(|(a, b)| (a.as_tensor(), b.as_tensor(), "the model's copy"));
            for (a, b, what) in pairs.into_iter().chain(vars).chain(models) {
                let bits = |t: &Tensor| -> Result<Vec<u32>> { Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect()) };
                let differing = bits(a)?.iter().zip(bits(b)?).filter(|(x, y)| *x != y).count();
                if differing > 0 {
                    return Ok(Some(format!("{what} differs in {differing} of {n} elements at step {t}, model in {model_dtype:?}")));
                }
            }
        }
    }
    Ok(None)
}

/// One step as candle ops on any device and dtype: the updated `(p, m, v)`, `p` in the moments'
/// dtype. Element by element, so a step over several variables laid end to end gives each the
/// same bits as its own step.
fn composed_step(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: &StepScalars) -> Result<(Tensor, Tensor, Tensor)> {
    let AdamParams { lr, beta1, beta2, eps, weight_decay } = s.params;
    let m = (m + ((g - m)? * (1.0 - beta1))?)?;
    let v = ((v * beta2)? + ((g * (1.0 - beta2))? * g)?)?;
    let denom = ((v.sqrt()? / s.bias_correction2_sqrt)? + eps)?;
    let mut p = p.to_dtype(m.dtype())?;
    if weight_decay != 0.0 {
        p = (p * (1.0 - lr * weight_decay))?;
    }
    let p = (p + ((&m * -s.step_size)? / denom)?)?;
    Ok((p, m, v))
}

/// At most this many elements (128 MiB in f32) go into one flat step: each of the step's dozen
/// temporaries is that long, so full fine-tuning's 860 M weights in one batch took 21 GB more than
/// stepping them alone, while a few dozen batches cost a few hundred launches.
const BATCH_ELEMENTS: usize = 1 << 25;

/// Adam over a list of named variables, with an exportable state.
pub struct Adam {
    slots: Vec<Slot>,
    params: AdamParams,
    /// The moments of the last steps' batches ([`Adam::step_batch`]) by their slots' indices,
    /// laid end to end: each of those slots' moments is a view of these.
    flat_moments: HashMap<Vec<usize>, (Tensor, Tensor)>,
    /// [`BATCH_ELEMENTS`], smaller in tests.
    batch_elements: usize,
}

fn moment_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Keys of the exported state.
fn step_key(name: &str) -> String {
    format!("step.{name}")
}
fn m_key(name: &str) -> String {
    format!("exp_avg.{name}")
}
fn v_key(name: &str) -> String {
    format!("exp_avg_sq.{name}")
}

impl Adam {
    /// Moments start at zero, step counts at 0 (as torch's lazily created state).
    pub fn new(vars: Vec<(String, Var)>, params: AdamParams) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let dtype = moment_dtype(var.dtype());
                // Two buffers: the CPU step writes into them.
                let m = Tensor::zeros(var.shape(), dtype, var.device())?;
                let v = Tensor::zeros(var.shape(), dtype, var.device())?;
                Ok(Slot { name, var, model: None, step: 0, m, v })
            })
            .collect::<Result<_>>()?;
        Ok(Self { slots, params, flat_moments: HashMap::new(), batch_elements: BATCH_ELEMENTS })
    }

    /// Adam over f32 variables whose models run in `dtype`: each variable of another dtype gets a
    /// copy in `dtype` for the model to read (its gradients are the ones [`Adam::step`] uses, in
    /// `dtype`, as a cast on the graph would give them), and every step writes the updated
    /// variable into it in place, so a model built once stays current and the gradients take half
    /// the memory of f32 ones.
    pub fn with_model_copies(vars: Vec<(String, Var)>, params: AdamParams, dtype: DType) -> Result<Self> {
        let mut adam = Self::new(vars, params)?;
        for slot in &mut adam.slots {
            if slot.var.dtype() != dtype {
                slot.model = Some(Var::from_tensor(&slot.var.as_tensor().to_dtype(dtype)?)?);
            }
        }
        Ok(adam)
    }

    /// What the model reads, by name: each variable's copy, or the variable.
    pub fn model_vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), s.model.as_ref().unwrap_or(&s.var)))
    }

    pub fn params(&self) -> &AdamParams {
        &self.params
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// The variables, by name, in the order given.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// One update of every variable that has a gradient in `grads` (others are skipped, as torch
    /// skips parameters whose `.grad` is None).
    /// Several calls may make up one step, each with some of the gradients (as gradient
    /// checkpointing's segments give them).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        // The composed step takes variables that share a device, dtypes and step count together,
        // up to `batch_elements` at a time.
        let mut batches: Vec<Vec<(usize, Tensor)>> = Vec::new();
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            let Some(grad) = grads.get(slot.model.as_ref().unwrap_or(&slot.var).as_tensor()) else { continue };
            let mut g = grad.detach();
            slot.step += 1;
            if fused_step_ready(slot.var.device()) && slot.step_fused(&g, &StepScalars::new(self.params, slot.step))? {
                continue;
            }
            if [&slot.m, &slot.v, slot.var.as_tensor()].into_iter().all(crate::models::cpu_kernels::applies) {
                g = g.to_dtype(slot.m.dtype())?;
                if crate::models::cpu_kernels::applies(&g) {
                    slot.step_in_place(&g, &StepScalars::new(self.params, slot.step))?;
                    slot.update_model()?;
                    continue;
                }
            }
            let (slots, limit) = (&self.slots, self.batch_elements);
            let elements = |b: &[(usize, Tensor)]| b.iter().map(|(j, _)| slots[*j].var.elem_count()).sum::<usize>();
            let open = batches.iter_mut().find(|b| slots[b[0].0].steps_with(&slots[i]) && elements(b) + slots[i].var.elem_count() <= limit);
            match open {
                Some(batch) => batch.push((i, g)),
                None => batches.push(vec![(i, g)]),
            }
        }
        // Flat moments a batch of this call will not take again (its slots now batched
        // otherwise) are dropped; those of slots this call does not step are kept for their call.
        let keys: Vec<Vec<usize>> = batches.iter().map(|b| b.iter().map(|(i, _)| *i).collect()).collect();
        let stepped: std::collections::HashSet<usize> = keys.iter().flatten().copied().collect();
        self.flat_moments.retain(|k, _| keys.contains(k) || !k.iter().any(|i| stepped.contains(i)));
        for batch in batches {
            self.step_batch(batch)?;
        }
        Ok(())
    }

    /// The composed step of the slots in `batch` (indices, with their gradients as the backward
    /// gave them): for several, laid end to end as one flat tensor each, so that a step is one
    /// set of kernels instead of one per variable (on a GPU, LoRA's 256 adapters took 4 000
    /// launches a step, half of a stage-2 step's). The moments stay flat from one step to the
    /// next (`flat_moments`), so only the gradients and the variables are gathered, and the
    /// variables and their model copies written back, a copy each.
    fn step_batch(&mut self, batch: Vec<(usize, Tensor)>) -> Result<()> {
        let s = StepScalars::new(self.params, self.slots[batch[0].0].step);
        if let [(i, g)] = &batch[..] {
            let slot = &mut self.slots[*i];
            slot.step_composed(&g.to_dtype(slot.m.dtype())?, &s)?;
            return slot.update_model();
        }
        let indices: Vec<usize> = batch.iter().map(|(i, _)| *i).collect();
        let flat = |ts: Vec<Tensor>| -> Result<Tensor> {
            Ok(Tensor::cat(&ts.iter().map(|t| t.flatten_all()).collect::<candle_core::Result<Vec<_>>>()?, 0)?)
        };
        let (m, v) = match self.flat_moments.remove(&indices) {
            Some(moments) => moments,
            None => (
                flat(indices.iter().map(|&i| self.slots[i].m.clone()).collect())?,
                flat(indices.iter().map(|&i| self.slots[i].v.clone()).collect())?,
            ),
        };
        // The gradients in the model's dtype, cast to the moments' once, laid end to end.
        let g = flat(batch.into_iter().map(|(_, g)| g).collect())?.to_dtype(m.dtype())?;
        let p = flat(indices.iter().map(|&i| self.slots[i].var.as_tensor().detach()).collect())?;
        let (p, m, v) = composed_step(&p, &g, &m, &v, &s)?;
        let first = &self.slots[indices[0]];
        let p_var = p.to_dtype(first.var.dtype())?;
        let p_model = first.model.as_ref().map(|model| p.to_dtype(model.dtype())).transpose()?;
        let mut offset = 0;
        for &i in &indices {
            let slot = &mut self.slots[i];
            let (n, shape) = (slot.var.elem_count(), slot.var.shape().clone());
            let part = |t: &Tensor| t.narrow(0, offset, n)?.reshape(&shape);
            slot.var.set(&part(&p_var)?)?;
            if let (Some(model), Some(p_model)) = (&slot.model, &p_model) {
                model.set(&part(p_model)?)?;
            }
            (slot.m, slot.v) = (part(&m)?, part(&v)?);
            offset += n;
        }
        self.flat_moments.insert(indices, (m, v));
        Ok(())
    }

    /// Backprop of `loss` and one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// The optimizer state as named tensors, torch's names: `step.<name>` (an i64 scalar on the
    /// CPU), `exp_avg.<name>` and `exp_avg_sq.<name>` (on the variables' device). The moments are
    /// the live ones, not copies (a copy of full fine-tuning's would be 6.9 GB): the next
    /// in-place step (the CPU's, or the GPU's fused one) writes into them, so write them out
    /// before it, or copy them.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut state = HashMap::new();
        for s in &self.slots {
            state.insert(step_key(&s.name), Tensor::new(s.step as i64, &Device::Cpu).expect("a scalar tensor"));
            state.insert(m_key(&s.name), s.m.clone());
            state.insert(v_key(&s.name), s.v.clone());
        }
        state
    }

    /// Restores what [`Adam::state`] exported (the variables' values are restored by their owner).
    /// The moments are copied (the CPU step writes into its own): drop `state` once loaded.
    /// `what` names the checkpoint in errors.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        let missing = |key: &str| {
            bad_input(
                what,
                format!("the optimizer state lacks `{key}`"),
                "resume from a checkpoint of the same run, or start over",
            )
        };
        for s in &mut self.slots {
            let step = state.get(&step_key(&s.name)).ok_or_else(|| missing(&step_key(&s.name)))?;
            let step = step.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let moment = |key: String| -> Result<Tensor> {
                let t = state.get(&key).ok_or_else(|| missing(&key))?;
                if t.dims() != s.var.dims() {
                    return Err(bad_input(
                        what,
                        format!("`{key}` has shape {:?}, expected {:?}", t.dims(), s.var.dims()),
                        "resume with the same model and settings",
                    ));
                }
                Ok(t.to_device(s.var.device())?.to_dtype(s.m.dtype())?.copy()?)
            };
            let (m, v) = (moment(m_key(&s.name))?, moment(v_key(&s.name))?);
            s.step = step as u64;
            s.m = m;
            s.v = v;
        }
        self.flat_moments.clear();
        Ok(())
    }
}

/// `m <- m + ((g - m) (1 - beta1) + 0)`: the composed ops' `sub`, `affine` and `add` in f32.
struct FirstMoment(AdamScalars);

impl InplaceOp2 for FirstMoment {
    fn name(&self) -> &'static str {
        "adam-first-moment"
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, m_l: &Layout, g: &CpuStorage, g_l: &Layout) -> candle_core::Result<()> {
        let c = self.0.one_minus_beta1;
        in_place(self.name(), (m, m_l), [(g, g_l)], |m, [g]| m + ((g - m) * c + 0.0))
    }
}

/// `v <- (v beta2 + 0) + ((g (1 - beta2) + 0) g)`.
struct SecondMoment(AdamScalars);

impl InplaceOp2 for SecondMoment {
    fn name(&self) -> &'static str {
        "adam-second-moment"
    }

    fn cpu_fwd(&self, v: &mut CpuStorage, v_l: &Layout, g: &CpuStorage, g_l: &Layout) -> candle_core::Result<()> {
        let (b2, c) = (self.0.beta2, self.0.one_minus_beta2);
        in_place(self.name(), (v, v_l), [(g, g_l)], |v, [g]| (v * b2 + 0.0) + ((g * c + 0.0) * g))
    }
}

/// `p <- p' + ((m (-step_size) + 0) / ((sqrt(v) / sqrt(1 - beta2^t) + 0) 1 + eps))`, `p' = p (1 -
/// lr wd) + 0` with weight decay, `p` without.
struct Update(AdamScalars);

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adam-update"
    }

    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        p_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let AdamScalars { decay, neg_step_size, inv_bias_correction2_sqrt, eps, .. } = self.0;
        in_place(self.name(), (p, p_l), [(m, m_l), (v, v_l)], |p, [m, v]| {
            let p = decay.map_or(p, |d| p * d + 0.0);
            let denom = (v.sqrt() * inv_bias_correction2_sqrt + 0.0) * 1.0 + eps;
            p + ((m * neg_step_size + 0.0) / denom)
        })
    }
}

/// `dst[i] <- f(dst[i], [src[i]...])` over contiguous f32, in parallel chunks.
fn in_place<const N: usize>(
    op: &str,
    (dst, dst_l): (&mut CpuStorage, &Layout),
    srcs: [(&CpuStorage, &Layout); N],
    f: impl Fn(f32, [f32; N]) -> f32 + Sync,
) -> candle_core::Result<()> {
    use crate::models::cpu_kernels::{contiguous_f32, ELEMENTWISE_CHUNK as CHUNK};
    let (CpuStorage::F32(dst), Some((start, end))) = (dst, dst_l.contiguous_offsets()) else {
        bail!("{op}: the destination must be contiguous f32")
    };
    let dst = &mut dst[start..end];
    let mut src_slices = [&[][..]; N];
    for (slice, (src, l)) in src_slices.iter_mut().zip(srcs) {
        *slice = contiguous_f32(op, src, l, dst.len())?;
    }
    dst.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        let base = c * CHUNK;
        for (i, d) in chunk.iter_mut().enumerate() {
            *d = f(*d, src_slices.map(|s| s[base + i]));
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two parameters on `f(x, y) = sum(a x^2) + sum(y^3)`, three steps, against torch's formulas
    /// evaluated by hand in f64.
    #[test]
    fn weight_decay_is_decoupled_as_torch_adamw() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[1.0f64, -2.0], &dev)?;
        let (lr, wd) = (0.1, 0.5);
        let mut opt = Adam::new(vec![("x".into(), x.clone())], AdamParams { lr, weight_decay: wd, ..Default::default() })?;
        for t in 1..=2 {
            let before = x.as_tensor().to_vec1::<f64>()?;
            opt.backward_step(&x.as_tensor().sum_all()?)?;
            // A constant gradient of 1: bias-corrected m / sqrt(v) is 1, so each step is -lr (1 - eps).
            for (after, p) in x.as_tensor().to_vec1::<f64>()?.iter().zip(before) {
                let expected = p * (1.0 - lr * wd) - lr / (1.0 + 1e-8);
                assert!((after - expected).abs() < 1e-9, "step {t}: {after} vs {expected}");
            }
        }
        Ok(())
    }

    #[test]
    fn matches_torch_adam_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[1.0f64, -2.0, 0.5], &dev)?;
        let y = Var::new(&[0.3f64, -0.7], &dev)?;
        let a = Tensor::new(&[1.0f64, 3.0, 10.0], &dev)?;
        let lr = 0.1;
        let mut opt =
            Adam::new(vec![("x".into(), x.clone()), ("y".into(), y.clone())], AdamParams { lr, ..Default::default() })?;

        // By hand.
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let mut px = vec![1.0f64, -2.0, 0.5];
        let mut py = vec![0.3f64, -0.7];
        let (mut mx, mut vx) = (vec![0.0; 3], vec![0.0; 3]);
        let (mut my, mut vy) = (vec![0.0; 2], vec![0.0; 2]);
        let av = [1.0, 3.0, 10.0];
        for t in 1..=3 {
            let loss = ((x.as_tensor().sqr()? * &a)?.sum_all()? + y.as_tensor().powf(3.0)?.sum_all()?)?;
            opt.backward_step(&loss)?;
            let upd = |p: &mut Vec<f64>, m: &mut Vec<f64>, v: &mut Vec<f64>, g: Vec<f64>| {
                for i in 0..p.len() {
                    m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                    v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                    let mh = m[i] / (1.0 - b1.powi(t));
                    let vh = v[i] / (1.0 - b2.powi(t));
                    p[i] -= lr * mh / (vh.sqrt() + eps);
                }
            };
            let gx = (0..3).map(|i| 2.0 * av[i] * px[i]).collect();
            let gy = py.iter().map(|p| 3.0 * p * p).collect();
            upd(&mut px, &mut mx, &mut vx, gx);
            upd(&mut py, &mut my, &mut vy, gy);
            for (ours, hand) in
                x.as_tensor().to_vec1::<f64>()?.iter().zip(&px).chain(y.as_tensor().to_vec1::<f64>()?.iter().zip(&py))
            {
                assert!((ours - hand).abs() < 1e-12, "step {t}: {ours} vs {hand}");
            }
        }
        assert_eq!(opt.state()["step.x"].to_scalar::<i64>()?, 3);
        Ok(())
    }

    /// The CPU's in-place step equals the composed one bit for bit, with and without weight decay,
    /// over steps whose moments and bias corrections differ.
    #[test]
    fn in_place_step_is_the_composed_step_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        for weight_decay in [0.0, 0.01] {
            let params = AdamParams { lr: 2e-3, weight_decay, ..Default::default() };
            let x = (Tensor::randn(0f32, 1.0, 40_000, &dev)? * 3.0)?;
            let slot = || -> Result<Slot> {
                let zeros = || Tensor::zeros(40_000, DType::F32, &dev);
                Ok(Slot { name: "x".into(), var: Var::from_tensor(&x)?, model: None, step: 0, m: zeros()?, v: zeros()? })
            };
            let (mut a, mut b) = (slot()?, slot()?);
            for t in 1..=4 {
                let g = (Tensor::randn(0f32, 1.0, 40_000, &dev)? * 10f64.powi(t - 3))?;
                let s = StepScalars::new(params, t as u64);
                a.step_composed(&g, &s)?;
                b.step_in_place(&g, &s)?;
                for (x, y) in [(&a.m, &b.m), (&a.v, &b.v), (a.var.as_tensor(), b.var.as_tensor())] {
                    let bits = |t: &Tensor| -> Result<Vec<u32>> { Ok(t.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect()) };
                    assert_eq!(bits(x)?, bits(y)?, "step {t}, weight decay {weight_decay}");
                }
            }
        }
        Ok(())
    }

    /// The GPU's fused step (`cuda_kernels.cu`, run on the CPU by its harness) gives the CPU's
    /// in-place step's bits, so the composed step's: moments, variable and the model's bf16
    /// copy, with and without weight decay, over steps whose moments and bias corrections differ.
    #[test]
    fn fused_kernel_is_the_in_place_step_bit_for_bit() -> Result<()> {
        use crate::models::cuda_kernels::tests::run;
        let (dev, n) = (Device::Cpu, 1000);
        // How many elements differ in their bits.
        let differing = |a: &[f32], b: &[f32]| a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        for (dtype, weight_decay) in [(DType::F32, 0.0), (DType::F32, 0.01), (DType::BF16, 0.01)] {
            let params = AdamParams { lr: 2e-3, weight_decay, ..Default::default() };
            let p = (Tensor::randn(0f32, 1.0, n, &dev)? * 3.0)?;
            let zeros = || Tensor::zeros(n, DType::F32, &dev);
            let mut slot = Slot { name: "x".into(), var: Var::from_tensor(&p)?, model: None, step: 0, m: zeros()?, v: zeros()? };
            // The kernel's state, carried from one run of the harness to the next.
            let mut state = [p.copy()?, zeros()?, zeros()?];
            let copy = dtype == DType::BF16;
            for t in 1..=3 {
                // Values the gradient's dtype holds exactly.
                let g = (Tensor::randn(0f32, 1.0, n, &dev)? * 10f64.powi(t - 2))?.to_dtype(dtype)?.to_dtype(DType::F32)?;
                let s = StepScalars::new(params, t as u64);
                let c = s.in_f32();
                let scalars = [c.one_minus_beta1, c.beta2, c.one_minus_beta2, c.decay.unwrap_or(0.0), c.neg_step_size, c.inv_bias_correction2_sqrt, c.eps];
                let mut args = vec!["adam_step".to_string(), dtype.as_str().into(), n.to_string()];
                args.extend(scalars.map(|v| v.to_bits().to_string()));
                args.push((copy as u8).to_string());
                let out = run(&args, &[&g, &state[0], &state[1], &state[2]])?;
                slot.step_in_place(&g, &s)?;
                let expected = [slot.var.as_tensor(), &slot.m, &slot.v].map(|t| t.to_vec1::<f32>());
                for (i, (what, expected)) in ["the variable", "exp_avg", "exp_avg_sq"].into_iter().zip(expected).enumerate() {
                    let differ = differing(&out[i * n..(i + 1) * n], &expected?);
                    assert_eq!(differ, 0, "{what}, step {t}, {dtype:?}, weight decay {weight_decay}: elements differing");
                    state[i] = Tensor::new(&out[i * n..(i + 1) * n], &dev)?;
                }
                if copy {
                    let model = slot.var.as_tensor().to_dtype(DType::BF16)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    assert_eq!(differing(&out[3 * n..], &model), 0, "the model's copy, step {t}: elements differing");
                }
            }
        }
        Ok(())
    }

    /// Variables stepped as one flat tensor (the composed step, f64 here) get the bits each gets
    /// when stepped alone: with model copies, weight decay, a step that leaves one variable out,
    /// which changes the batches and so the flat moments they keep, and batches capped in size.
    #[test]
    fn batched_step_is_each_variables_own_step_bit_for_bit() -> Result<()> {
        batched_steps_match_own_steps(BATCH_ELEMENTS)?;
        // 12 + 5 elements do not fit in 16: batches [p0], [p1, p2] and, leaving p1 out, [p0], [p2].
        batched_steps_match_own_steps(16)
    }

    fn batched_steps_match_own_steps(batch_elements: usize) -> Result<()> {
        let dev = Device::Cpu;
        let shapes: [&[usize]; 3] = [&[3, 4], &[5], &[2, 2, 2]];
        let init = shapes.iter().map(|s| Tensor::randn(0f64, 1.0, *s, &dev)).collect::<candle_core::Result<Vec<_>>>()?;
        let vars = || -> Result<Vec<(String, Var)>> {
            init.iter().enumerate().map(|(i, t)| Ok((format!("p{i}"), Var::from_tensor(t)?))).collect()
        };
        let params = AdamParams { lr: 0.05, weight_decay: 0.01, ..Default::default() };
        let mut together = Adam::with_model_copies(vars()?, params, DType::F32)?;
        together.batch_elements = batch_elements;
        let mut alone = vars()?
            .into_iter()
            .map(|v| Adam::with_model_copies(vec![v], params, DType::F32))
            .collect::<Result<Vec<_>>>()?;
        // The loss of variable i, from the copy the model reads.
        let loss = |i: usize, x: &Var| -> Result<Tensor> { Ok((x.as_tensor().sqr()? * (i + 1) as f64)?.powf(1.5)?.sum_all()?) };
        for t in 0..5 {
            let stepped: Vec<usize> = (0..3).filter(|&i| t != 2 || i != 1).collect();
            let models: Vec<Var> = together.model_vars().map(|(_, v)| v.clone()).collect();
            let total = stepped.iter().map(|&i| loss(i, &models[i])).reduce(|a, b| Ok((a? + b?)?)).unwrap()?;
            together.backward_step(&total)?;
            for &i in &stepped {
                let model = alone[i].model_vars().next().unwrap().1.clone();
                alone[i].backward_step(&loss(i, &model)?)?;
            }
            let state = together.state();
            for (i, adam) in alone.iter().enumerate() {
                let bits = |t: &Tensor| -> Result<Vec<u64>> {
                    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?.iter().map(|v| v.to_bits()).collect())
                };
                let name = format!("p{i}");
                let own = adam.state();
                for key in [format!("exp_avg.{name}"), format!("exp_avg_sq.{name}")] {
                    assert_eq!(bits(&state[&key])?, bits(&own[&key])?, "step {t}: {key}");
                }
                let (ours, theirs) = (together.vars().nth(i).unwrap().1, adam.vars().next().unwrap().1);
                assert_eq!(bits(ours.as_tensor())?, bits(theirs.as_tensor())?, "step {t}: {name}");
                let (ours, theirs) = (together.model_vars().nth(i).unwrap().1, adam.model_vars().next().unwrap().1);
                assert_eq!(bits(ours.as_tensor())?, bits(theirs.as_tensor())?, "step {t}: the model's {name}");
            }
        }
        Ok(())
    }

    /// A step made of two calls, each with half of the gradients (gradient checkpointing's
    /// segments): each call's batch keeps its flat moments for the next step, and the result is
    /// the one-call step's, bit for bit.
    #[test]
    fn a_step_in_two_calls_keeps_both_calls_flat_moments() -> Result<()> {
        let dev = Device::Cpu;
        let init = (0..4).map(|i| Tensor::randn(0f64, 1.0, (i + 2, 3), &dev)).collect::<candle_core::Result<Vec<_>>>()?;
        let vars = || -> Result<Vec<(String, Var)>> {
            init.iter().enumerate().map(|(i, t)| Ok((format!("p{i}"), Var::from_tensor(t)?))).collect()
        };
        let (mut split, mut whole) = (Adam::new(vars()?, AdamParams::default())?, Adam::new(vars()?, AdamParams::default())?);
        let loss = |adam: &Adam, of: &[usize]| -> Result<Tensor> {
            let xs: Vec<&Var> = adam.vars().map(|(_, v)| v).collect();
            let terms = of.iter().map(|&i| xs[i].as_tensor().sqr()?.sum_all()? * (i + 1) as f64);
            Ok(terms.reduce(|a, b| a? + b?).unwrap()?)
        };
        for _ in 0..3 {
            split.step(&loss(&split, &[0, 1])?.backward()?)?;
            split.step(&loss(&split, &[2, 3])?.backward()?)?;
            whole.backward_step(&loss(&whole, &[0, 1, 2, 3])?)?;
        }
        let mut keys: Vec<&Vec<usize>> = split.flat_moments.keys().collect();
        keys.sort();
        assert_eq!(keys, [&vec![0, 1], &vec![2, 3]]);
        for ((_, a), (_, b)) in split.vars().zip(whole.vars()) {
            assert_eq!(a.as_tensor().to_vec2::<f64>()?, b.as_tensor().to_vec2::<f64>()?);
        }
        Ok(())
    }

    /// state() / load_state() into a fresh optimizer continues bit for bit.
    #[test]
    fn state_round_trip_is_bit_exact() -> Result<()> {
        let dev = Device::Cpu;
        let target = Tensor::new(&[0.25f32, -1.5, 3.0, 0.0], &dev)?;
        let run = |x: &Var, opt: &mut Adam, n: usize| -> Result<()> {
            for _ in 0..n {
                opt.backward_step(&(x.as_tensor() - &target)?.sqr()?.sum_all()?)?;
            }
            Ok(())
        };
        let x = Var::new(&[1.0f32, 2.0, -3.0, 0.5], &dev)?;
        let mut opt = Adam::new(vec![("x".into(), x.clone())], AdamParams::default())?;
        run(&x, &mut opt, 5)?;
        // A copy: the moments of state() are the live ones.
        let saved: HashMap<String, Tensor> = opt.state().into_iter().map(|(k, t)| Ok((k, t.copy()?))).collect::<Result<_>>()?;
        let saved_x = x.as_tensor().copy()?;
        run(&x, &mut opt, 5)?;

        let x2 = Var::from_tensor(&saved_x)?;
        let mut opt2 = Adam::new(vec![("x".into(), x2.clone())], AdamParams::default())?;
        opt2.load_state(&saved, "test")?;
        run(&x2, &mut opt2, 5)?;
        assert_eq!(x.as_tensor().to_vec1::<f32>()?, x2.as_tensor().to_vec1::<f32>()?);
        Ok(())
    }
}
