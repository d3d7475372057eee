//! Stage 3, iterative guidance sampling (Eq. 7-8), on the tiny fixture model: the schedule of
//! conditions, and the sampler against plain sampling and a hand-written reference loop.

#[path = "common/tiny.rs"]
mod tiny;

use candle_core::Tensor;
use layerdiff::method::guidance::{
    guidance_condition, guidance_schedule, iterative_guidance_sample, iterative_guidance_sample_traced, Condition,
};
use layerdiff::pipeline::{guided_noise, seeded_noise, Guidance, StableDiffusion};
use layerdiff::schedulers::DdimScheduler;

const STEPS: usize = 5;
const SCALE: f64 = 7.5;

struct Setup {
    sd: StableDiffusion,
    scheduler: DdimScheduler,
    e_bar: Tensor,
    e_g: Tensor,
    uncond: Tensor,
    noise: Tensor,
}

fn setup() -> Setup {
    let (_, sd) = tiny::load();
    let mut scheduler = sd.scheduler().unwrap();
    scheduler.set_timesteps(STEPS).unwrap();
    let f = sd.vae_factor();
    let shape = [1, sd.unet().unwrap().config().in_channels, 64 / f, 64 / f];
    let noise = seeded_noise(7, &shape, &sd.device, sd.dtype).unwrap();
    let e_bar = sd.encode_prompt("a photo of a dog in a dense forest").unwrap();
    let e_g = sd.encode_prompt("a jumping dog").unwrap();
    let uncond = sd.encode_prompt("").unwrap();
    Setup { sd, scheduler, e_bar, e_g, uncond, noise }
}

impl Setup {
    fn sample(&self, e_bar: &Tensor, e_g: &Tensor, period: usize) -> Tensor {
        iterative_guidance_sample(self.sd.unet().unwrap(), &self.scheduler, e_bar, e_g, &self.uncond, SCALE, period, self.noise.clone(), &mut |_, _| {})
            .unwrap()
    }

    /// Plain sampling (the pipeline's `denoise`) conditioned on `cond` at every step.
    fn plain(&self, cond: &Tensor) -> Tensor {
        let guidance = Guidance { cond, uncond: &self.uncond, scale: SCALE };
        let latents = (&self.noise * self.scheduler.init_noise_sigma()).unwrap();
        self.sd.denoise(&self.scheduler, self.scheduler.timesteps(), latents, &guidance, &mut |_, _| {}).unwrap()
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn condition_follows_k_mod_period() {
    use Condition::{Bar, Guided};
    for k in 0..20 {
        assert_eq!(guidance_condition(k, 0), Bar, "period 0 is off");
        assert_eq!(guidance_condition(k, 1), Guided);
        assert_eq!(guidance_condition(k, 2), if k % 2 == 0 { Guided } else { Bar });
        assert_eq!(guidance_condition(k, 4), if k % 4 == 0 { Guided } else { Bar });
    }
    assert_eq!(guidance_schedule(6, 2), vec![Guided, Bar, Guided, Bar, Guided, Bar]);
}

/// The sampler itself, instrumented: which condition each step of a real run used.
#[test]
fn sampler_uses_e_g_on_exactly_the_named_steps() {
    use Condition::{Bar, Guided};
    let s = setup();
    for (period, expected) in [
        (2, vec![Guided, Bar, Guided, Bar, Guided]),
        (3, vec![Guided, Bar, Bar, Guided, Bar]),
        (0, vec![Bar; STEPS]),
    ] {
        let mut seen = Vec::new();
        let mut progress = Vec::new();
        iterative_guidance_sample_traced(
            s.sd.unet().unwrap(),
            &s.scheduler,
            &s.e_bar,
            &s.e_g,
            &s.uncond,
            SCALE,
            period,
            s.noise.clone(),
            &mut |k, c| seen.push((k, c)),
            &mut |done, total| progress.push((done, total)),
        )
        .unwrap();
        let expected: Vec<_> = expected.into_iter().enumerate().collect();
        assert_eq!(seen, expected, "period {period}");
        assert_eq!(progress, (1..=STEPS).map(|d| (d, STEPS)).collect::<Vec<_>>());
    }
}

/// Period 2 against a loop written out from Eq. 7-8: e_g on steps 0, 2, 4, e_bar on 1, 3.
#[test]
fn period_two_matches_a_hand_written_loop() {
    let s = setup();
    let ours = s.sample(&s.e_bar, &s.e_g, 2);
    let mut x = s.noise.clone();
    for (k, &t) in s.scheduler.timesteps().iter().enumerate() {
        let cond = if k % 2 == 0 { &s.e_g } else { &s.e_bar };
        let input = s.scheduler.scale_model_input(x.clone(), t).unwrap();
        let eps_u = s.sd.unet().unwrap().forward(&input, t as f64, &s.uncond).unwrap();
        let eps_c = s.sd.unet().unwrap().forward(&input, t as f64, cond).unwrap();
        let eps = (&eps_u + ((eps_c - &eps_u).unwrap() * SCALE).unwrap()).unwrap();
        x = s.scheduler.step(&eps, t, &x).unwrap();
    }
    let err = max_abs(&ours, &x);
    assert!(err < 1e-4, "period 2 differs from the reference loop by {err}");
    // and it is neither plain sampling on e_bar nor on e_g
    assert!(max_abs(&ours, &s.plain(&s.e_bar)) > 1e-3);
    assert!(max_abs(&ours, &s.plain(&s.e_g)) > 1e-3);
}

#[test]
fn period_zero_is_plain_sampling_on_e_bar_bit_for_bit() {
    let s = setup();
    assert_eq!(values(&s.sample(&s.e_bar, &s.e_g, 0)), values(&s.plain(&s.e_bar)));
}

#[test]
fn period_one_is_plain_sampling_on_e_g() {
    let s = setup();
    assert_eq!(values(&s.sample(&s.e_bar, &s.e_g, 1)), values(&s.plain(&s.e_g)));
}

#[test]
fn equal_embeddings_give_plain_sampling() {
    let s = setup();
    for period in [1, 2, 3] {
        assert_eq!(values(&s.sample(&s.e_bar, &s.e_bar, period)), values(&s.plain(&s.e_bar)), "period {period}");
    }
}

#[test]
fn same_noise_same_output() {
    let s = setup();
    let a = s.sample(&s.e_bar, &s.e_g, 2);
    let b = s.sample(&s.e_bar, &s.e_g, 2);
    assert_eq!(values(&a), values(&b));
    assert!(values(&a).iter().all(|v| v.is_finite()));
}

/// The free `guided_noise` (any UNet) is what `StableDiffusion::guided_noise` computes.
#[test]
fn free_guided_noise_matches_the_method() {
    let s = setup();
    let t = s.scheduler.timesteps()[0];
    for scale in [1.0, SCALE] {
        let g = Guidance { cond: &s.e_g, uncond: &s.uncond, scale };
        let a = guided_noise(s.sd.unet().unwrap(), &s.noise, t, &g).unwrap();
        let b = s.sd.guided_noise(&s.noise, t, &g).unwrap();
        assert_eq!(values(&a), values(&b));
    }
}
