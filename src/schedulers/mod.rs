//! Noise schedulers.
pub mod ddim;
pub mod training;

pub use ddim::{
    BetaSchedule, DdimConfig, DdimScheduler, DdimStep, PredictionType, TimestepSpacing,
};
pub use training::TrainSchedule;
