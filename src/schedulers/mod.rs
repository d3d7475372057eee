//! Noise schedulers.
pub mod ddim;

pub use ddim::{
    BetaSchedule, DdimConfig, DdimScheduler, DdimStep, PredictionType, TimestepSpacing,
};
