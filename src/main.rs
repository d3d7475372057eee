//! `layerdiff`: the command line. It parses flags, reports progress and prints; the library does
//! the work.

use anyhow::Result;
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use layerdiff::image_io;
use layerdiff::method::edit::{self as method_edit, BackgroundSource, EditRequest, Progress};
use layerdiff::method::session::{self, SessionInfo};
use layerdiff::method::{EditSettings, FinetuneMode, GuidanceEmbedding};
use layerdiff::pipeline::{self, GenerateOptions, StableDiffusion};
use layerdiff::segment::{self, parse_box, parse_xy, CleanOptions, Multimask, Point, Prompt, SegmentOptions, Segmenter};
use layerdiff::sources::{ModelFiles, SourceOptions};
use layerdiff::toyworld;
use layerdiff::train::{self, TrainEvent, TrainSettings};
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
    /// Edit a photo with LayerDiffusion: the subject (under --mask) takes the --object text's new
    /// state, the rest becomes the --background text, and the subject keeps its own look.
    ///
    /// Example: layerdiff edit --model CompVis/stable-diffusion-v1-4 --image dog.jpg --mask dog-mask.png
    ///   --object "a jumping dog" --background "a dense forest" --seeds 1,2,3 --out dog-edit
    ///
    /// Writes edit-<seed>.png, sheet.png, mask.png, background.png, session.json and
    /// session.safetensors into --out; `layerdiff sample --session` draws more from it, and
    /// `layerdiff edit --resume DIR` finishes a run that was stopped.
    Edit(Box<EditArgs>),
    /// Make a subject mask from clicks or a box with Segment Anything (MobileSAM by default).
    ///
    /// Example: layerdiff segment --image dog.jpg --point 320,240 --out dog-mask.png
    ///
    /// Coordinates are the photo's pixels, x from the left, y from the top. Writes the mask
    /// (white = selected, the photo's size) to --out and the mask tinted over the photo, with the
    /// points and box drawn, to <out>-overlay.png. `layerdiff edit --point/--box` does the same
    /// on the fly.
    Segment(SegmentArgs),
    /// Score edited images: CLIP score against the target text, and subject, background and
    /// whole-image fidelity to the input in CLIP and DINOv2 spaces; one CSV row per image.
    ///
    /// Example: layerdiff score --images dog-edit --csv scores.csv
    ///   (an edit's --out folder: its texts, photo and mask are read from session.json), or
    ///   layerdiff score --images outputs/ --text "a jumping dog in a dense forest" --input dog.jpg --mask dog-mask.png --csv scores.csv
    Score(ScoreArgs),
    /// Edit every row of a benchmark manifest with one or more methods, score each output, and
    /// write results.csv, summary.md (the per-method table of the paper's Table 1) and a contact
    /// sheet per row; a second run resumes where the first stopped.
    ///
    /// Example: layerdiff batch --model CompVis/stable-diffusion-v1-4 --manifest tedbench/input_list.json
    ///   --images tedbench/originals --method layerdiffusion,sdedit --seeds 1,2 --out runs/tedbench
    ///
    /// The manifest: a JSON list of {"img_name", "target_text"} (TEdBench's input_list.json),
    /// optionally with "object", "background", and the subject as "mask" (relative to --images),
    /// "point" [x,y] or "box" [x0,y0,x1,y1] (Segment Anything). Rows without a subject are edited
    /// by the whole-photo baselines only. --shard K/N runs rows with index mod N == K (a Slurm
    /// job array, a Kubernetes indexed Job); --summarize --out DIR merges the shards' results.
    Batch(Box<BatchArgs>),
    /// Draw new images from a finished edit session without repeating stages 1 and 2.
    ///
    /// Example: layerdiff sample --session dog-edit --seeds 7,8 --alpha 0.6 --out dog-more
    Sample(SampleArgs),
    /// Write a tiny random-weight Stable Diffusion pipeline in the diffusers layout, or a tiny SAM
    /// or MobileSAM checkpoint in the segment-anything layout (tests, demos).
    ///
    /// Their outputs are noise: real edits need SD v1.4/1.5 weights, real masks SAM weights.
    TinyModel(TinyModelArgs),
    /// Time the full-size SD v1.4 UNet (random weights, no download): one forward, and one forward +
    /// backward with respect to the text context; medians and peak RSS, as JSON. --stages times
    /// the steps of an edit's three stages and projects a default edit's time, --sam a Segment
    /// Anything model.
    ///
    /// Example: layerdiff bench --stages --size 512 --finetune lora --steps 3 --json stages.json
    Bench(BenchArgs),
    /// The toy world: procedural scenes (a shape on a background) with exact captions, masks and
    /// scorers, to train a tiny Stable Diffusion on a CPU and measure edits exactly.
    ///
    /// Example: layerdiff toyworld data --n 6000 --size 32 --seed 0 --out toy-data
    #[command(subcommand)]
    Toyworld(ToyworldCommand),
    /// Train a tiny Stable Diffusion from scratch on a toy-world dataset: the VAE first, then the
    /// UNet and text encoder (v-prediction, cosine schedule, AdamW, EMA, 10 % caption dropout).
    /// Writes the EMA model in the diffusers layout to --out at every checkpoint, samples it on
    /// held-out captions and prints the scorers' accuracies; --resume continues a stopped run.
    ///
    /// Example: layerdiff train --data toy-data --out toy-model --minutes 60, then again with --resume
    Train(TrainArgs),
}

#[derive(Subcommand)]
enum ToyworldCommand {
    /// Write N scenes: images/NNNNNN.png, masks/NNNNNN.png (white = subject), scenes.jsonl (caption
    /// and attributes per scene) and world.json. Scene i depends only on (--seed, i); a stopped
    /// run resumes when given the same flags.
    Data(ToyDataArgs),
    /// Edit tasks from held-out scenes (a new background, size or position, or a background with
    /// one of those) with each method, every output read by the exact scorers: results.csv,
    /// summary.md (the paper's Table 1 form) and sheet.png. A stopped run resumes.
    ///
    /// Example: layerdiff toyworld bench --model assets/toy-sd --methods layerdiffusion,imagic,sdedit
    ///   --ablations --tasks 20 --seeds 1,2 --out toy-bench
    Bench(ToyBenchArgs),
}

#[derive(Args)]
struct ToyBenchArgs {
    /// The toy model (`layerdiff train`).
    #[arg(long, default_value = "assets/toy-sd")]
    model: String,
    /// Any of layerdiffusion, imagic, sdedit.
    #[arg(long, value_delimiter = ',', default_value = "layerdiffusion,imagic,sdedit")]
    methods: Vec<String>,
    /// Also LayerDiffusion without stage 1, without fine-tuning, without iterative guidance,
    /// with alpha 0 and 1, and with lambda_o 1 and 3.
    #[arg(long)]
    ablations: bool,
    #[arg(long, default_value_t = 10)]
    tasks: usize,
    /// One output per seed, per task and variant.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    seeds: Vec<u64>,
    /// The world seed the model was trained on: tasks come from its held-out scenes.
    #[arg(long, default_value_t = 0)]
    world_seed: u64,
    /// Image side: the model's training size.
    #[arg(long, default_value_t = 32)]
    size: u32,
    #[arg(long, default_value_t = toyworld::bench::toy_edit_settings().embedding_steps)]
    embedding_steps: usize,
    #[arg(long, default_value_t = toyworld::bench::toy_edit_settings().finetune_steps)]
    finetune_steps: usize,
    #[arg(long, default_value_t = toyworld::bench::toy_edit_settings().finetune_lr)]
    finetune_lr: f64,
    /// DDIM steps of the sampling.
    #[arg(long, default_value_t = toyworld::bench::toy_edit_settings().steps)]
    steps: usize,
    #[arg(long, default_value_t = toyworld::bench::toy_edit_settings().guidance_scale)]
    guidance_scale: f64,
    /// SDEdit's strength.
    #[arg(long, default_value_t = layerdiff::baselines::SDEDIT_STRENGTH)]
    strength: f64,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    place: PlaceArgs,
}

#[derive(Args)]
struct ToyDataArgs {
    /// How many scenes.
    #[arg(long, default_value_t = 6000)]
    n: usize,
    /// Image side in pixels (at least 16).
    #[arg(long, default_value_t = 32)]
    size: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The dataset folder (new, or one this command wrote with the same flags).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct TrainArgs {
    /// A toy-world dataset (`layerdiff toyworld data`).
    #[arg(long)]
    data: PathBuf,
    /// The model folder: the diffusers pipeline, train-state.safetensors and train-log.jsonl.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint: the same flags as the first run, except
    /// --steps, --vae-steps, --checkpoint-every and --eval-* (to train longer, say).
    #[arg(long)]
    resume: bool,
    /// Stop cleanly, with a checkpoint, after this many minutes; --resume goes on.
    #[arg(long)]
    minutes: Option<f64>,
    #[arg(long, default_value_t = TrainSettings::default().seed)]
    seed: u64,
    /// Optimizer steps of the VAE phase.
    #[arg(long, default_value_t = TrainSettings::default().vae_steps)]
    vae_steps: usize,
    /// Optimizer steps of the UNet + text encoder phase.
    #[arg(long, default_value_t = TrainSettings::default().steps)]
    steps: usize,
    #[arg(long, default_value_t = TrainSettings::default().batch)]
    batch: usize,
    #[arg(long, default_value_t = TrainSettings::default().vae_lr)]
    vae_lr: f64,
    #[arg(long, default_value_t = TrainSettings::default().lr)]
    lr: f64,
    /// Linear learning-rate warm-up steps (each phase).
    #[arg(long, default_value_t = TrainSettings::default().warmup)]
    warmup: usize,
    /// AdamW's decoupled weight decay (UNet and text encoder).
    #[arg(long, default_value_t = TrainSettings::default().weight_decay)]
    weight_decay: f64,
    /// Clip the gradients' global norm to this.
    #[arg(long, default_value_t = TrainSettings::default().clip)]
    clip: f64,
    /// EMA decay of the exported weights.
    #[arg(long, default_value_t = TrainSettings::default().ema)]
    ema: f64,
    /// Fraction of captions dropped to "" (for classifier-free guidance).
    #[arg(long, default_value_t = TrainSettings::default().caption_dropout)]
    caption_dropout: f64,
    /// Weight of the VAE's KL term.
    #[arg(long, default_value_t = TrainSettings::default().kl_weight)]
    kl_weight: f64,
    /// Checkpoint, export and evaluate every this many steps.
    #[arg(long, default_value_t = TrainSettings::default().checkpoint_every)]
    checkpoint_every: usize,
    /// Held-out captions sampled and scored at each checkpoint (0: skip).
    #[arg(long, default_value_t = TrainSettings::default().eval_samples)]
    eval_samples: usize,
    /// DDIM steps of those samples.
    #[arg(long, default_value_t = TrainSettings::default().eval_steps)]
    eval_steps: usize,
    /// Guidance scale of those samples.
    #[arg(long, default_value_t = TrainSettings::default().eval_guidance)]
    eval_guidance: f64,
    #[command(flatten)]
    place: PlaceArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// Image side in pixels, a positive multiple of 8 (256 or 512); the latents are size/8.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Timed runs per measurement (after one warm-up); the median is reported. Not with
    /// --stages, which takes --steps.
    #[arg(long, default_value_t = 3, conflicts_with = "stages")]
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
    /// Time the steps of an edit's three stages instead: per-step medians, peak memory per stage
    /// (RSS on the CPU, the memory pool's peak on a GPU) and the projected time of a default edit
    /// (500 x stage 1 + 250 x stage 2 + 50 x stage 3); a table on stderr, JSON on stdout.
    #[arg(long)]
    stages: bool,
    /// With --stages: which stage 2 to time, every weight (full: about 13 GB at --size 256 on
    /// the CPU, 11.4 GB with --gradient-checkpointing) or rank-4 LoRA adapters (lora: about 5.2 GB).
    #[arg(long, value_enum, default_value_t = EditSettings::default().finetune, requires = "stages")]
    finetune: FinetuneMode,
    /// With --stages: timed steps per stage, after one warm-up step; the median is reported.
    #[arg(long, default_value_t = 3, requires = "stages")]
    steps: usize,
    /// With --stages: stage 2 with gradient checkpointing (as `edit --gradient-checkpointing`).
    #[arg(long, requires = "stages")]
    gradient_checkpointing: bool,
    /// With --stages on a GPU: run the timed steps of stage N (1, 2 or 3) between
    /// cuProfilerStart and cuProfilerStop, so that a profiler started with its collection off
    /// records only those (with --steps 1, one step). Example: ncu --profile-from-start off
    /// layerdiff bench --stages --device cuda --steps 1 --profile-stage 2
    #[arg(long, value_name = "N", requires = "stages")]
    profile_stage: Option<usize>,
    /// With --stages: the tiny test UNet instead of SD v1.4's (tests; the numbers mean nothing).
    #[arg(long, hide = true, requires = "stages")]
    tiny: bool,
    /// With --stages: a diffusers UNet config.json to time instead of SD v1.4's (SD 2.1's, say),
    /// with random weights; `tools/bench_stages_ref.py --unet-config` builds the same in PyTorch.
    #[arg(long, requires = "stages", conflicts_with = "tiny")]
    unet_config: Option<PathBuf>,
    /// Time Segment Anything instead, at its full size (1024 px input): one image embedding and
    /// one click's decoding.
    #[arg(long, value_enum, conflicts_with_all = ["stages", "size"])]
    sam: Option<SamKind>,
}

/// The released Segment Anything models.
#[derive(Clone, Copy, ValueEnum)]
enum SamKind {
    VitB,
    VitL,
    VitH,
    MobileSam,
}

/// Where the model comes from and how it runs (`--model` itself is each command's).
#[derive(Args)]
struct RuntimeArgs {
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    revision: Option<String>,
    /// Weight file variant, e.g. fp16 for `diffusion_pytorch_model.fp16.safetensors`.
    #[arg(long)]
    variant: Option<String>,
    /// A tokenizer folder to use instead of the model's (tokenizer.json, or vocab.json + merges.txt).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    place: PlaceArgs,
    /// Weights and activations in this precision (the file's dtype is converted on load).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
}

impl RuntimeArgs {
    /// The hub settings of the environment with this command's flags.
    fn sources(&self) -> SourceOptions {
        SourceOptions { revision: self.revision.clone(), variant: self.variant.clone(), tokenizer: self.tokenizer.clone(), ..self.place.sources() }
    }
}

/// Where a command runs and whether it may use the network (every command that loads a model).
#[derive(Args)]
struct PlaceArgs {
    /// Run on the CPU (same as --device cpu).
    #[arg(long)]
    cpu: bool,
    /// cpu, cuda or cuda:N. Default: cuda when built with it, else cpu.
    #[arg(long)]
    device: Option<String>,
    /// Use only the local Hugging Face cache (as HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
}

impl PlaceArgs {
    fn device(&self) -> Result<Device> {
        device(self.cpu, self.device.as_deref())
    }

    /// The environment's hub settings (`HF_ENDPOINT`, `HF_HUB_OFFLINE`, ...), offline with --offline.
    fn sources(&self) -> SourceOptions {
        let env = SourceOptions::from_env();
        SourceOptions { offline: self.offline || env.offline, ..env }
    }
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

/// `--model`'s help, shared by the commands.
const MODEL_HELP: &str = "A diffusers folder, a single-file SD v1 checkpoint (.safetensors), or a Hugging Face repo id \
(CompVis/stable-diffusion-v1-4, runwayml/stable-diffusion-v1-5), downloaded to the standard cache \
(HF_HOME, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE are honoured)";

#[derive(Args)]
struct GenerateArgs {
    #[arg(long, help = MODEL_HELP)]
    model: String,
    #[command(flatten)]
    runtime: RuntimeArgs,
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
struct EditArgs {
    #[arg(long, help = MODEL_HELP, required_unless_present = "resume")]
    model: Option<String>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// The subject photo (PNG, JPEG or WebP).
    #[arg(long, required_unless_present = "resume")]
    image: Option<PathBuf>,
    /// The subject mask: white = subject, any size (resized to the photo). Or make it with
    /// --point/--box.
    #[arg(long, required_unless_present_any = ["resume", "points", "bbox"], conflicts_with_all = ["points", "bbox"])]
    mask: Option<PathBuf>,
    /// Make the subject mask with Segment Anything from this point on the subject (x,y in the
    /// photo's pixels; repeat for more); saved as sam-mask.png and sam-mask-overlay.png in --out.
    #[arg(long = "point", value_parser = parse_xy)]
    points: Vec<[f32; 2]>,
    /// A point that is not the subject, for Segment Anything (x,y; repeat for more).
    #[arg(long = "negative-point", value_parser = parse_xy, requires = "points")]
    negative_points: Vec<[f32; 2]>,
    /// Make the subject mask with Segment Anything from a box around it: x0,y0,x1,y1.
    #[arg(long = "box", value_parser = parse_box)]
    bbox: Option<[f32; 4]>,
    /// The object layer's text, the subject's new state: "a jumping dog".
    #[arg(long, required_unless_present = "resume")]
    object: Option<String>,
    /// The background layer's text: "a dense forest".
    #[arg(long, required_unless_present = "resume")]
    background: Option<String>,
    /// The full target text; default "<object> in <background>" (used by the baselines).
    #[arg(long)]
    prompt: Option<String>,
    /// Where the background layer comes from: Stable Diffusion's image for --background
    /// (generated), --background-image (image), or the photo itself (keep: edit only the subject).
    #[arg(long, value_enum, default_value_t = BackgroundKind::Generated)]
    background_source: BackgroundKind,
    /// With --background-source image: the background picture.
    #[arg(long)]
    background_image: Option<PathBuf>,
    /// With --background-source image: white where the picture is NOT background (default: none).
    #[arg(long)]
    background_mask: Option<PathBuf>,
    /// With --background-image: make its mask with Segment Anything from a point on what is NOT
    /// background (x,y; repeat for more); saved as sam-background-mask.png in --out.
    #[arg(long = "background-point", value_parser = parse_xy, requires = "background_image", conflicts_with = "background_mask")]
    background_points: Vec<[f32; 2]>,
    /// With --background-point: a point that IS background (x,y; repeat for more).
    #[arg(long = "background-negative-point", value_parser = parse_xy, requires = "background_points")]
    background_negative_points: Vec<[f32; 2]>,
    /// With --background-image: a box around what is NOT background, for Segment Anything.
    #[arg(long = "background-box", value_parser = parse_box, requires = "background_image", conflicts_with = "background_mask")]
    background_bbox: Option<[f32; 4]>,
    #[command(flatten)]
    sam: SamArgs,
    /// Seeds of the edited images, one image each: 1,2,3.
    #[arg(long, value_delimiter = ',', conflicts_with = "num_images")]
    seeds: Vec<u64>,
    /// Number of edited images, seeds 0..N (when --seeds is not given).
    #[arg(long, default_value_t = 1)]
    num_images: u64,
    /// Seed of stages 1 and 2 and of the generated background.
    #[arg(long, default_value_t = 0)]
    train_seed: u64,
    /// Side of the square working size: the photo is resized and centre-cropped to it.
    #[arg(long, default_value_t = 512)]
    size: u32,
    /// e_bar = alpha e_o* + (1 - alpha) e_b* (Eq. 3), in [0, 1]; Imagic's eta with --method imagic. [default: 0.7]
    #[arg(long)]
    alpha: Option<f64>,
    /// lambda_o of Eq. 6; default 2, or 3 for a subject under 10 % of the image.
    #[arg(long)]
    lambda_object: Option<f64>,
    /// lambda_b of Eq. 6.
    #[arg(long, default_value_t = EditSettings::default().lambda_background)]
    lambda_background: f64,
    /// Stage 1 (layered embedding optimization) Adam steps. [default: 500]
    #[arg(long)]
    embedding_steps: Option<usize>,
    /// Stage 1 learning rate. [default: 1e-3]
    #[arg(long)]
    embedding_lr: Option<f64>,
    /// Stage 2 (layered UNet fine-tuning) Adam steps. [default: 250; Imagic 1000]
    #[arg(long)]
    finetune_steps: Option<usize>,
    /// Stage 2 learning rate. [default: 2e-6]
    #[arg(long)]
    finetune_lr: Option<f64>,
    /// Stage 2 trains every UNet weight (full, the paper's) or low-rank adapters on the attention
    /// projections (lora: far less memory).
    #[arg(long, value_enum, default_value_t = FinetuneMode::Full)]
    finetune: FinetuneMode,
    /// Rank of the LoRA adapters.
    #[arg(long, default_value_t = EditSettings::default().lora_rank)]
    lora_rank: usize,
    /// Stage 2 keeps only the outputs of the UNet's layers and recomputes the rest in the
    /// backward: full fine-tuning at 512 px in far less memory, for a third more arithmetic per
    /// step; the same steps to rounding.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Stage 3 DDIM steps.
    #[arg(long, default_value_t = EditSettings::default().steps)]
    steps: usize,
    /// Classifier-free guidance scale of stage 3.
    #[arg(long, default_value_t = EditSettings::default().guidance_scale)]
    guidance_scale: f64,
    /// Every period-th step is conditioned on the object text (Eq. 7); 0 turns iterative guidance
    /// off. [default: 2; Imagic 0]
    #[arg(long)]
    guidance_period: Option<usize>,
    /// The embedding of the guided steps: the object text (target) or the optimized e_o* (optimized).
    #[arg(long, value_enum, default_value_t = GuidanceEmbedding::Target)]
    guidance_embedding: GuidanceEmbedding,
    /// layerdiffusion, or a baseline of the paper's comparison on the same inputs: imagic
    /// (optimize c(T) on the whole photo, fine-tune, sample eta c(T) + (1 - eta) e*) or sdedit
    /// (noise the photo to --strength and denoise with the full text).
    #[arg(long, value_enum, default_value_t = Method::Layerdiffusion)]
    method: Method,
    /// SDEdit: the fraction of the schedule the photo is noised to.
    #[arg(long, default_value_t = layerdiff::baselines::SDEDIT_STRENGTH)]
    strength: f64,
    /// Steps between checkpoints of stages 1 and 2.
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Output folder.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the stopped edit in this folder (its settings are the session's).
    #[arg(long, conflicts_with_all = ["image", "mask", "object", "background", "out"])]
    resume: Option<PathBuf>,
    /// Write into an --out folder that already holds an edit.
    #[arg(long)]
    force: bool,
}

/// `layerdiff batch`: the essential edit options; the rest keep their defaults.
#[derive(Args)]
struct BatchArgs {
    #[arg(long, help = MODEL_HELP, required_unless_present = "summarize")]
    model: Option<String>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// The manifest: a JSON list of {"img_name", "target_text"} rows, as TEdBench's input_list.json.
    #[arg(long, required_unless_present = "summarize")]
    manifest: Option<PathBuf>,
    /// The folder the manifest's img_name (and mask) paths are relative to.
    #[arg(long, required_unless_present = "summarize")]
    images: Option<PathBuf>,
    /// The methods to compare, comma-separated: layerdiffusion,imagic,sdedit.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "layerdiffusion")]
    method: Vec<Method>,
    /// Seeds of the edited images, one image each per row and method: 1,2,3.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    seeds: Vec<u64>,
    /// Side of the square working size.
    #[arg(long, default_value_t = 512)]
    size: u32,
    /// Stage 1 Adam steps. [default: 500; Imagic 1000]
    #[arg(long)]
    embedding_steps: Option<usize>,
    /// Stage 2 Adam steps. [default: 250; Imagic 1000]
    #[arg(long)]
    finetune_steps: Option<usize>,
    /// Stage 3 (and SDEdit's) DDIM steps.
    #[arg(long, default_value_t = EditSettings::default().steps)]
    steps: usize,
    /// Stage 2 trains every UNet weight (full) or LoRA adapters (lora).
    #[arg(long, value_enum, default_value_t = EditSettings::default().finetune)]
    finetune: FinetuneMode,
    /// Stage 2 recomputes the UNet's activations in its backward (as `edit --gradient-checkpointing`).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// alpha of Eq. 3; Imagic's eta. [default: 0.7]
    #[arg(long)]
    alpha: Option<f64>,
    /// SDEdit's strength.
    #[arg(long, default_value_t = layerdiff::baselines::SDEDIT_STRENGTH)]
    strength: f64,
    /// Seed of stages 1 and 2 and of the generated background.
    #[arg(long, default_value_t = 0)]
    train_seed: u64,
    /// keep: edit only the subject, the photo's background stays (the background text, default
    /// the target text, only steers stage 1); generated: Stable Diffusion's image for it.
    #[arg(long, value_enum, default_value_t = BackgroundKind::Keep)]
    background_source: BackgroundKind,
    /// Run only rows whose index mod N is K: K/N (e.g. $SLURM_ARRAY_TASK_ID/$N); writes
    /// results-shard-K-of-N.csv.
    #[arg(long, value_parser = clap::value_parser!(layerdiff::eval::Shard))]
    shard: Option<layerdiff::eval::Shard>,
    /// Only merge every results*.csv in --out into summary.md (no model needed).
    #[arg(long, conflicts_with_all = ["model", "manifest", "images", "shard"])]
    summarize: bool,
    /// Output folder (shared by the shards).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    metrics: MetricArgs,
    /// Segment Anything checkpoint, for rows with "point" or "box".
    #[arg(long, default_value = segment::DEFAULT_SAM_MODEL)]
    sam_model: String,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TinyKind {
    Sd,
    Sam,
    MobileSam,
    Clip,
    Dinov2,
}

/// The metric models (`score`, `batch`).
#[derive(Args)]
struct MetricArgs {
    /// CLIP model for the CLIP score and CLIP fidelity: a transformers folder or hub id.
    #[arg(long, default_value = layerdiff::eval::DEFAULT_CLIP_MODEL)]
    clip_model: String,
    /// DINOv2 model for the DINO fidelity: a transformers folder or hub id.
    #[arg(long, default_value = layerdiff::eval::DEFAULT_DINO_MODEL)]
    dino_model: String,
    /// Skip the DINOv2 metrics.
    #[arg(long)]
    no_dino: bool,
}

impl MetricArgs {
    fn scorer_options(&self, source: SourceOptions, device: Device) -> layerdiff::eval::ScorerOptions {
        layerdiff::eval::ScorerOptions {
            clip_model: self.clip_model.clone(),
            dino_model: (!self.no_dino).then(|| self.dino_model.clone()),
            source,
            device,
        }
    }
}

#[derive(Args)]
struct ScoreArgs {
    /// Edit session folders (an --out of `layerdiff edit`), image files, or folders of images; repeat.
    #[arg(long, required = true, num_args = 1..)]
    images: Vec<PathBuf>,
    /// The target text of images outside a session (replaces a session's own when given).
    #[arg(long)]
    text: Option<String>,
    /// The input photo, for the fidelity metrics of images outside a session.
    #[arg(long)]
    input: Option<PathBuf>,
    /// The subject's mask on --input (white = subject); default: the whole photo.
    #[arg(long, requires = "input")]
    mask: Option<PathBuf>,
    /// The background source; default: --input.
    #[arg(long, requires = "input")]
    background: Option<PathBuf>,
    /// White where --background is NOT background.
    #[arg(long, requires = "background")]
    background_mask: Option<PathBuf>,
    /// The CSV to write (atomically).
    #[arg(long)]
    csv: PathBuf,
    #[command(flatten)]
    metrics: MetricArgs,
    #[command(flatten)]
    place: PlaceArgs,
}

/// The Segment Anything model and how its masks are cleaned (`segment`, `edit --point/--box`).
#[derive(Args)]
struct SamArgs {
    /// SAM checkpoint in the segment-anything layout: a .safetensors file, a folder holding one, or
    /// org/name/file on the hub (lmz/candle-sam/sam_vit_b_01ec64.safetensors for ViT-B). ViT-B, -L,
    /// -H and MobileSAM are told apart by their tensors.
    #[arg(long, default_value = segment::DEFAULT_SAM_MODEL)]
    sam_model: String,
    /// Ask SAM for three candidate masks and keep the one it rates best (auto: for a lone click).
    #[arg(long, value_enum, default_value_t = Multimask::Auto)]
    multimask: Multimask,
    /// Grow the mask by this many pixels (0-255): a margin for fur and hair.
    #[arg(long, default_value_t = 0)]
    dilate: u8,
    /// Keep holes inside the mask (by default they are filled, except under a --negative-point).
    #[arg(long)]
    keep_holes: bool,
}

impl SamArgs {
    fn options(&self) -> SegmentOptions {
        SegmentOptions { multimask: self.multimask, clean: CleanOptions { fill_holes: !self.keep_holes, dilate: self.dilate } }
    }

    fn load(&self, place: &PlaceArgs) -> Result<Segmenter> {
        let sam = Segmenter::load(&self.sam_model, &place.sources(), &place.device()?)?;
        eprintln!("segment anything: {} ({})", sam.path.display(), sam.describe());
        Ok(sam)
    }
}

/// Points and a box as the user gave them.
fn prompt(points: &[[f32; 2]], negative: &[[f32; 2]], bbox: Option<[f32; 4]>) -> Prompt {
    let point = |foreground| move |&[x, y]: &[f32; 2]| Point { x, y, foreground };
    Prompt { points: points.iter().map(point(true)).chain(negative.iter().map(point(false))).collect(), bbox }
}

#[derive(Args)]
struct SegmentArgs {
    /// The photo.
    #[arg(long)]
    image: PathBuf,
    /// A point on the subject, x,y in pixels; repeat for more.
    #[arg(long = "point", value_parser = parse_xy)]
    points: Vec<[f32; 2]>,
    /// A point that is NOT the subject, x,y in pixels; repeat for more.
    #[arg(long = "negative-point", value_parser = parse_xy)]
    negative_points: Vec<[f32; 2]>,
    /// A box around the subject: x0,y0,x1,y1 in pixels (top-left, bottom-right).
    #[arg(long = "box", value_parser = parse_box)]
    bbox: Option<[f32; 4]>,
    /// The mask to write (PNG); the overlay goes beside it as <stem>-overlay.png.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    sam: SamArgs,
    #[command(flatten)]
    place: PlaceArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Method {
    Layerdiffusion,
    Imagic,
    Sdedit,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackgroundKind {
    Generated,
    Image,
    Keep,
}

#[derive(Args)]
struct SampleArgs {
    /// The --out folder of a finished `layerdiff edit`.
    #[arg(long)]
    session: PathBuf,
    /// Default: the session's model.
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Seeds of the new images: 7,8.
    #[arg(long, value_delimiter = ',', required = true)]
    seeds: Vec<u64>,
    /// Override the session's alpha (Eq. 3).
    #[arg(long)]
    alpha: Option<f64>,
    /// Override the session's iterative-guidance period (Eq. 7); 0 turns it off.
    #[arg(long)]
    guidance_period: Option<usize>,
    /// Output folder (edit-<seed>.png).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct TinyModelArgs {
    /// Output folder (created).
    #[arg(long)]
    out: PathBuf,
    /// sd: a Stable Diffusion pipeline; sam / mobile-sam: `tiny-sam.safetensors` /
    /// `tiny-mobile-sam.safetensors` for --sam-model; clip / dinov2: a transformers folder for
    /// --clip-model / --dino-model.
    #[arg(long, value_enum, default_value_t = TinyKind::Sd)]
    kind: TinyKind,
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

/// Training and editing allocate and free tensors of megabytes every step; glibc hands those
/// back to the kernel and faults them in afresh (a fifth of a toy-model training step), mimalloc
/// keeps them (see `keep_freed_memory`) until a stage ends.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// A purge delay no run outlasts: 10^9 ms, 11 days.
const NEVER_DURING_A_RUN: std::ffi::c_long = 1_000_000_000;

/// By default mimalloc returns memory that stayed free for a second to the kernel, which then
/// faults it in and zeroes it afresh on the next step: 480 000 page faults in six toy training
/// steps, a fifth of their CPU time. Freed memory is kept instead: a delay of 10 s still cost a
/// full-size 512 px CPU step 125 000 faults and a fifth of its CPU time, as its steps outlast the
/// delay, while the peak grew by 2 %. The delay is one no run reaches rather than "never" (-1):
/// with -1 mimalloc does not even note what could be given back, and `give_back_kept_memory`
/// could not give it back at the end of a stage. `MIMALLOC_PURGE_DELAY` (milliseconds) overrides
/// this.
fn keep_freed_memory() {
    set_purge_delay(NEVER_DURING_A_RUN);
}

/// At the end of a stage (`method::edit::AFTER_STAGE`): the memory it freed goes back to the
/// kernel, so the next stage holds only its own. Sampling after stage 2 held its peak (at 512 px
/// on the CPU, 8 GiB where it needs 5). The next stage faults its memory in once (about 1 s per 4
/// GiB).
fn give_back_kept_memory() {
    // SAFETY: a forced collection of the allocator's free memory; valid at any time.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Where full fine-tuning needs most of the free memory, memory kept for reuse can tip it over:
/// at 256 px on the CPU it peaked at 22.5 GiB with memory given back at once, and was killed on a
/// 24 GiB machine with the 10 s delay. Memory over speed there (`method::edit::ON_TIGHT_MEMORY`).
fn give_back_freed_memory_at_once() {
    set_purge_delay(0);
}

fn set_purge_delay(milliseconds: std::ffi::c_long) {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option of the allocator; valid at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, milliseconds) };
    }
}

fn main() {
    keep_freed_memory();
    method_edit::ON_TIGHT_MEMORY.get_or_init(|| give_back_freed_memory_at_once);
    method_edit::AFTER_STAGE.get_or_init(|| give_back_kept_memory);
    tune_thread_pools();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Generate(args) => generate(args),
        Command::Edit(args) => edit(*args),
        Command::Segment(args) => segment(args),
        Command::Score(args) => score(args),
        Command::Batch(args) => batch(*args),
        Command::Sample(args) => sample(args),
        Command::TinyModel(args) => tiny_model(args),
        Command::Bench(args) => bench(args),
        Command::Toyworld(ToyworldCommand::Data(args)) => toyworld_data(args),
        Command::Toyworld(ToyworldCommand::Bench(args)) => toyworld_bench(args),
        Command::Train(args) => train(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// candle looks up its CPU thread count before every matmul and convolution, and on Linux that
/// reads /proc/cpuinfo unless RAYON_NUM_THREADS is set: hundreds of thousands of reads per run,
/// 30 % of MobileSAM's time. Setting it once, to the same count, spares them. Runs before any
/// thread exists, so changing the environment is safe.
///
/// candle's element-wise ops run on a pool whose idle workers spin 25 000 times before they
/// sleep, taking a core from the matrix products that follow; 100 spins made the 256 px forward +
/// backward 5 to 10 % faster on 2 cores. `CANDLE_BARRIER_POOL_SPIN_LIMIT` set by hand wins.
fn tune_thread_pools() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
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
    layerdiff::pipeline::configure_cuda(&device);
    Ok(device)
}

fn load_model(model: &str, args: &RuntimeArgs) -> Result<(ModelFiles, StableDiffusion)> {
    let files = ModelFiles::resolve(model, &args.sources())?;
    let sd = StableDiffusion::load(&files, &args.place.device()?, args.dtype.into())?;
    Ok((files, sd))
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
    let (_, sd) = load_model(&args.model, &args.runtime)?;
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
            let img = image_io::resize_center_crop(&image_io::load_rgb(path)?, args.width as u32, args.height as u32).0;
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

/// The JSON file a flag names, or a one-line error naming the flag and the file.
fn read_json_arg(flag: &str, path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{flag} {}: not JSON ({e})", path.display()))
}

/// `bench --unet-config`: the JSON, checked here so that an error names the flag and the file.
fn read_unet_config(path: &Path) -> Result<serde_json::Value> {
    let cfg = read_json_arg("--unet-config", path)?;
    match layerdiff::models::unet_2d::UNet2DConditionModelConfig::from_json(&cfg) {
        Err(layerdiff::error::Error::BadInput { problem, fix, .. }) => {
            Err(layerdiff::error::bad_input(format!("--unet-config {}", path.display()), problem, fix).into())
        }
        other => other.map(|_| cfg).map_err(Into::into),
    }
}

fn tiny_model(args: TinyModelArgs) -> Result<()> {
    let overrides = args.config.as_deref().map(|path| read_json_arg("--config", path)).transpose()?;
    let sam = |file: &str, cfg: layerdiff::models::sam::SamConfig| -> Result<()> {
        if overrides.is_some() {
            anyhow::bail!("--config: only for --kind sd");
        }
        let path = args.out.join(file);
        layerdiff::tiny::write_tiny_sam(&path, &cfg, args.seed)?;
        println!("{}", path.display());
        Ok(())
    };
    match args.kind {
        TinyKind::Sd => {
            layerdiff::tiny::write_tiny_model(&args.out, args.seed, overrides.as_ref(), args.dtype.into())?;
            println!("{}", args.out.display());
            Ok(())
        }
        TinyKind::Sam => sam("tiny-sam.safetensors", layerdiff::models::sam::SamConfig::tiny_vit()),
        TinyKind::MobileSam => sam("tiny-mobile-sam.safetensors", layerdiff::models::sam::SamConfig::tiny_mobile_sam()),
        TinyKind::Clip | TinyKind::Dinov2 => {
            if overrides.is_some() {
                anyhow::bail!("--config: only for --kind sd");
            }
            match args.kind {
                TinyKind::Clip => layerdiff::eval::write_tiny_clip(&args.out, args.seed)?,
                _ => layerdiff::eval::write_tiny_dinov2(&args.out, args.seed)?,
            }
            println!("{}", args.out.display());
            Ok(())
        }
    }
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.size == 0 || !args.size.is_multiple_of(8) {
        anyhow::bail!("--size: {} is not a positive multiple of 8; use 256 or 512", args.size);
    }
    let device = device(args.cpu, args.device.as_deref())?;
    let json = if let Some(kind) = args.sam {
        use layerdiff::models::sam::SamConfig;
        let (name, cfg) = match kind {
            SamKind::VitB => ("vit-b", SamConfig::vit_b()),
            SamKind::VitL => ("vit-l", SamConfig::vit_l()),
            SamKind::VitH => ("vit-h", SamConfig::vit_h()),
            SamKind::MobileSam => ("mobile-sam", SamConfig::mobile_sam()),
        };
        serde_json::to_string_pretty(&layerdiff::bench::bench_sam(name, &cfg, &device, args.runs)?)?
    } else if args.stages {
        let opts = layerdiff::bench::StageBenchOptions {
            size: args.size,
            dtype: args.dtype.into(),
            finetune: args.finetune,
            steps: args.steps,
            gradient_checkpointing: args.gradient_checkpointing,
            profile_stage: args.profile_stage,
            unet_config: match &args.unet_config {
                Some(path) => Some(read_unet_config(path)?),
                None => args.tiny.then(|| layerdiff::tiny::default_configs()["unet"].clone()),
            },
        };
        let report = layerdiff::bench::bench_stages(&device, &opts, &mut |stage| {
            eprintln!("{stage}: a warm-up step and {} timed", opts.steps.max(1));
        })?;
        eprintln!("{report}");
        serde_json::to_string_pretty(&report)?
    } else {
        serde_json::to_string_pretty(&layerdiff::bench::bench_unet(&device, args.dtype.into(), args.size / 8, args.runs)?)?
    };
    if let Some(path) = &args.json {
        image_io::write_atomic(path, json.as_bytes())?;
    }
    println!("{json}");
    Ok(())
}

/// One progress bar per stage, with the loss where there is one, and a summary at the end.
struct Bars {
    bar: Option<ProgressBar>,
    stage: String,
    started: std::time::Instant,
    summary: Vec<(String, f64)>,
}

impl Bars {
    fn new() -> Self {
        Self { bar: None, stage: String::new(), started: std::time::Instant::now(), summary: vec![] }
    }

    fn print_summary(&self) {
        for (stage, secs) in &self.summary {
            eprintln!("{stage:>12}: {secs:.1} s");
        }
        if let Some(mib) = peak_rss_mib() {
            eprintln!("{:>12}: {mib:.0} MiB", "peak memory");
        }
    }
}

impl Progress for Bars {
    fn start(&mut self, stage: &str, total: usize) {
        self.bar = Some(progress_bar(total, stage));
        self.stage = stage.to_string();
        self.started = std::time::Instant::now();
    }

    fn step(&mut self, done: usize, loss: Option<f64>) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            if let Some(loss) = loss {
                bar.set_message(format!("{} loss {loss:.4}", self.stage));
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.summary.push((self.stage.clone(), self.started.elapsed().as_secs_f64()));
    }
}

/// Peak resident memory of this process (Linux), for the end-of-run summary.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn edit(args: EditArgs) -> Result<()> {
    let (model, request, out, resume) = match &args.resume {
        Some(dir) => {
            let info: SessionInfo = session::read_json(&dir.join(session::SESSION_JSON))
                .map_err(|e| anyhow::anyhow!("{e} (--resume needs the --out folder of an edit)"))?;
            if info.method != "layerdiffusion" {
                anyhow::bail!("--resume {}: a {} run does not resume; run it again with --force", dir.display(), info.method);
            }
            if info.progress == "done" {
                anyhow::bail!("--resume {}: this edit is finished; draw more with `layerdiff sample --session {}`", dir.display(), dir.display());
            }
            (args.model.clone().unwrap_or(info.model), info.request, dir.clone(), true)
        }
        None => {
            let out = args.out.clone().expect("clap requires --out without --resume");
            if out.join(session::SESSION_JSON).exists() && !args.force {
                anyhow::bail!("--out {}: holds another edit; choose a new folder, --resume it, or --force to overwrite", out.display());
            }
            let model = args.model.clone().expect("clap requires --model without --resume");
            (model, edit_request(&args)?, out, false)
        }
    };
    std::fs::create_dir_all(&out).map_err(|e| anyhow::anyhow!("--out {}: {e}", out.display()))?;
    let mut bars = Bars::new();
    let mut request = request;
    if !resume {
        segment_for_edit(&args, &mut request, &out, &mut bars)?;
    }
    let (files, mut sd) = load_model(&model, &args.runtime)?;
    let images = match args.method {
        Method::Layerdiffusion => method_edit::edit(&mut sd, &files, &request, &out, resume, &mut bars)?.images,
        Method::Imagic => layerdiff::baselines::imagic(&sd, &files, &request, &out, &mut bars)?,
        Method::Sdedit => layerdiff::baselines::sdedit(&sd, &files, &request, args.strength, &out, &mut bars)?,
    };
    for (seed, _) in &images {
        println!("{}", out.join(format!("edit-{seed}.png")).display());
    }
    bars.print_summary();
    Ok(())
}

fn edit_request(args: &EditArgs) -> Result<EditRequest> {
    let background_source = match args.background_source {
        BackgroundKind::Generated => BackgroundSource::Generated,
        BackgroundKind::Keep => BackgroundSource::Keep,
        BackgroundKind::Image => BackgroundSource::Image {
            image: args.background_image.clone().ok_or_else(|| {
                anyhow::anyhow!("--background-source image: no --background-image; give the background picture")
            })?,
            mask: args.background_mask.clone(),
        },
    };
    let seeds = if args.seeds.is_empty() { (0..args.num_images).collect() } else { args.seeds.clone() };
    let base = match args.method {
        Method::Imagic => layerdiff::baselines::imagic_settings(),
        Method::Layerdiffusion | Method::Sdedit => EditSettings::default(),
    };
    let settings = EditSettings {
        alpha: args.alpha.unwrap_or(base.alpha),
        lambda_object: args.lambda_object,
        lambda_background: args.lambda_background,
        embedding_steps: args.embedding_steps.unwrap_or(base.embedding_steps),
        embedding_lr: args.embedding_lr.unwrap_or(base.embedding_lr),
        finetune_steps: args.finetune_steps.unwrap_or(base.finetune_steps),
        finetune_lr: args.finetune_lr.unwrap_or(base.finetune_lr),
        finetune: args.finetune,
        lora_rank: args.lora_rank,
        gradient_checkpointing: args.gradient_checkpointing,
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        guidance_period: args.guidance_period.unwrap_or(base.guidance_period),
        guidance_embedding: args.guidance_embedding,
    };
    let required = |v: &Option<String>| v.clone().unwrap_or_default();
    Ok(EditRequest {
        image: args.image.clone().unwrap_or_default(),
        mask: args.mask.clone().unwrap_or_default(),
        object: required(&args.object),
        background: required(&args.background),
        prompt: args.prompt.clone(),
        background_source,
        size: args.size,
        seeds,
        train_seed: args.train_seed,
        settings,
        checkpoint_every: args.checkpoint_every,
    })
}

fn segment(args: SegmentArgs) -> Result<()> {
    let prompt = prompt(&args.points, &args.negative_points, args.bbox);
    // Cheap checks first: the model may take a download and seconds to load.
    prompt.validate(image_io::dimensions(&args.image)?, "")?;
    let sam = args.sam.load(&args.place)?;
    let result = segment::segment_to_files(&sam, &args.image, &prompt, "", &args.sam.options(), &args.out, &mut Bars::new())?;
    let area = result.mask.pixels().filter(|p| p.0[0] >= 128).count() as f64 / result.mask.pixels().len() as f64;
    eprintln!("predicted IoU {:.3}, {:.1} % of the image", result.iou, 100.0 * area);
    println!("{}", args.out.display());
    println!("{}", segment::overlay_path(&args.out).display());
    Ok(())
}

/// For `edit --point/--box` (and `--background-point/--background-box`): makes the masks with
/// Segment Anything into `out` and points the request at them.
fn segment_for_edit(args: &EditArgs, request: &mut EditRequest, out: &Path, progress: &mut Bars) -> Result<()> {
    let subject = prompt(&args.points, &args.negative_points, args.bbox);
    let background = prompt(&args.background_points, &args.background_negative_points, args.background_bbox);
    if subject.is_empty() && background.is_empty() {
        return Ok(());
    }
    if !subject.is_empty() {
        subject.validate(image_io::dimensions(&request.image)?, "")?;
    }
    let sam = args.sam.load(&args.runtime.place)?;
    if !subject.is_empty() {
        let mask = out.join("sam-mask.png");
        segment::segment_to_files(&sam, &request.image, &subject, "", &args.sam.options(), &mask, progress)?;
        request.mask = mask;
    }
    if !background.is_empty() {
        let BackgroundSource::Image { image, mask } = &mut request.background_source else {
            anyhow::bail!("--background-point/--background-box: they select in a --background-image; add --background-source image");
        };
        let path = out.join("sam-background-mask.png");
        segment::segment_to_files(&sam, image, &background, "background-", &args.sam.options(), &path, progress)?;
        *mask = Some(path);
    }
    Ok(())
}

fn score(args: ScoreArgs) -> Result<()> {
    let opts = args.metrics.scorer_options(args.place.sources(), args.place.device()?);
    let scorer = layerdiff::eval::Scorer::load(&opts)?;
    let request = layerdiff::eval::ScoreRequest {
        images: args.images,
        text: args.text,
        input: args.input,
        mask: args.mask,
        background: args.background,
        background_mask: args.background_mask,
    };
    let bar = progress_bar(0, "scoring");
    let scored = layerdiff::eval::score_folder(&scorer, &request, &args.csv, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    eprintln!("{} images scored", scored.len());
    println!("{}", args.csv.display());
    Ok(())
}

fn batch(args: BatchArgs) -> Result<()> {
    if args.summarize {
        let path = layerdiff::eval::summarize(&args.out)?;
        println!("{}", path.display());
        return Ok(());
    }
    let settings = |method: Method| {
        let base = match method {
            Method::Imagic => layerdiff::baselines::imagic_settings(),
            Method::Layerdiffusion | Method::Sdedit => EditSettings::default(),
        };
        EditSettings {
            alpha: args.alpha.unwrap_or(base.alpha),
            embedding_steps: args.embedding_steps.unwrap_or(base.embedding_steps),
            finetune_steps: args.finetune_steps.unwrap_or(base.finetune_steps),
            finetune: args.finetune,
            gradient_checkpointing: args.gradient_checkpointing,
            steps: args.steps,
            ..base
        }
    };
    let methods = args
        .method
        .iter()
        .map(|m| match m {
            Method::Layerdiffusion => layerdiff::eval::BatchMethod::Layerdiffusion,
            Method::Imagic => layerdiff::eval::BatchMethod::Imagic,
            Method::Sdedit => layerdiff::eval::BatchMethod::Sdedit,
        })
        .collect();
    let background_source = match args.background_source {
        BackgroundKind::Keep => BackgroundSource::Keep,
        BackgroundKind::Generated => BackgroundSource::Generated,
        BackgroundKind::Image => anyhow::bail!("--background-source image: not for batch; use keep or generated"),
    };
    let rt = &args.runtime;
    let source = rt.sources();
    let device = rt.place.device()?;
    let request = layerdiff::eval::BatchRequest {
        model: args.model.clone().expect("clap requires --model without --summarize"),
        manifest: args.manifest.clone().expect("clap requires --manifest without --summarize"),
        images: args.images.clone().expect("clap requires --images without --summarize"),
        methods,
        seeds: args.seeds.clone(),
        size: args.size,
        train_seed: args.train_seed,
        background_source,
        settings: settings(Method::Layerdiffusion),
        imagic_settings: settings(Method::Imagic),
        strength: args.strength,
        shard: args.shard,
        out: args.out.clone(),
        sam_model: args.sam_model.clone(),
        scorer: args.metrics.scorer_options(rt.place.sources(), device.clone()),
        source,
        device,
        dtype: rt.dtype.into(),
    };
    let mut bars = Bars::new();
    let report = layerdiff::eval::run_batch(&request, &mut bars, &mut |line| eprintln!("{line}"))?;
    eprintln!(
        "{} edited, {} already done, {} skipped; {} outputs scored",
        report.edited,
        report.already_done,
        report.skipped.len(),
        report.scored
    );
    println!("{}", report.results_csv.display());
    match &report.summary {
        Some(path) => println!("{}", path.display()),
        None => eprintln!("shard done; when every shard is: layerdiff batch --summarize --out {}", args.out.display()),
    }
    Ok(())
}

fn sample(args: SampleArgs) -> Result<()> {
    let info: SessionInfo = session::read_json(&args.session.join(session::SESSION_JSON))
        .map_err(|e| anyhow::anyhow!("{e} (--session needs the --out folder of an edit)"))?;
    let model = args.model.clone().unwrap_or(info.model);
    let (files, sd) = load_model(&model, &args.runtime)?;
    let mut bars = Bars::new();
    let images = method_edit::sample_session(
        &sd,
        &files,
        &args.session,
        &args.seeds,
        method_edit::Resample { alpha: args.alpha, guidance_period: args.guidance_period },
        &args.out,
        &mut bars,
    )?;
    for (seed, _) in &images {
        println!("{}", args.out.join(format!("edit-{seed}.png")).display());
    }
    bars.print_summary();
    Ok(())
}

fn toyworld_data(args: ToyDataArgs) -> Result<()> {
    let bar = progress_bar(args.n, "scenes");
    let opts = toyworld::data::DataOptions { n: args.n, size: args.size, seed: args.seed, out: args.out.clone() };
    toyworld::data::write_dataset(&opts, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish();
    println!("{}", args.out.display());
    Ok(())
}

fn train(args: TrainArgs) -> Result<()> {
    let settings = TrainSettings {
        seed: args.seed,
        vae_steps: args.vae_steps,
        steps: args.steps,
        batch: args.batch,
        vae_lr: args.vae_lr,
        lr: args.lr,
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        clip: args.clip,
        ema: args.ema,
        caption_dropout: args.caption_dropout,
        kl_weight: args.kl_weight,
        checkpoint_every: args.checkpoint_every,
        eval_samples: args.eval_samples,
        eval_steps: args.eval_steps,
        eval_guidance: args.eval_guidance,
    };
    if let Some(m) = args.minutes.filter(|m| !(m.is_finite() && *m > 0.0)) {
        anyhow::bail!("--minutes: {m}; give a positive number of minutes");
    }
    let limit = args.minutes.map(|m| std::time::Duration::from_secs_f64(m * 60.0));
    let mut bar: Option<ProgressBar> = None;
    let mut sampling: Option<ProgressBar> = None;
    let mut smoothed = None::<f64>;
    train::train(&args.data, &args.out, &settings, args.resume, limit, &args.place.device()?, &mut |event| match event {
        TrainEvent::Phase { phase, step, total } => {
            let b = progress_bar(total, phase);
            b.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {prefix}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_position(step as u64);
            b.reset_eta();
            bar = Some(b);
            smoothed = None;
        }
        TrainEvent::Step { step, loss, .. } => {
            let s = smoothed.map_or(loss, |s| 0.98 * s + 0.02 * loss);
            smoothed = Some(s);
            if let Some(b) = &bar {
                b.set_position(step as u64);
                b.set_prefix(format!("loss {s:.4}"));
            }
        }
        TrainEvent::Sampling { done, total } => {
            let b = sampling.get_or_insert_with(|| progress_bar(total, "eval samples"));
            b.set_position(done as u64);
        }
        TrainEvent::Checkpoint { phase, step, accuracy } => {
            if let Some(b) = sampling.take() {
                b.finish_and_clear();
            }
            let line = match accuracy {
                Some(a) => format!("{phase} step {step}: checkpoint; held-out samples: {a}"),
                None => format!("{phase} step {step}: checkpoint"),
            };
            // Also when stderr is no terminal (the bars are hidden then, and so is `println`).
            match &bar {
                Some(b) => b.suspend(|| eprintln!("{line}")),
                None => eprintln!("{line}"),
            }
        }
    })?;
    if let Some(b) = bar {
        b.finish();
    }
    println!("{}", args.out.display());
    Ok(())
}

fn toyworld_bench(args: ToyBenchArgs) -> Result<()> {
    use toyworld::bench::{make_tasks, run_bench, summary_markdown, toy_edit_settings, variants, BenchRequest};
    let base = EditSettings {
        embedding_steps: args.embedding_steps,
        finetune_steps: args.finetune_steps,
        finetune_lr: args.finetune_lr,
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        ..toy_edit_settings()
    };
    let request = BenchRequest {
        tasks: make_tasks(train::held_out_seed(args.world_seed), args.tasks),
        variants: variants(&args.methods, args.ablations, &base)?,
        seeds: args.seeds.clone(),
        size: args.size,
        strength: args.strength,
        out: args.out.clone(),
    };
    let files = ModelFiles::resolve(&args.model, &args.place.sources())?;
    let mut sd = StableDiffusion::load(&files, &args.place.device()?, DType::F32)?;
    let mut bars = Bars::new();
    let results = run_bench(&mut sd, &files, &request, &mut bars, &mut |line| eprintln!("{line}"))?;
    print!("{}", summary_markdown(&results, &request.variants, request.tasks.len(), request.seeds.len()));
    eprintln!("{}", args.out.join("summary.md").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_mib() -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }

    #[test]
    fn freed_memory_is_kept_until_a_stage_ends() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        let Some(before) = rss_mib() else { return };
        keep_freed_memory();
        // 256 MiB in buffers of a tensor's size, written, then freed.
        let buffers: Vec<Vec<f32>> = (0..64).map(|_| vec![1.0; 1 << 20]).collect();
        let held = rss_mib().unwrap();
        assert!(held > before + 200.0, "{before} -> {held} MiB");
        drop(buffers);
        let kept = rss_mib().unwrap();
        assert!(kept > held - 32.0, "freed memory went back at once: {held} -> {kept} MiB");
        give_back_kept_memory();
        let after = rss_mib().unwrap();
        assert!(after < kept - 200.0, "the end of a stage gave back only {kept} -> {after} MiB");
    }
}
