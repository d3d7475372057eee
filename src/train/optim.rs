//! The pieces of a from-scratch training loop around [`Adam`](crate::method::adam::Adam): gradient-norm clipping, a linear
//! learning-rate warm-up and an exponential moving average of the weights, each as torch /
//! diffusers do it.

use crate::error::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::HashMap;

/// `torch.nn.utils.clip_grad_norm_`: when the global L2 norm of the gradients of `vars` exceeds
/// `max_norm`, scales them all by `max_norm / (norm + 1e-6)`. Returns the norm before clipping.
pub fn clip_grad_norm<'a>(grads: &mut GradStore, vars: impl Iterator<Item = &'a Var> + Clone, max_norm: f64) -> Result<f64> {
    let mut sum = 0.0;
    for var in vars.clone() {
        if let Some(g) = grads.get(var.as_tensor()) {
            sum += g.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
    }
    let norm = sum.sqrt();
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for var in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// The learning rate at `step` (from 0): rising linearly from `lr / warmup` to `lr` over the first
/// `warmup` steps (diffusers' `constant_with_warmup`), then constant.
pub fn warmup_lr(lr: f64, warmup: usize, step: usize) -> f64 {
    if step < warmup {
        lr * (step + 1) as f64 / warmup as f64
    } else {
        lr
    }
}

/// An exponential moving average of named weights, as diffusers' `EMAModel`: after the `n`-th
/// update the decay is `min(decay, (1 + n) / (10 + n))`, so early averages are not dominated by
/// the random initialization.
pub struct Ema {
    pub decay: f64,
    pub updates: usize,
    pub shadow: HashMap<String, Tensor>,
}

impl Ema {
    /// Starts the average at the weights' current values.
    pub fn new<'a>(decay: f64, vars: impl Iterator<Item = (&'a str, &'a Var)>) -> Result<Self> {
        let shadow = vars.map(|(n, v)| Ok((n.to_string(), v.as_tensor().detach().copy()?))).collect::<Result<_>>()?;
        Ok(Self { decay, updates: 0, shadow })
    }

    /// `shadow <- d shadow + (1 - d) weight`.
    pub fn update<'a>(&mut self, vars: impl Iterator<Item = (&'a str, &'a Var)>) -> Result<()> {
        self.updates += 1;
        let n = self.updates as f64;
        let d = self.decay.min((1.0 + n) / (10.0 + n));
        for (name, var) in vars {
            if let Some(s) = self.shadow.get_mut(name) {
                *s = ((&*s * d)? + (var.as_tensor().detach() * (1.0 - d))?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn clipping_scales_the_global_norm_down_only() -> Result<()> {
        let (a, b) = (Var::new(&[1.0f64, 2.0], &Device::Cpu)?, Var::new(&[2.0f64], &Device::Cpu)?);
        // d/dx of sum(x^2) is 2x: gradients [2, 4] and [4], global norm 6.
        let loss = (a.as_tensor().sqr()?.sum_all()? + b.as_tensor().sqr()?.sum_all()?)?;
        let mut grads = loss.backward()?;
        let norm = clip_grad_norm(&mut grads, [&a, &b].into_iter(), 3.0)?;
        assert!((norm - 6.0).abs() < 1e-12);
        let ga = grads.get(a.as_tensor()).unwrap().to_vec1::<f64>()?;
        assert!((ga[0] - 1.0).abs() < 1e-6 && (ga[1] - 2.0).abs() < 1e-6, "{ga:?}");
        let before = grads.get(b.as_tensor()).unwrap().to_vec1::<f64>()?;
        clip_grad_norm(&mut grads, [&a, &b].into_iter(), 10.0)?;
        assert_eq!(grads.get(b.as_tensor()).unwrap().to_vec1::<f64>()?, before);
        Ok(())
    }

    #[test]
    fn warmup_is_linear_then_flat() {
        assert_eq!(warmup_lr(1.0, 4, 0), 0.25);
        assert_eq!(warmup_lr(1.0, 4, 3), 1.0);
        assert_eq!(warmup_lr(1.0, 4, 100), 1.0);
        assert_eq!(warmup_lr(0.5, 0, 0), 0.5);
    }

    #[test]
    fn ema_follows_diffusers_decay_warmup() -> Result<()> {
        let v = Var::new(&[0.0f64], &Device::Cpu)?;
        let mut ema = Ema::new(0.999, [("w", &v)].into_iter())?;
        v.set(&Tensor::new(&[1.0f64], &Device::Cpu)?)?;
        ema.update([("w", &v)].into_iter())?;
        // First update: d = min(0.999, 2 / 11).
        let d = 2.0 / 11.0;
        let got = ema.shadow["w"].to_vec1::<f64>()?[0];
        assert!((got - (1.0 - d)).abs() < 1e-12, "{got}");
        Ok(())
    }
}
