//! The baselines the paper compares LayerDiffusion with (`docs/method.md`, "Baselines"), on the
//! same models and the same inputs ([`EditRequest`]), writing the same kind of output folder:
//! `edit-<seed>.png` per seed, `sheet.png`, and `session.json` (the request, its settings, the
//! method's own parameters, timings).
//!
//! - [`sdedit()`]: noise `z_s` to strength 0.6 of the schedule, denoise with `c(T)`.
//! - [`imagic()`]: optimize `e = c(T)` to reconstruct the whole of `I_s`, fine-tune the UNet on it,
//!   sample with `eta c(T) + (1 - eta) e*`.
//!
//! Both use the whole image: the request's mask, background source and layer split are not used
//! (only `T = req.prompt()`, "`T_o` in `T_b`" by default).

pub mod imagic;
pub mod sdedit;

pub use imagic::{imagic, imagic_embedding, imagic_settings, imagic_train, ImagicTrained, IMAGIC_ETA};
pub use sdedit::{sdedit, SDEDIT_STRENGTH};

use crate::error::Result;
use crate::image_io::{self, save_png_atomic, Crop};
use crate::method::edit::EditRequest;
use crate::method::session::{self, SessionInfo};
use crate::pipeline::StableDiffusion;
use crate::sources::ModelFiles;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// A baseline's `session.json`: the fields of an edit's [`SessionInfo`] (so that readers of
/// edit sessions read it too) plus the method's own parameters (`strength`, `eta`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineSession {
    #[serde(flatten)]
    pub info: SessionInfo,
    pub parameters: BTreeMap<String, f64>,
}

impl BaselineSession {
    pub(crate) fn write(&self, out: &Path) -> Result<()> {
        session::write_json(&out.join(session::SESSION_JSON), self)
    }
}

/// `I_s` at the working size (resized to cover it and centre-cropped, as `edit` does) and the crop.
pub(crate) fn load_subject(req: &EditRequest) -> Result<(RgbImage, Crop)> {
    let image = image_io::load_rgb(&req.image)?;
    crate::method::edit::check_photo_size(req, image.dimensions())?;
    Ok(image_io::resize_center_crop(&image, req.size, req.size))
}

/// The session of a baseline run as it starts (`progress` "stage1" for Imagic, "sampling" for
/// SDEdit). A baseline uses the whole image: `subject_area` is 1.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_session(
    sd: &StableDiffusion,
    files: &ModelFiles,
    req: &EditRequest,
    method: &str,
    crop: Crop,
    lambda_object: f64,
    parameters: BTreeMap<String, f64>,
    progress: &str,
) -> Result<BaselineSession> {
    let mut info = SessionInfo::start(method, files, sd.dtype, req, crop, lambda_object, 1.0)?;
    info.progress = progress.into();
    Ok(BaselineSession { info, parameters })
}

/// `sheet.png`: the input and every seed's image side by side.
pub(crate) fn write_sheet(out: &Path, subject: &RgbImage, images: &[(u64, RgbImage)]) -> Result<()> {
    let mut sheet = vec![("input".to_string(), subject.clone())];
    sheet.extend(images.iter().map(|(seed, img)| (format!("seed {seed}"), img.clone())));
    save_png_atomic(&image_io::contact_sheet(&sheet, 256), &out.join("sheet.png"))
}
