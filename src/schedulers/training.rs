//! The forward (noising) process as training sees it: `z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps`
//! and the model's target, by the scheduler's `prediction_type` (diffusers' `add_noise` and
//! `get_velocity`). Shared by the method's stages 1 and 2 and by training from scratch.

use super::{DdimScheduler, PredictionType};
use crate::error::{bad_input, Result};
use candle_core::Tensor;

/// `abar_t` for every training timestep and what the model predicts.
#[derive(Debug, Clone)]
pub struct TrainSchedule {
    pub alphas_cumprod: Vec<f64>,
    pub prediction_type: PredictionType,
}

impl TrainSchedule {
    pub fn from_scheduler(scheduler: &DdimScheduler) -> Self {
        Self { alphas_cumprod: scheduler.alphas_cumprod().to_vec(), prediction_type: scheduler.config.prediction_type }
    }

    /// The number of training timesteps; an error when there are none.
    pub fn num_timesteps(&self) -> Result<usize> {
        match self.alphas_cumprod.len() {
            0 => Err(bad_input("scheduler", "no training timesteps", "use a scheduler config with num_train_timesteps >= 1")),
            n => Ok(n),
        }
    }

    /// Per-sample `[batch, 1, .., 1]` coefficients `f(abar_t)` shaped to broadcast over `like`.
    fn coefficient(&self, ts: &[usize], like: &Tensor, f: impl Fn(f64) -> f64) -> Result<Tensor> {
        let mut shape = vec![1; like.rank()];
        shape[0] = ts.len();
        let values: Vec<f64> = ts.iter().map(|&t| f(self.alphas_cumprod[t])).collect();
        Ok(Tensor::from_vec(values, shape, &candle_core::Device::Cpu)?.to_dtype(like.dtype())?.to_device(like.device())?)
    }

    /// `z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps`, one timestep per sample.
    pub fn add_noise(&self, z: &Tensor, eps: &Tensor, ts: &[usize]) -> Result<Tensor> {
        let a = self.coefficient(ts, z, f64::sqrt)?;
        let s = self.coefficient(ts, z, |abar| (1.0 - abar).sqrt())?;
        Ok((z.broadcast_mul(&a)? + eps.broadcast_mul(&s)?)?)
    }

    /// What the model should output for `z_t`: `eps` (epsilon), `z` (sample), or
    /// `v = sqrt(abar_t) eps - sqrt(1 - abar_t) z` (v-prediction).
    pub fn target(&self, z: &Tensor, eps: &Tensor, ts: &[usize]) -> Result<Tensor> {
        Ok(match self.prediction_type {
            PredictionType::Epsilon => eps.clone(),
            PredictionType::Sample => z.clone(),
            PredictionType::VPrediction => {
                let a = self.coefficient(ts, z, f64::sqrt)?;
                let s = self.coefficient(ts, z, |abar| (1.0 - abar).sqrt())?;
                (eps.broadcast_mul(&a)? - z.broadcast_mul(&s)?)?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn v_target_recovers_the_sample_as_diffusers_does() -> Result<()> {
        // diffusers' DDIM step reads a v-prediction back as x0 = sqrt(abar) z_t - sqrt(1 - abar) v.
        let s = TrainSchedule { alphas_cumprod: vec![0.9, 0.5, 0.1], prediction_type: PredictionType::VPrediction };
        let dev = Device::Cpu;
        let z = Tensor::randn(0f64, 1.0, (3, 2, 2, 2), &dev)?;
        let eps = Tensor::randn(0f64, 1.0, (3, 2, 2, 2), &dev)?;
        let ts = [2, 0, 1];
        let z_t = s.add_noise(&z, &eps, &ts)?;
        let v = s.target(&z, &eps, &ts)?;
        for (i, &t) in ts.iter().enumerate() {
            let abar = s.alphas_cumprod[t];
            let x0 = ((z_t.get(i)? * abar.sqrt())? - (v.get(i)? * (1.0 - abar).sqrt())?)?;
            let diff = (x0 - z.get(i)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "sample {i}: {diff}");
        }
        let eps_model = TrainSchedule { prediction_type: PredictionType::Epsilon, ..s };
        let diff = (eps_model.target(&z, &eps, &ts)? - &eps)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
