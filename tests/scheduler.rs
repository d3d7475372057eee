//! DDIM against diffusers' DDIMScheduler, via `tests/fixtures/ddim.{json,safetensors}`
//! (written by tools/make_fixtures.py; see tests/fixtures/README.md).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use layerdiff::schedulers::{DdimConfig, DdimScheduler};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Case {
    name: String,
    config: serde_json::Value,
}

fn load() -> (Vec<Case>, HashMap<String, Tensor>) {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("ddim.json")).unwrap())
            .unwrap();
    assert_eq!(json["num_inference_steps"], serde_json::json!([50, 7]));
    assert_eq!(json["eta"].as_f64(), Some(0.0));
    let cases = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            config: c["config"].clone(),
        })
        .collect::<Vec<_>>();
    assert_eq!(cases.len(), 5);
    let tensors =
        candle_core::safetensors::load(fixtures().join("ddim.safetensors"), &Device::Cpu).unwrap();
    (cases, tensors)
}

fn ids(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn scheduler(config: &serde_json::Value) -> DdimScheduler {
    DdimScheduler::new(DdimConfig::from_json(config).unwrap()).unwrap()
}

#[test]
fn alphas_cumprod_match_diffusers() {
    let (cases, t) = load();
    for case in &cases {
        let s = scheduler(&case.config);
        let want = t[&format!("{}.alphas_cumprod", case.name)]
            .to_vec1::<f64>()
            .unwrap();
        let got = s.alphas_cumprod();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Computed in f32 the way torch does, so equal to the last bit; the bound is the brief's.
            assert!(
                (g - w).abs() <= 1e-7 * w.abs(),
                "{}: alphas_cumprod[{i}] = {g}, diffusers {w}",
                case.name
            );
        }
        let exact = got.iter().zip(&want).filter(|(g, w)| g == w).count();
        assert_eq!(
            exact,
            want.len(),
            "{}: only {exact} of {} alphas_cumprod are bit-exact",
            case.name,
            want.len()
        );
    }
}

#[test]
fn timesteps_match_diffusers() {
    let (cases, t) = load();
    for case in &cases {
        let mut s = scheduler(&case.config);
        for n in [50, 7] {
            s.set_timesteps(n).unwrap();
            assert_eq!(
                s.timesteps(),
                ids(&t[&format!("{}.timesteps{n}", case.name)]).as_slice(),
                "{} n={n}",
                case.name
            );
        }
    }
}

/// Each step from diffusers' own input for that step (so errors don't compound), then the whole
/// chained 7-step trajectory.
#[test]
fn steps_match_diffusers() {
    let (cases, t) = load();
    for case in &cases {
        let mut s = scheduler(&case.config);
        s.set_timesteps(7).unwrap();
        let ts = s.timesteps().to_vec();
        let model_out = &t[&format!("{}.model_out", case.name)];
        let prev = &t[&format!("{}.prev", case.name)];
        let x0 = &t[&format!("{}.x0", case.name)];

        let mut chained = x0.clone();
        for (k, &timestep) in ts.iter().enumerate() {
            let input = if k == 0 {
                x0.clone()
            } else {
                prev.i(k - 1).unwrap()
            };
            let want = prev.i(k).unwrap();
            let eps = model_out.i(k).unwrap();

            let got = s.step(&eps, timestep, &input).unwrap();
            assert_eq!(got.dtype(), DType::F32);
            let d = max_abs_diff(&got, &want);
            // |x| grows to ~40 at the end of c0/c3, where one f32 ulp is ~4e-6.
            let tol = 1e-5f32.max(2e-7 * max_abs(&want));
            assert!(
                d <= tol,
                "{} step {k} (t={timestep}): max abs diff {d} > {tol}",
                case.name
            );

            chained = s.step(&eps, timestep, &chained).unwrap();
            let d = max_abs_diff(&chained, &want);
            let tol = 1e-5f32.max(1e-6 * max_abs(&want));
            assert!(
                d <= tol,
                "{} chained step {k}: max abs diff {d} > {tol}",
                case.name
            );
        }
    }
}

#[test]
fn add_noise_matches_diffusers() {
    let (cases, t) = load();
    for case in &cases {
        let mut s = scheduler(&case.config);
        s.set_timesteps(7).unwrap();
        let at = ids(&t[&format!("{}.add_noise_t", case.name)])[0];
        assert_eq!(at, s.timesteps()[3]);
        let got = s
            .add_noise(
                &t[&format!("{}.x0", case.name)],
                &t[&format!("{}.noise", case.name)],
                at,
            )
            .unwrap();
        let d = max_abs_diff(&got, &t[&format!("{}.add_noise", case.name)]);
        assert!(d <= 1e-6, "{}: add_noise max abs diff {d}", case.name);
    }
}

/// f16/bf16/f64 samples step in their own dtype and agree with the f32 result to their precision.
#[test]
fn steps_keep_dtype() {
    let (cases, t) = load();
    let case = &cases[0];
    let mut s = scheduler(&case.config);
    s.set_timesteps(7).unwrap();
    let timestep = s.timesteps()[2];
    let x = t[&format!("{}.prev", case.name)].i(1).unwrap();
    let eps = t[&format!("{}.model_out", case.name)].i(2).unwrap();
    let want = s.step(&eps, timestep, &x).unwrap();
    for (dtype, tol) in [
        (DType::F64, 1e-5f32),
        (DType::F16, 2e-2),
        (DType::BF16, 1.5e-1),
    ] {
        let got = s
            .step(
                &eps.to_dtype(dtype).unwrap(),
                timestep,
                &x.to_dtype(dtype).unwrap(),
            )
            .unwrap();
        assert_eq!(got.dtype(), dtype);
        let noisy = s
            .add_noise(
                &x.to_dtype(dtype).unwrap(),
                &eps.to_dtype(dtype).unwrap(),
                timestep,
            )
            .unwrap();
        assert_eq!(noisy.dtype(), dtype);
        let d = max_abs_diff(&got, &want);
        assert!(
            d <= tol * max_abs(&want).max(1.0),
            "{dtype:?}: max abs diff {d}"
        );
    }
}

/// The SD v1.4 repository ships a PNDMScheduler config; diffusers' DDIMScheduler.from_config
/// accepts it, ignoring the keys DDIM does not have.
#[test]
fn sd_v14_pndm_config_loads() {
    let v = serde_json::json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.7.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null,
        "clip_sample": false
    });
    let (cases, t) = load();
    let c = DdimConfig::from_json(&v).unwrap();
    assert_eq!(c, DdimConfig::from_json(&cases[0].config).unwrap());
    let mut s = DdimScheduler::new(c).unwrap();
    s.set_timesteps(50).unwrap();
    assert_eq!(s.timesteps(), ids(&t["c0.timesteps50"]).as_slice());

    let tiny =
        DdimConfig::from_file(&fixtures().join("tiny-sd/scheduler/scheduler_config.json")).unwrap();
    assert_eq!(tiny, DdimConfig::from_json(&cases[0].config).unwrap());
}
