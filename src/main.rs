//! `layerdiff`: the command line. It parses flags, reports progress and prints; the library does
//! the work.

use anyhow::Result;
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use layerdiff::image_io;
use layerdiff::pipeline::{self, GenerateOptions, StableDiffusion};
use layerdiff::sources::{ModelFiles, SourceOptions};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "layerdiff", version, about = "Layered, text-guided editing of real photos with Stable Diffusion (LayerDiffusion, arXiv 2305.18676)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run: boxing would buy nothing
enum Command {
    /// Text-to-image (or image-to-image with --init-image) with a Stable Diffusion v1.x model.
    ///
    /// Example: layerdiff generate --model CompVis/stable-diffusion-v1-4 --prompt "a photo of a dog" --seed 1 --out dog.png
    Generate(GenerateArgs),
    /// Write a tiny random-weight Stable Diffusion pipeline in the diffusers layout (tests, demos).
    ///
    /// Its images are noise: real edits need SD v1.4/1.5 weights.
    TinyModel(TinyModelArgs),
    /// Time the full-size SD v1.4 UNet (random weights, no download): one forward, and one forward +
    /// backward with respect to the text context; medians and peak RSS, as JSON.
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Image side in pixels; the latents are size/8.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Timed runs per measurement (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Run on the CPU (same as --device cpu).
    #[arg(long)]
    cpu: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
    /// Also write the JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct ModelArgs {
    /// A diffusers folder, a single-file SD v1 checkpoint (.safetensors), or a Hugging Face repo id
    /// (CompVis/stable-diffusion-v1-4, runwayml/stable-diffusion-v1-5), downloaded to the standard
    /// cache (HF_HOME, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE are honoured).
    #[arg(long)]
    model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    revision: Option<String>,
    /// Use only the local Hugging Face cache (as HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// Weight file variant, e.g. fp16 for `diffusion_pytorch_model.fp16.safetensors`.
    #[arg(long)]
    variant: Option<String>,
    /// A tokenizer folder to use instead of the model's (tokenizer.json, or vocab.json + merges.txt).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Run on the CPU (same as --device cpu).
    #[arg(long)]
    cpu: bool,
    /// cpu, cuda or cuda:N. Default: cuda when built with it, else cpu.
    #[arg(long)]
    device: Option<String>,
    /// Weights and activations in this precision (the file's dtype is converted on load).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
}

#[derive(Clone, Copy, ValueEnum)]
enum Precision {
    F32,
    F16,
    Bf16,
}

impl From<Precision> for DType {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// What to draw.
    #[arg(long)]
    prompt: String,
    /// What to steer away from (the unconditional half of classifier-free guidance).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// DDIM denoising steps.
    #[arg(long, default_value_t = GenerateOptions::default().steps)]
    steps: usize,
    /// Classifier-free guidance scale; 1 turns guidance off.
    #[arg(long, default_value_t = GenerateOptions::default().guidance_scale)]
    guidance_scale: f64,
    /// Image width in pixels, a multiple of the VAE factor (8 for SD v1).
    #[arg(long, default_value_t = GenerateOptions::default().width)]
    width: usize,
    /// Image height in pixels, a multiple of the VAE factor (8 for SD v1).
    #[arg(long, default_value_t = GenerateOptions::default().height)]
    height: usize,
    /// Seed of the initial noise (image i uses seed + i). Default: a random seed, printed.
    #[arg(long)]
    seed: Option<u64>,
    /// Start from these latents instead of seeded noise: a safetensors file with a tensor named
    /// `latents` of shape [1, 4, height/8, width/8] (diffusers' `latents=`).
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Image-to-image (SDEdit): start from this picture, resized and centre-cropped to the size.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// With --init-image: how much of the schedule re-noises the picture, in (0, 1].
    #[arg(long, default_value_t = GenerateOptions::default().strength)]
    strength: f64,
    /// How many images; with more than one, PATH.png becomes PATH-0.png, PATH-1.png, ...
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Output PNG (written atomically).
    #[arg(long, default_value = "out.png")]
    out: PathBuf,
}

#[derive(Args)]
struct TinyModelArgs {
    /// Output folder (created).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// JSON overriding config keys per component: {"unet": {...}, "vae": {...}, "text_encoder": {...}, "scheduler": {...}}.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Precision of the written weights.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Generate(args) => generate(args),
        Command::TinyModel(args) => tiny_model(args),
        Command::Bench(args) => bench(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn device(cpu: bool, device: Option<&str>) -> Result<Device> {
    let default = if candle_core::utils::cuda_is_available() { "cuda" } else { "cpu" };
    let spec = if cpu { "cpu" } else { device.unwrap_or(default) };
    let device = match spec {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::new_cuda(n)?,
            None => anyhow::bail!("--device: `{s}` is not a device; use cpu, cuda or cuda:N"),
        },
    };
    Ok(device)
}

fn load_model(args: &ModelArgs) -> Result<StableDiffusion> {
    let env = SourceOptions::from_env();
    let opts = SourceOptions {
        offline: args.offline || env.offline,
        revision: args.revision.clone(),
        variant: args.variant.clone(),
        tokenizer: args.tokenizer.clone(),
        ..env
    };
    let files = ModelFiles::resolve(&args.model, &opts)?;
    Ok(StableDiffusion::load(&files, &device(args.cpu, args.device.as_deref())?, args.dtype.into())?)
}

fn progress_bar(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

fn generate(args: GenerateArgs) -> Result<()> {
    if args.num_images == 0 {
        anyhow::bail!("--num-images: 0; ask for at least one image");
    }
    let sd = load_model(&args.model)?;
    let seed = args.seed.unwrap_or_else(rand::random);
    if args.seed.is_none() {
        eprintln!("seed: {seed}");
    }
    let init_latents = match &args.init_latents {
        Some(path) => Some(pipeline::load_latents(path, &sd.device, sd.dtype)?),
        None => None,
    };
    let init_image = match &args.init_image {
        Some(path) => {
            let img = image_io::resize_center_crop(&image_io::load_rgb(path)?, args.width as u32, args.height as u32);
            Some(image_io::image_to_tensor(&img, &sd.device, sd.dtype)?)
        }
        None => None,
    };
    for i in 0..args.num_images {
        let opts = GenerateOptions {
            prompt: args.prompt.clone(),
            negative_prompt: args.negative_prompt.clone(),
            steps: args.steps,
            guidance_scale: args.guidance_scale,
            width: args.width,
            height: args.height,
            seed: seed.wrapping_add(i as u64),
            init_latents: init_latents.clone(),
            init_image: init_image.clone(),
            strength: args.strength,
        };
        let bar = progress_bar(args.steps, "denoising");
        let image = pipeline::generate(&sd, &opts, &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })?;
        bar.finish_and_clear();
        let path = numbered(&args.out, i, args.num_images);
        image_io::save_png_atomic(&image_io::tensor_to_images(&image)?[0], &path)?;
        println!("{}", path.display());
    }
    Ok(())
}

/// `out.png` for one image, `out-0.png`, `out-1.png`, ... for several.
fn numbered(out: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let ext = out.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}-{i}.{ext}"))
}

fn tiny_model(args: TinyModelArgs) -> Result<()> {
    let overrides = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
            Some(serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--config {}: not JSON ({e})", path.display()))?)
        }
        None => None,
    };
    layerdiff::tiny::write_tiny_model(&args.out, args.seed, overrides.as_ref(), args.dtype.into())?;
    println!("{}", args.out.display());
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.size == 0 || !args.size.is_multiple_of(8) {
        anyhow::bail!("--size: {} is not a positive multiple of 8; use 256 or 512", args.size);
    }
    let device = device(args.cpu, args.device.as_deref())?;
    let report = layerdiff::bench::bench_unet(&device, args.dtype.into(), args.size / 8, args.runs)?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.json {
        image_io::write_atomic(path, json.as_bytes())?;
    }
    println!("{json}");
    Ok(())
}
