//! The toy world: procedurally drawn scenes of one coloured shape on one patterned background,
//! small enough (32 x 32 by default) that a diffusion model for them trains on a CPU. Every scene
//! is a handful of discrete attributes, and [`score::read_scene`] reads those attributes back from
//! any image exactly, so an edit ("the same subject, on a checkerboard") is scored by what it got
//! right rather than by a learned metric. [`data`] writes and loads reproducible datasets; [`mod@bench`]
//! runs edit methods on tasks built from held-out scenes and scores them.

pub mod bench;
pub mod data;
pub mod score;
pub mod world;

pub use data::{load_dataset, scene_for, write_dataset, DataOptions, Example, WorldInfo};
pub use score::{read_scene, Accuracy, Hits, Reading};
pub use world::{Background, Colour, Dot, Position, Scene, Shape, Size};
