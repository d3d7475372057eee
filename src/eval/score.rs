//! Scoring finished edits: every metric of [`super::metrics`] for each image, into a CSV.
//!
//! Two kinds of input, mixed freely in one request:
//! - a session folder of `layerdiff edit` (it holds `session.json`): its `edit-<seed>.png` are
//!   scored against the session's target text `T`, its photo and subject mask (as the edit fitted
//!   them: `mask.png` when the folder has it) and its background source (`background.png`, else
//!   the photo for `keep`, the user's picture for `image`);
//! - image files, or folders of them, scored against [`ScoreRequest::text`] and, when given,
//!   [`ScoreRequest::input`] and its mask, each fitted to the image's size as the edit fits the
//!   photo (scaled to cover, centre-cropped). Without `background`, the background source is the
//!   input photo itself (the `keep` edit's and TEdBench's), so the background metric says how
//!   much of the photo's background survived.

use super::metrics::{Reference, Scorer, Scores};
use crate::error::{bad_input, Result};
use crate::image_io::{self, write_atomic};
use crate::method::edit::BackgroundSource;
use crate::method::masks;
use image::{GrayImage, RgbImage};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What to score (`layerdiff score`).
#[derive(Debug, Clone, Default)]
pub struct ScoreRequest {
    /// Session folders, image files, and folders of images (`.png`, `.jpg`, `.jpeg`, `.webp`,
    /// not recursive).
    pub images: Vec<PathBuf>,
    /// The target text of the images that are not in a session (a session's own text otherwise;
    /// this one replaces it when given).
    pub text: Option<String>,
    /// The edit's input photo, for the fidelity metrics of images that are not in a session.
    pub input: Option<PathBuf>,
    /// The subject's mask on `input` (white = subject); none: the whole photo is the subject.
    pub mask: Option<PathBuf>,
    /// The background source; none: `input`.
    pub background: Option<PathBuf>,
    /// What is not background on `background` (white); none: all of it is background.
    pub background_mask: Option<PathBuf>,
}

/// One scored image: a row of the CSV.
#[derive(Debug, Clone)]
pub struct ScoredImage {
    pub image: PathBuf,
    /// The session's method (`layerdiffusion`, `imagic`, `sdedit`); `None` outside a session.
    pub method: Option<String>,
    /// The seed of an `edit-<seed>.png`.
    pub seed: Option<u64>,
    pub text: String,
    pub scores: Scores,
}

impl ScoredImage {
    /// The CSV columns, in [`Self::csv_row`]'s order.
    pub const CSV_HEADER: &'static str = "image,method,seed,text,clip_score,clip_score_x100,image_clip,image_dino,subject_clip,subject_dino,background_clip,background_dino";

    /// One CSV line (RFC 4180 quoting; an empty cell for a metric that does not apply).
    pub fn csv_row(&self) -> String {
        let f = |v: Option<f32>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
        let s = &self.scores;
        [
            csv_field(&self.image.display().to_string()),
            csv_field(self.method.as_deref().unwrap_or("")),
            self.seed.map(|s| s.to_string()).unwrap_or_default(),
            csv_field(&self.text),
            f(Some(s.clip_score.cosine)),
            f(Some(s.clip_score.torchmetrics)),
            f(s.image.map(|x| x.clip)),
            f(s.image.and_then(|x| x.dino)),
            f(s.subject.map(|x| x.clip)),
            f(s.subject.and_then(|x| x.dino)),
            f(s.background.map(|x| x.clip)),
            f(s.background.and_then(|x| x.dino)),
        ]
        .join(",")
    }
}

/// A CSV cell: quoted when it holds a comma, a quote or a line break, quotes doubled.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Writes rows under [`ScoredImage::CSV_HEADER`], atomically.
pub fn write_csv(rows: &[ScoredImage], path: &Path) -> Result<()> {
    let mut text = String::from(ScoredImage::CSV_HEADER);
    text.push('\n');
    for row in rows {
        text.push_str(&row.csv_row());
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// Scores everything `req` names and writes the CSV to `csv`; `progress(done, total)` after each
/// image. Every input is checked (and found) before the first image is scored.
pub fn score_folder(scorer: &Scorer, req: &ScoreRequest, csv: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<ScoredImage>> {
    // 1. check inputs: what each path is, and the texts
    let mut jobs: Vec<Job> = Vec::new();
    let mut loose: Vec<PathBuf> = Vec::new();
    if req.images.is_empty() {
        return Err(bad_input("--images", "nothing to score", "give image files, folders of images or session folders"));
    }
    for path in &req.images {
        if path.join(crate::method::session::SESSION_JSON).is_file() {
            jobs.push(Job::session(path, req.text.as_deref())?);
        } else if path.is_dir() {
            let found = images_in(path)?;
            if found.is_empty() {
                return Err(bad_input(path.display(), "holds no images (.png, .jpg, .jpeg, .webp) and no session.json", "give a folder of edited images or a session folder"));
            }
            loose.extend(found);
        } else if path.is_file() {
            loose.push(path.clone());
        } else {
            return Err(bad_input(path.display(), "no such file or directory", "give image files, folders of images or session folders"));
        }
    }
    if !loose.is_empty() {
        let Some(text) = req.text.clone() else {
            return Err(bad_input("--text", "missing", "give the target text the images were made for"));
        };
        jobs.push(Job::images(loose, text, req)?);
    } else if req.input.is_some() || req.mask.is_some() || req.background.is_some() {
        tracing::warn!("--input, --mask and --background apply to images outside session folders; the sessions use their own");
    }

    // 2. score, one reference per input and size
    let total: usize = jobs.iter().map(|j| j.images.len()).sum();
    let mut rows = Vec::with_capacity(total);
    for job in &jobs {
        let mut references: HashMap<(u32, u32), Reference> = HashMap::new();
        for (path, seed) in &job.images {
            let output = image_io::load_rgb(path)?;
            let size = output.dimensions();
            let reference = match references.entry(size) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(job.reference(scorer, size)?),
            };
            let scores = scorer.score(reference, &output, &job.text)?;
            rows.push(ScoredImage { image: path.clone(), method: job.method.clone(), seed: *seed, text: job.text.clone(), scores });
            progress(rows.len(), total);
        }
    }

    // 3. the CSV
    write_csv(&rows, csv)?;
    Ok(rows)
}

/// Images scored against one input: a session's, or the request's.
struct Job {
    images: Vec<(PathBuf, Option<u64>)>,
    text: String,
    method: Option<String>,
    input: Option<Inputs>,
}

/// The input side at its own size, fitted to each output's size when scored.
struct Inputs {
    photo: RgbImage,
    mask: Option<GrayImage>,
    /// The background source and its mask of what is not background; `None` for a generated
    /// background the folder does not hold.
    background: Option<(RgbImage, Option<GrayImage>)>,
    /// Already at the working size (a session's): no refitting.
    fitted: bool,
}

/// The parts of `session.json` scoring reads (the rest may change without breaking it).
#[derive(Deserialize)]
struct SessionView {
    method: String,
    request: RequestView,
}

#[derive(Deserialize)]
struct RequestView {
    image: PathBuf,
    mask: PathBuf,
    object: String,
    background: String,
    prompt: Option<String>,
    background_source: BackgroundSource,
    size: u32,
}

impl Job {
    fn session(dir: &Path, text: Option<&str>) -> Result<Self> {
        let info: SessionView = crate::method::session::read_json(&dir.join(crate::method::session::SESSION_JSON))?;
        let r = &info.request;
        let text = text.map(str::to_string).unwrap_or_else(|| r.prompt.clone().unwrap_or_else(|| format!("{} in {}", r.object, r.background)));
        let mut images: Vec<(PathBuf, Option<u64>)> = std::fs::read_dir(dir)
            .map_err(crate::error::io_err(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let seed = p.file_name()?.to_str()?.strip_prefix("edit-")?.strip_suffix(".png")?.parse::<u64>().ok()?;
                Some((p, Some(seed)))
            })
            .collect();
        images.sort_by_key(|(_, seed)| *seed);
        if images.is_empty() {
            return Err(bad_input(dir.display(), "holds no edit-<seed>.png", "finish the edit first (layerdiff edit --resume)"));
        }
        // the input side at the working size, as the edit made it
        let size = r.size;
        let photo_path = find(dir, &r.image)?;
        let original = image_io::load_rgb(&photo_path)?;
        let (photo, _) = image_io::resize_center_crop(&original, size, size);
        let mask = match image_io::load_image(&dir.join("mask.png")) {
            Ok(m) if m.width() == size && m.height() == size => m.to_luma8(),
            _ => image_io::resize_center_crop(&masks::load_mask(&find(dir, &r.mask)?, original.dimensions())?, size, size).0,
        };
        let saved_background = image_io::load_rgb(&dir.join("background.png")).ok().filter(|b| b.dimensions() == (size, size));
        let background = match &r.background_source {
            BackgroundSource::Keep => Some((photo.clone(), None)),
            BackgroundSource::Image { image, mask: source_mask } => {
                let picture = image_io::load_rgb(&find(dir, image)?)?;
                let m = source_mask
                    .as_ref()
                    .map(|m| Ok::<_, crate::Error>(image_io::resize_center_crop(&masks::load_mask(&find(dir, m)?, picture.dimensions())?, size, size).0))
                    .transpose()?;
                let picture = saved_background.unwrap_or_else(|| image_io::resize_center_crop(&picture, size, size).0);
                Some((picture, m))
            }
            BackgroundSource::Generated => saved_background.map(|b| (b, None)),
        };
        let input = Inputs { photo, mask: Some(mask), background, fitted: true };
        Ok(Self { images, text, method: Some(info.method), input: Some(input) })
    }

    fn images(images: Vec<PathBuf>, text: String, req: &ScoreRequest) -> Result<Self> {
        let images = images.into_iter().map(|p| (p, None)).collect();
        let input = match &req.input {
            None => {
                if req.mask.is_some() || req.background.is_some() {
                    return Err(bad_input("--mask/--background", "given without --input", "give the edit's input photo with --input"));
                }
                None
            }
            Some(path) => {
                let photo = image_io::load_rgb(path)?;
                let mask = req.mask.as_ref().map(|m| masks::load_mask(m, photo.dimensions())).transpose()?;
                let background = match &req.background {
                    None => (photo.clone(), None),
                    Some(b) => {
                        let picture = image_io::load_rgb(b)?;
                        let m = req.background_mask.as_ref().map(|m| masks::load_mask(m, picture.dimensions())).transpose()?;
                        (picture, m)
                    }
                };
                Some(Inputs { photo, mask, background: Some(background), fitted: false })
            }
        };
        Ok(Self { images, text, method: None, input })
    }

    /// The embedded input side for outputs of `size` (w, h): only the CLIP score without an input.
    fn reference(&self, scorer: &Scorer, (w, h): (u32, u32)) -> Result<Reference> {
        let Some(input) = &self.input else {
            return Ok(Scorer::no_reference());
        };
        let fit_rgb = |img: &RgbImage| if input.fitted && img.dimensions() == (w, h) { img.clone() } else { image_io::resize_center_crop(img, w, h).0 };
        let fit_gray = |img: &GrayImage| if input.fitted && img.dimensions() == (w, h) { img.clone() } else { image_io::resize_center_crop(img, w, h).0 };
        let photo = fit_rgb(&input.photo);
        let mask = input.mask.as_ref().map(fit_gray);
        let background = input.background.as_ref().map(|(b, m)| (fit_rgb(b), m.as_ref().map(fit_gray)));
        scorer.reference(&photo, mask.as_ref(), background.as_ref().map(|(b, m)| (b, m.as_ref())))
    }
}

/// A path from `session.json`: as written, else beside the session (relative paths were
/// relative to where the edit ran), else by its file name in the session folder.
fn find(dir: &Path, path: &Path) -> Result<PathBuf> {
    let candidates = [Some(path.to_path_buf()), Some(dir.join(path)), path.file_name().map(|n| dir.join(n))];
    candidates.into_iter().flatten().find(|p| p.is_file()).ok_or_else(|| {
        bad_input(path.display(), format!("named in {}/session.json but not found", dir.display()), "run from where the edit ran, or put the file in the session folder")
    })
}

/// The images directly in `dir`, sorted by name.
fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(crate::error::io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
            matches!(ext.as_str(), "png" | "jpg" | "jpeg" | "webp")
        })
        .collect();
    found.sort();
    Ok(found)
}
