//! Evaluation: the paper's CLIP score and the fidelity metrics, with the metric models they need
//! (CLIP and DINOv2 in the transformers layout) and their image preprocessing.
pub mod models;
pub mod preprocess;
pub mod tiny;

pub use models::{ClipEmbedder, DinoEmbedder, MetricModelKind, TransformersFiles};
pub use preprocess::ImageProcessor;
pub use tiny::{write_tiny_clip, write_tiny_dinov2};
