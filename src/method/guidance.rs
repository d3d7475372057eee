//! Stage 3: iterative guidance sampling (paper Eq. 7-8).
//!
//! Plain sampling conditions every DDIM step on `e_bar`, which keeps the subject's old pose.
//! Iterative guidance conditions every `period`-th step (counted from 0 at the first, noisiest
//! step) on the object-layer embedding `e_g` instead, which carries the new action.

use crate::error::Result;
use crate::models::unet_2d::UNet2DConditionModel;
use crate::pipeline::{guided_noise, Guidance};
use crate::schedulers::DdimScheduler;
use candle_core::Tensor;

/// Which embedding conditions one sampling step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    /// `e_g`: the object-layer embedding.
    Guided,
    /// `e_bar`: the interpolated embedding of Eq. 3.
    Bar,
}

/// `c_k` of Eq. 7: [`Condition::Guided`] for every step `k` with `k mod period == 0` (`k` counted
/// from 0 at the first, noisiest step), [`Condition::Bar`] otherwise. `period == 0` turns iterative
/// guidance off: every step is `Bar`.
pub fn guidance_condition(step_index: usize, period: usize) -> Condition {
    if period != 0 && step_index.is_multiple_of(period) {
        Condition::Guided
    } else {
        Condition::Bar
    }
}

/// The conditions of all `steps` steps, first (noisiest) step first.
pub fn guidance_schedule(steps: usize, period: usize) -> Vec<Condition> {
    (0..steps).map(|k| guidance_condition(k, period)).collect()
}

/// Eq. 7-8, iterative guidance sampling:
///
/// ```text
/// c_k     = e_g if k mod period == 0 else e_bar          (period 0: always e_bar)
/// x_{k+1} = DDIM(x_k, eps_u + w (eps_theta(x_k, t_k, c_k) - eps_u))
/// ```
///
/// `unet` is the fine-tuned UNet of stage 2; `scheduler` must have had `set_timesteps` called, and
/// its timesteps are the steps `k = 0, 1, ...`. `uncond` is `c("")`, `guidance_scale` is `w`.
/// `noise` is standard Gaussian noise of the latent shape; it is scaled by the scheduler's
/// `init_noise_sigma` (1 for DDIM) to give `x_0`. `on_step(done, total)` is called after each step.
/// Returns the final latents (decode them with the VAE).
#[allow(clippy::too_many_arguments)]
pub fn iterative_guidance_sample(
    unet: &UNet2DConditionModel,
    scheduler: &DdimScheduler,
    e_bar: &Tensor,
    e_g: &Tensor,
    uncond: &Tensor,
    guidance_scale: f64,
    period: usize,
    noise: Tensor,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    iterative_guidance_sample_traced(unet, scheduler, e_bar, e_g, uncond, guidance_scale, period, noise, &mut |_, _| {}, on_step)
}

/// [`iterative_guidance_sample`], also telling `on_condition(k, c_k)` which condition each step
/// used, before the step runs (for tests and logs).
#[allow(clippy::too_many_arguments)]
pub fn iterative_guidance_sample_traced(
    unet: &UNet2DConditionModel,
    scheduler: &DdimScheduler,
    e_bar: &Tensor,
    e_g: &Tensor,
    uncond: &Tensor,
    guidance_scale: f64,
    period: usize,
    noise: Tensor,
    on_condition: &mut dyn FnMut(usize, Condition),
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let timesteps = scheduler.timesteps();
    let guided = Guidance { cond: e_g, uncond, scale: guidance_scale };
    let bar = Guidance { cond: e_bar, uncond, scale: guidance_scale };
    let mut latents = (noise * scheduler.init_noise_sigma())?;
    for (k, &t) in timesteps.iter().enumerate() {
        let condition = guidance_condition(k, period);
        on_condition(k, condition);
        let guidance = match condition {
            Condition::Guided => &guided,
            Condition::Bar => &bar,
        };
        let input = scheduler.scale_model_input(latents.clone(), t)?;
        let eps = guided_noise(unet, &input, t, guidance)?;
        latents = scheduler.step(&eps, t, &latents)?;
        on_step(k + 1, timesteps.len());
    }
    Ok(latents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_two_alternates_from_the_first_step() {
        use Condition::{Bar, Guided};
        assert_eq!(guidance_schedule(5, 2), vec![Guided, Bar, Guided, Bar, Guided]);
        assert_eq!(guidance_schedule(5, 3), vec![Guided, Bar, Bar, Guided, Bar]);
        assert_eq!(guidance_schedule(3, 1), vec![Guided; 3]);
        assert_eq!(guidance_schedule(3, 0), vec![Bar; 3]);
    }
}
