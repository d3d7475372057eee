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

use crate::error::{bad_input, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;

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
    /// Steps taken by this parameter (torch counts per parameter: one with no gradient is skipped).
    step: u64,
    /// First moment (`exp_avg`).
    m: Tensor,
    /// Second moment (`exp_avg_sq`).
    v: Tensor,
}

/// Adam over a list of named variables, with an exportable state.
pub struct Adam {
    slots: Vec<Slot>,
    params: AdamParams,
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
                let m = Tensor::zeros(var.shape(), dtype, var.device())?;
                let v = m.clone();
                Ok(Slot { name, var, step: 0, m, v })
            })
            .collect::<Result<_>>()?;
        Ok(Self { slots, params })
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
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let AdamParams { lr, beta1, beta2, eps, weight_decay } = self.params;
        for slot in &mut self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else { continue };
            let dtype = slot.m.dtype();
            let g = grad.detach().to_dtype(dtype)?;
            slot.step += 1;
            let t = slot.step as i32;
            let m = (&slot.m + ((&g - &slot.m)? * (1.0 - beta1))?)?;
            let v = ((&slot.v * beta2)? + ((&g * (1.0 - beta2))? * &g)?)?;
            let bias_correction1 = 1.0 - beta1.powi(t);
            let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
            let step_size = lr / bias_correction1;
            let denom = ((v.sqrt()? / bias_correction2_sqrt)? + eps)?;
            let mut p = slot.var.as_tensor().detach().to_dtype(dtype)?;
            if weight_decay != 0.0 {
                p = (p * (1.0 - lr * weight_decay))?;
            }
            let p = (p + ((&m * -step_size)? / denom)?)?;
            slot.var.set(&p.to_dtype(slot.var.dtype())?)?;
            slot.m = m;
            slot.v = v;
        }
        Ok(())
    }

    /// Backprop of `loss` and one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// The optimizer state as named tensors, torch's names: `step.<name>` (an i64 scalar on the
    /// CPU), `exp_avg.<name>` and `exp_avg_sq.<name>` (on the variables' device; snapshots: later
    /// steps replace the moments rather than write into them).
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
                Ok(t.to_device(s.var.device())?.to_dtype(s.m.dtype())?)
            };
            let (m, v) = (moment(m_key(&s.name))?, moment(v_key(&s.name))?);
            s.step = step as u64;
            s.m = m;
            s.v = v;
        }
        Ok(())
    }
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
        let (saved_x, saved) = (x.as_tensor().copy()?, opt.state());
        run(&x, &mut opt, 5)?;

        let x2 = Var::from_tensor(&saved_x)?;
        let mut opt2 = Adam::new(vec![("x".into(), x2.clone())], AdamParams::default())?;
        opt2.load_state(&saved, "test")?;
        run(&x2, &mut opt2, 5)?;
        assert_eq!(x.as_tensor().to_vec1::<f32>()?, x2.as_tensor().to_vec1::<f32>()?);
        Ok(())
    }
}
