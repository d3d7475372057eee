//! Evaluation: the paper's CLIP score and the fidelity metrics ([`metrics`]), with the metric
//! models they need (CLIP and DINOv2 in the transformers layout, [`models`]) and their image
//! preprocessing ([`preprocess`]); [`score::score_folder`] scores finished edits into a CSV, and
//! [`batch::run_batch`] edits and scores a benchmark manifest (`layerdiff batch`).
//!
//! ```no_run
//! use layerdiff::eval::{Scorer, ScorerOptions};
//! # fn main() -> layerdiff::Result<()> {
//! let scorer = Scorer::load(&ScorerOptions::default())?; // openai/clip-vit-large-patch14, facebook/dinov2-base
//! let output = layerdiff::image_io::load_rgb("edit-1.png".as_ref())?;
//! let score = scorer.clip_score(&output, "a photo of a jumping dog")?;
//! println!("CLIP score {:.3} ({:.1} as torchmetrics)", score.cosine, score.torchmetrics);
//! # Ok(()) }
//! ```
pub mod batch;
pub mod metrics;
pub mod models;
pub mod preprocess;
pub mod score;
pub mod tiny;

pub use batch::{read_manifest, run_batch, summarize, BatchMethod, BatchReport, BatchRequest, ManifestRow, Shard, Skipped};
pub use metrics::{ClipScore, Fidelity, Reference, Scorer, ScorerOptions, Scores, DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL};
pub use models::{ClipEmbedder, DinoEmbedder, MetricModelKind, TransformersFiles};
pub use preprocess::ImageProcessor;
pub use score::{score_folder, write_csv, ScoreRequest, ScoredImage};
pub use tiny::{write_tiny_clip, write_tiny_dinov2};
