//! DDIM sampling, a port of diffusers' `DDIMScheduler` (diffusers 0.42).
//!
//! The noise schedule is computed in f32 in the same order as diffusers' torch code, so
//! `alphas_cumprod` matches diffusers bit for bit. Per-step scalars are computed in f64 and
//! applied with `affine`, so the tensor keeps its own dtype and device.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::error::{bad_input, io_err, Result};

const CONFIG: &str = "scheduler config";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    Sample,
    VPrediction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// The keys of diffusers' `scheduler_config.json` that DDIM uses, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DdimConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

/// What the config file may hold. Unknown keys (`_class_name`, `skip_prk_steps`, ...) are
/// ignored, as diffusers' `from_config` does, so SD v1's PNDM config loads as is.
#[derive(Deserialize)]
#[serde(default)]
struct RawConfig {
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: String,
    trained_betas: Option<serde_json::Value>,
    clip_sample: bool,
    clip_sample_range: f64,
    set_alpha_to_one: bool,
    steps_offset: usize,
    prediction_type: String,
    timestep_spacing: String,
    thresholding: bool,
    rescale_betas_zero_snr: bool,
}

impl Default for RawConfig {
    fn default() -> Self {
        let d = DdimConfig::default();
        Self {
            num_train_timesteps: d.num_train_timesteps,
            beta_start: d.beta_start,
            beta_end: d.beta_end,
            beta_schedule: "linear".into(),
            trained_betas: None,
            clip_sample: d.clip_sample,
            clip_sample_range: d.clip_sample_range,
            set_alpha_to_one: d.set_alpha_to_one,
            steps_offset: d.steps_offset,
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            thresholding: false,
            rescale_betas_zero_snr: d.rescale_betas_zero_snr,
        }
    }
}

/// Parses one of a fixed set of string values, or names the key and the accepted values.
fn parse_choice<T: Copy>(key: &str, value: &str, choices: &[(&str, T)]) -> Result<T> {
    match choices.iter().find(|(name, _)| *name == value) {
        Some(&(_, v)) => Ok(v),
        None => {
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            Err(bad_input(
                format!("{CONFIG} key \"{key}\""),
                format!("unsupported value \"{value}\""),
                format!("use one of {}", names.join(", ")),
            ))
        }
    }
}

impl DdimConfig {
    /// Reads a diffusers `scheduler_config.json` (of any scheduler class). `null` values count
    /// as absent.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| {
            bad_input(
                CONFIG,
                "is not a JSON object",
                "give the contents of scheduler/scheduler_config.json",
            )
        })?;
        let present: serde_json::Map<String, serde_json::Value> = obj
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let raw: RawConfig =
            serde_json::from_value(serde_json::Value::Object(present)).map_err(|e| {
                bad_input(
                    CONFIG,
                    format!("has a value of the wrong type: {e}"),
                    "fix or remove that key",
                )
            })?;
        if raw.trained_betas.is_some() {
            return Err(bad_input(
                format!("{CONFIG} key \"trained_betas\""),
                "explicit beta arrays are not supported",
                "remove it and use beta_start/beta_end/beta_schedule",
            ));
        }
        if raw.thresholding {
            return Err(bad_input(
                format!("{CONFIG} key \"thresholding\""),
                "dynamic thresholding is not supported",
                "set it to false (it is meant for pixel-space models, not Stable Diffusion)",
            ));
        }
        let config = Self {
            num_train_timesteps: raw.num_train_timesteps,
            beta_start: raw.beta_start,
            beta_end: raw.beta_end,
            beta_schedule: parse_choice(
                "beta_schedule",
                &raw.beta_schedule,
                &[
                    ("linear", BetaSchedule::Linear),
                    ("scaled_linear", BetaSchedule::ScaledLinear),
                    ("squaredcos_cap_v2", BetaSchedule::SquaredcosCapV2),
                ],
            )?,
            clip_sample: raw.clip_sample,
            clip_sample_range: raw.clip_sample_range,
            set_alpha_to_one: raw.set_alpha_to_one,
            steps_offset: raw.steps_offset,
            prediction_type: parse_choice(
                "prediction_type",
                &raw.prediction_type,
                &[
                    ("epsilon", PredictionType::Epsilon),
                    ("sample", PredictionType::Sample),
                    ("v_prediction", PredictionType::VPrediction),
                ],
            )?,
            timestep_spacing: parse_choice(
                "timestep_spacing",
                &raw.timestep_spacing,
                &[
                    ("leading", TimestepSpacing::Leading),
                    ("trailing", TimestepSpacing::Trailing),
                    ("linspace", TimestepSpacing::Linspace),
                ],
            )?,
            rescale_betas_zero_snr: raw.rescale_betas_zero_snr,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a `scheduler_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            bad_input(
                path.display(),
                format!("is not valid JSON: {e}"),
                "re-download the scheduler config",
            )
        })?;
        Self::from_json(&v)
    }

    fn validate(&self) -> Result<()> {
        if self.num_train_timesteps < 2 {
            return Err(bad_input(
                format!("{CONFIG} key \"num_train_timesteps\""),
                format!("{} is too small", self.num_train_timesteps),
                "use the value the model was trained with (1000 for Stable Diffusion)",
            ));
        }
        let betas_ok = |b: f64| (0.0..1.0).contains(&b);
        if !betas_ok(self.beta_start) || !betas_ok(self.beta_end) {
            return Err(bad_input(
                format!("{CONFIG} keys \"beta_start\"/\"beta_end\""),
                format!(
                    "{} and {} are not both in [0, 1)",
                    self.beta_start, self.beta_end
                ),
                "use the model's values (0.00085 and 0.012 for Stable Diffusion)",
            ));
        }
        Ok(())
    }
}

/// `torch.linspace(start, end, n, dtype=torch.float32)` on CPU, bit for bit: torch rounds the
/// ends to f32, computes the step in f32, and fills the first half forward and the second half
/// backward from the end, each element one fused multiply-add.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` of an f32 tensor on CPU, which accumulates in f64 and rounds each output.
fn cumprod_f32(xs: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    xs.iter()
        .map(|&x| {
            acc *= x as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform (computed in f64, stored in f32).
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (arXiv 2305.08891, Algorithm 1), in f32 like torch.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_bar[0], sqrt_bar[sqrt_bar.len() - 1]);
    let scale = first / (first - last);
    for s in &mut sqrt_bar {
        *s = (*s - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    out.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// One DDIM step's results.
#[derive(Debug, Clone)]
pub struct DdimStep {
    /// x_{t-1}
    pub prev_sample: Tensor,
    /// The model's estimate of x_0 (after clipping, when the config clips).
    pub pred_original_sample: Tensor,
}

#[derive(Debug, Clone)]
pub struct DdimScheduler {
    pub config: DdimConfig,
    /// f32 values as diffusers holds them, widened to f64.
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    num_inference_steps: Option<usize>,
    timesteps: Vec<usize>,
}

impl DdimScheduler {
    pub fn new(config: DdimConfig) -> Result<Self> {
        config.validate()?;
        let n = config.num_train_timesteps;
        let mut betas = match config.beta_schedule {
            BetaSchedule::Linear => linspace_f32(config.beta_start, config.beta_end, n),
            BetaSchedule::ScaledLinear => {
                linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredcosCapV2 => cosine_betas(n),
        };
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod: Vec<f64> = cumprod_f32(&alphas).into_iter().map(f64::from).collect();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            timesteps: (0..n).rev().collect(),
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: None,
        })
    }

    /// Chooses the `num_inference_steps` timesteps to sample at, per `timestep_spacing`.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n = self.config.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n {
            return Err(bad_input(
                "number of inference steps",
                format!("{num_inference_steps} is not between 1 and the {n} training timesteps"),
                format!("choose a step count from 1 to {n} (50 is typical)"),
            ));
        }
        let steps = num_inference_steps;
        let timesteps: Vec<i64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => {
                // np.linspace(0, n - 1, steps).round(), reversed
                let last = (n - 1) as f64;
                let step = if steps > 1 {
                    last / (steps - 1) as f64
                } else {
                    0.0
                };
                (0..steps)
                    .rev()
                    .map(|i| {
                        let v = if i + 1 == steps && steps > 1 {
                            last
                        } else {
                            i as f64 * step
                        };
                        v.round_ties_even() as i64
                    })
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = n / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                // np.round(np.arange(n, 0, -n / steps)) - 1, with numpy's arange arithmetic:
                // length ceil(-n / step), values start + i * (second - start).
                let start = n as f64;
                let step = -(n as f64 / steps as f64);
                let len = ((0.0 - start) / step).ceil().max(0.0) as usize;
                let delta = (start + step) - start;
                (0..len)
                    .map(|i| {
                        let v = match i {
                            0 => start,
                            1 => start + step,
                            _ => start + i as f64 * delta,
                        };
                        v.round_ties_even() as i64 - 1
                    })
                    .collect()
            }
        };
        if let Some(&bad) = timesteps.iter().find(|&&t| t < 0 || t as usize >= n) {
            return Err(bad_input(
                format!("{CONFIG} key \"steps_offset\""),
                format!(
                    "gives timestep {bad}, outside the {n} training timesteps with {steps} steps"
                ),
                "use a smaller steps_offset (1 for Stable Diffusion)",
            ));
        }
        self.timesteps = timesteps.into_iter().map(|t| t as usize).collect();
        self.num_inference_steps = Some(steps);
        Ok(())
    }

    /// The timesteps to sample at, from noisiest down (all training timesteps until
    /// `set_timesteps` is called).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// ᾱ_t for every training timestep (f32 precision, as diffusers).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// ᾱ used past the last step (1.0 with `set_alpha_to_one`, else ᾱ_0).
    pub fn final_alpha_cumprod(&self) -> f64 {
        self.final_alpha_cumprod
    }

    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// DDIM needs no input scaling; kept so callers can treat schedulers alike.
    pub fn scale_model_input(&self, sample: Tensor, _t: usize) -> Result<Tensor> {
        Ok(sample)
    }

    fn alpha_at(&self, timestep: usize) -> Result<f64> {
        self.alphas_cumprod.get(timestep).copied().ok_or_else(|| {
            bad_input(
                format!("timestep {timestep}"),
                format!(
                    "is outside the {} training timesteps",
                    self.config.num_train_timesteps
                ),
                "use a timestep from timesteps()",
            )
        })
    }

    /// ᾱ of the timestep the step at `timestep` lands on, as diffusers picks it: always
    /// `timestep - num_train_timesteps / num_inference_steps`, whatever the spacing.
    pub fn prev_alpha_cumprod(&self, timestep: usize) -> Result<f64> {
        let steps = self.num_inference_steps.ok_or_else(|| {
            bad_input(
                "DDIM scheduler",
                "set_timesteps was not called",
                "call set_timesteps before stepping",
            )
        })?;
        let prev = timestep as i64 - (self.config.num_train_timesteps / steps) as i64;
        Ok(if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        })
    }

    /// One deterministic DDIM step (eta = 0): x_t -> x_{t-1}.
    pub fn step(&self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> Result<Tensor> {
        Ok(self
            .step_with(model_output, timestep, sample, 0.0, None)?
            .prev_sample)
    }

    /// One DDIM step with diffusers' `eta` (0 = DDIM, 1 = DDPM-like); `eta > 0` needs
    /// `variance_noise`, standard normal noise shaped like `sample`.
    pub fn step_with(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        eta: f64,
        variance_noise: Option<&Tensor>,
    ) -> Result<DdimStep> {
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(bad_input(
                "eta",
                format!("{eta} is not a non-negative number"),
                "use 0 for DDIM",
            ));
        }
        let alpha_t = self.alpha_at(timestep)?;
        let alpha_prev = self.prev_alpha_cumprod(timestep)?;
        let beta_t = 1.0 - alpha_t;
        let (sa, sb) = (alpha_t.sqrt(), beta_t.sqrt());

        let (mut pred_x0, pred_eps) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let x0 = ((sample - model_output.affine(sb, 0.0)?)? / sa)?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = ((sample - model_output.affine(sa, 0.0)?)? / sb)?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = (sample.affine(sa, 0.0)? - model_output.affine(sb, 0.0)?)?;
                let eps = (model_output.affine(sa, 0.0)? + sample.affine(sb, 0.0)?)?;
                (x0, eps)
            }
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            pred_x0 = pred_x0.clamp(-r, r)?;
        }

        let variance = ((1.0 - alpha_prev) / beta_t) * (1.0 - alpha_t / alpha_prev);
        let std_dev = eta * variance.sqrt();
        let direction = pred_eps.affine((1.0 - alpha_prev - std_dev * std_dev).sqrt(), 0.0)?;
        let mut prev = (pred_x0.affine(alpha_prev.sqrt(), 0.0)? + direction)?;
        if eta > 0.0 {
            let noise = variance_noise.ok_or_else(|| {
                bad_input(
                    "DDIM step",
                    format!("eta is {eta} but no noise was given"),
                    "pass variance noise or use eta 0",
                )
            })?;
            prev = (prev + noise.affine(std_dev, 0.0)?)?;
        }
        Ok(DdimStep {
            prev_sample: prev,
            pred_original_sample: pred_x0,
        })
    }

    /// Forward diffusion: sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·noise.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: usize) -> Result<Tensor> {
        let alpha = self.alpha_at(timestep)?;
        Ok((original.affine(alpha.sqrt(), 0.0)? + noise.affine((1.0 - alpha).sqrt(), 0.0)?)?)
    }

    /// The timesteps img2img runs for a given strength, like diffusers' img2img
    /// `get_timesteps`: the last `min(int(steps * strength), steps)` of them.
    pub fn timesteps_for_strength(&self, strength: f64) -> Result<&[usize]> {
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(bad_input(
                "strength",
                format!("{strength} is not in (0, 1]"),
                "use a value above 0 and at most 1 (1 = start from pure noise)",
            ));
        }
        let steps = self.num_inference_steps.ok_or_else(|| {
            bad_input(
                "DDIM scheduler",
                "set_timesteps was not called",
                "call set_timesteps before timesteps_for_strength",
            )
        })?;
        let init = ((steps as f64 * strength) as usize).min(steps);
        if init == 0 {
            return Err(bad_input(
                "strength",
                format!("{strength} with {steps} steps leaves no denoising step"),
                format!(
                    "raise strength to at least {} or use more steps",
                    1.0 / steps as f64
                ),
            ));
        }
        Ok(&self.timesteps[steps - init..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use serde_json::json;

    fn sd_v1() -> DdimScheduler {
        DdimScheduler::new(
            DdimConfig::from_json(&json!({
                "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1
            }))
            .unwrap(),
        )
        .unwrap()
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn bad_step_counts_are_errors() {
        let mut s = sd_v1();
        assert!(err_text(s.set_timesteps(0)).contains("number of inference steps"));
        assert!(s.set_timesteps(1001).is_err());
        assert!(s.set_timesteps(999).is_ok());
        // diffusers would yield timestep 1000 here and fail inside step(); we fail up front.
        assert!(err_text(s.set_timesteps(1000)).contains("steps_offset"));
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = err_text(DdimConfig::from_json(&json!({"beta_schedule": "sigmoid"})));
        assert!(
            e.contains("beta_schedule") && e.contains("sigmoid") && e.contains("\"scaled_linear\""),
            "{e}"
        );
        let e = err_text(DdimConfig::from_json(&json!({"prediction_type": "flow"})));
        assert!(
            e.contains("prediction_type") && e.contains("\"v_prediction\""),
            "{e}"
        );
        let e = err_text(DdimConfig::from_json(
            &json!({"timestep_spacing": "karras"}),
        ));
        assert!(
            e.contains("timestep_spacing") && e.contains("\"linspace\""),
            "{e}"
        );
        assert!(
            err_text(DdimConfig::from_json(&json!({"trained_betas": [0.1, 0.2]})))
                .contains("trained_betas")
        );
        assert!(
            err_text(DdimConfig::from_json(&json!({"thresholding": true})))
                .contains("thresholding")
        );
        assert!(
            err_text(DdimConfig::from_json(&json!({"steps_offset": "one"}))).contains("wrong type")
        );
        assert!(DdimConfig::from_json(&json!([1, 2])).is_err());
        // null counts as absent, unknown keys are ignored
        let c = DdimConfig::from_json(&json!({"prediction_type": null, "skip_prk_steps": true}))
            .unwrap();
        assert_eq!(c, DdimConfig::default());
    }

    #[test]
    fn strength_selects_the_tail_like_diffusers_img2img() {
        let mut s = sd_v1();
        assert!(
            s.timesteps_for_strength(0.5).is_err(),
            "needs set_timesteps first"
        );
        s.set_timesteps(50).unwrap();
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(
                err_text(s.timesteps_for_strength(bad)).contains("strength"),
                "{bad}"
            );
        }
        assert_eq!(s.timesteps_for_strength(1.0).unwrap(), s.timesteps());
        let kept = s.timesteps_for_strength(0.3).unwrap();
        assert_eq!(kept.len(), 15);
        assert_eq!(kept, &s.timesteps()[35..]);
        assert_eq!(kept[0], 281);
        // int(50 * 0.01) == 0 steps: diffusers' pipeline refuses this too.
        assert!(s.timesteps_for_strength(0.01).is_err());
    }

    #[test]
    fn stepping_needs_set_timesteps_and_valid_inputs() {
        let s = sd_v1();
        let x = Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(err_text(s.step(&x, 981, &x)).contains("set_timesteps"));
        let mut s = sd_v1();
        s.set_timesteps(10).unwrap();
        assert!(err_text(s.step(&x, 1000, &x)).contains("timestep 1000"));
        assert!(err_text(s.step_with(&x, 901, &x, 0.5, None)).contains("noise"));
        assert!(s.add_noise(&x, &x, 1000).is_err());
    }

    #[test]
    fn eta_adds_scaled_noise() {
        let mut s = sd_v1();
        s.set_timesteps(10).unwrap();
        let x = Tensor::new(&[[0.3f32, -1.2]], &Device::Cpu).unwrap();
        let eps = Tensor::new(&[[0.5f32, 0.1]], &Device::Cpu).unwrap();
        let zeros = x.zeros_like().unwrap();
        let noise = Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap();
        let t = 901;
        let (a, ap) = (s.alphas_cumprod()[t], s.alphas_cumprod()[t - 100]);
        let eta = 0.7;
        let std = eta * ((1.0 - ap) / (1.0 - a) * (1.0 - a / ap)).sqrt();
        let with_noise = s
            .step_with(&eps, t, &x, eta, Some(&noise))
            .unwrap()
            .prev_sample;
        let without = s
            .step_with(&eps, t, &x, eta, Some(&zeros))
            .unwrap()
            .prev_sample;
        let diff: Vec<f32> = (with_noise - without)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (diff[0] as f64 - std).abs() < 1e-6 && (diff[1] as f64 + 2.0 * std).abs() < 1e-6,
            "{diff:?}"
        );
    }

    /// Values from diffusers 0.42 (torch 2.11, CPU) for the schedules the fixture file lacks.
    #[test]
    #[allow(clippy::excessive_precision)] // printed by Python as f64
    fn squaredcos_and_zero_snr_match_diffusers() {
        let x = Tensor::new(&[[1.0f32, 1.0]], &Device::Cpu).unwrap();
        let mo = Tensor::new(&[[0.5f32, -2.0]], &Device::Cpu).unwrap();
        let check = |config: serde_json::Value,
                     alphas: &[(usize, f64)],
                     exact: bool,
                     steps: [(usize, [f32; 2]); 2]| {
            let mut s = DdimScheduler::new(DdimConfig::from_json(&config).unwrap()).unwrap();
            for &(i, want) in alphas {
                let got = s.alphas_cumprod()[i];
                if exact {
                    assert_eq!(got as f32, want as f32, "alphas_cumprod[{i}]");
                } else {
                    // torch's f32 sqrt is not correctly rounded, so not bit-exact here
                    assert!(
                        (got - want).abs() <= 5e-6 * want,
                        "alphas_cumprod[{i}] {got} vs {want}"
                    );
                }
            }
            s.set_timesteps(7).unwrap();
            assert_eq!(s.timesteps(), [999, 856, 713, 570, 428, 285, 142]);
            for (k, want) in steps {
                let got: Vec<f32> = s
                    .step(&mo, s.timesteps()[k], &x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (g, w) in got.iter().zip(want) {
                    assert!((g - w).abs() < 2e-6, "step {k}: {got:?} vs {want:?}");
                }
            }
        };
        check(
            json!({"beta_schedule": "squaredcos_cap_v2", "clip_sample": true, "clip_sample_range": 0.5,
                   "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
            &[
                (0, 0.9999586939811707),
                (1, 0.9999125599861145),
                (499, 0.4938434660434723),
                (998, 2.428766265438753e-06),
                (999, 2.4287349909002387e-09),
            ],
            true,
            [
                (0, [0.8658985495567322, 1.085265874862671]),
                (6, [0.5046112537384033, 0.4889853596687317]),
            ],
        );
        check(
            json!({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                   "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1,
                   "rescale_betas_zero_snr": true, "timestep_spacing": "trailing",
                   "prediction_type": "v_prediction"}),
            &[
                (0, 0.9991499781608582),
                (1, 0.9982334971427917),
                (499, 0.24235899746418),
                (998, 1.9679633567193378e-07),
            ],
            false,
            [
                (0, [0.9538033604621887, 1.1666347980499268]),
                (6, [0.7274227738380432, 1.698064923286438]),
            ],
        );
    }
}
