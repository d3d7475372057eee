//! LayerDiffusion (arXiv 2305.18676), as `../shared/docs/method.md` specifies it: a layered
//! optimization of two text embeddings (stage 1), a layered fine-tuning of the UNet (stage 2),
//! and iterative guidance while sampling (stage 3).
//!
//! Each paper equation has one named function:
//! - [`optimize::layered_optimization`] (Eq. 2) and [`optimize::interpolate_embeddings`] (Eq. 3)
//! - [`finetune::layered_finetune`] (Eq. 4-6)
//! - [`guidance::iterative_guidance_sample`] (Eq. 7-8)

pub mod adam;
pub mod finetune;
pub mod guidance;
pub mod masks;
pub mod optimize;
pub mod edit;
pub mod session;

use candle_core::Tensor;

/// Every option of an edit, with the spec's defaults. The CLI shows these defaults in `--help`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EditSettings {
    /// `alpha` of Eq. 3: `e_bar = alpha e_o* + (1 - alpha) e_b*`, in [0, 1].
    pub alpha: f64,
    /// `lambda_o` of Eq. 6; `None`: 2, or 3 for a subject under 10 % of the image.
    pub lambda_object: Option<f64>,
    /// `lambda_b` of Eq. 6.
    pub lambda_background: f64,
    pub embedding_steps: usize,
    pub embedding_lr: f64,
    pub finetune_steps: usize,
    pub finetune_lr: f64,
    pub finetune: FinetuneMode,
    /// LoRA rank, with `FinetuneMode::Lora`.
    pub lora_rank: usize,
    /// Stage 2 recomputes each UNet layer's activations in its backward instead of keeping them
    /// ([`finetune::LayeredFinetune::with_gradient_checkpointing`]): far less memory, a third more
    /// arithmetic, the same steps to rounding.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// DDIM steps of stage 3.
    pub steps: usize,
    pub guidance_scale: f64,
    /// Steps `k` with `k mod period == 0` are conditioned on `e_g`; 0 turns iterative guidance off.
    pub guidance_period: usize,
    pub guidance_embedding: GuidanceEmbedding,
}

impl Default for EditSettings {
    fn default() -> Self {
        Self {
            alpha: 0.7,
            lambda_object: None,
            lambda_background: 1.0,
            embedding_steps: 500,
            embedding_lr: 1e-3,
            finetune_steps: 250,
            finetune_lr: 2e-6,
            finetune: FinetuneMode::Full,
            lora_rank: 4,
            gradient_checkpointing: false,
            steps: 50,
            guidance_scale: 7.5,
            guidance_period: 2,
            guidance_embedding: GuidanceEmbedding::Target,
        }
    }
}

/// What stage 2 trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FinetuneMode {
    /// Every UNet weight (the paper's).
    Full,
    /// Low-rank adapters on the attention projections only (little memory).
    Lora,
}

/// `e_g` of Eq. 7: which embedding the guided steps use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GuidanceEmbedding {
    /// `c(T_o)`, the un-optimized object text, which carries the new action.
    Target,
    /// `e_o*`, the optimized object embedding.
    Optimized,
}

/// The two layers of training data: the subject image with its mask, and the background source
/// with the mask of what is not background on it (Stage 1 and 2 inputs).
#[derive(Debug, Clone)]
pub struct LayeredLatents {
    /// `z_s = scaling * E(I_s)`, `[1, 4, h, w]`.
    pub subject: Tensor,
    /// `M_s` at latent size (area average, soft edges), `[1, 1, h, w]`, 1 = subject.
    pub subject_mask: Tensor,
    /// `z_b = scaling * E(I_b)`, `[1, 4, h, w]`.
    pub background: Tensor,
    /// `M_b` at latent size, `[1, 1, h, w]`, 1 = not background.
    pub background_mask: Tensor,
}

/// The loss of one optimization step, for curves and progress bars.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct StepLoss {
    pub step: usize,
    pub loss: f64,
}
