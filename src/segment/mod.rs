//! Subject masks from a click or a box, with Segment Anything (SAM ViT-B/L/H or MobileSAM), as
//! the paper makes `M_s`. The steps follow the official `SamPredictor`: resize the photo so its
//! longer side is the model's input size, embed it once, map the prompt into that frame, decode,
//! upsample the chosen mask's logits back to the photo and threshold at 0; then [`clean_mask`].
//!
//! ```no_run
//! use layerdiff::segment::{Point, Prompt, SegmentOptions, Segmenter};
//! # fn main() -> layerdiff::Result<()> {
//! let sam = Segmenter::load(layerdiff::segment::DEFAULT_SAM_MODEL, &Default::default(), &candle_core::Device::Cpu)?;
//! let photo = layerdiff::image_io::load_rgb("dog.jpg".as_ref())?;
//! let embedding = sam.embed(&photo)?;
//! let prompt = Prompt { points: vec![Point { x: 320.0, y: 240.0, foreground: true }], bbox: None };
//! let mask = sam.segment(&embedding, &prompt, &SegmentOptions::default())?.mask;
//! # Ok(()) }
//! ```

mod overlay;
mod postprocess;

pub use overlay::draw_overlay;
pub use postprocess::{clean_mask, CleanOptions};

use crate::error::{bad_input, io_err, Result};
use crate::image_io::{self, save_png_atomic};
use crate::method::edit::Progress;
use crate::models::sam::{Sam, SamConfig, SamEncoderConfig};
use crate::sources::{self, SourceOptions};
use candle_core::{DType, Device, Tensor};
use image::{GrayImage, Luma, RgbImage};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// MobileSAM from candle's conversions on the hub: about 6 s per photo on a laptop CPU.
pub const DEFAULT_SAM_MODEL: &str = "lmz/candle-sam/mobile_sam-tiny-vitt.safetensors";

/// A click, in the photo's pixel coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub x: f32,
    pub y: f32,
    /// `true`: on the subject; `false`: not part of it.
    pub foreground: bool,
}

/// What the user selected: points and/or a box `[x0, y0, x1, y1]`, in the photo's pixels.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    pub points: Vec<Point>,
    pub bbox: Option<[f32; 4]>,
}

impl Prompt {
    pub fn is_empty(&self) -> bool {
        self.points.is_empty() && self.bbox.is_none()
    }

    /// Refuses an empty prompt, a point or box outside a `width` x `height` photo, and a box
    /// whose corners are not ordered. `flag` is the option family in messages: "" for `--point`,
    /// "background-" for `--background-point`.
    pub fn validate(&self, (width, height): (u32, u32), flag: &str) -> Result<()> {
        if self.is_empty() {
            return Err(bad_input(format!("--{flag}point/--{flag}box"), "no prompt", format!("give --{flag}point x,y on the subject or --{flag}box x0,y0,x1,y1 around it")));
        }
        let inside = |x: f32, y: f32| x >= 0.0 && y >= 0.0 && x <= width as f32 && y <= height as f32;
        for p in &self.points {
            if !inside(p.x, p.y) {
                let name = if p.foreground { format!("--{flag}point") } else { format!("--{flag}negative-point") };
                return Err(bad_input(format!("{name} {},{}", p.x, p.y), format!("outside the image ({width}x{height})"), "give pixel coordinates inside it, x from the left, y from the top"));
            }
        }
        if let Some([x0, y0, x1, y1]) = self.bbox {
            let input = format!("--{flag}box {x0},{y0},{x1},{y1}");
            if x0 >= x1 || y0 >= y1 {
                return Err(bad_input(input, "the corners are not ordered", "give x0,y0,x1,y1 with x0 < x1 and y0 < y1 (top-left, then bottom-right)"));
            }
            if !inside(x0, y0) || !inside(x1, y1) {
                return Err(bad_input(input, format!("outside the image ({width}x{height})"), "give pixel coordinates inside it"));
            }
        }
        Ok(())
    }
}

/// Parses `x,y` (clap's value parser for `--point`).
pub fn parse_xy(s: &str) -> std::result::Result<[f32; 2], String> {
    parse_numbers(s).and_then(|v| <[f32; 2]>::try_from(v).map_err(|_| format!("`{s}`: give x,y in pixels, e.g. 320,240")))
}

/// Parses `x0,y0,x1,y1` (clap's value parser for `--box`).
pub fn parse_box(s: &str) -> std::result::Result<[f32; 4], String> {
    parse_numbers(s).and_then(|v| <[f32; 4]>::try_from(v).map_err(|_| format!("`{s}`: give x0,y0,x1,y1 in pixels, e.g. 40,30,600,460")))
}

fn parse_numbers(s: &str) -> std::result::Result<Vec<f32>, String> {
    s.split(',')
        .map(|part| part.trim().parse::<f32>().ok().filter(|v| v.is_finite()).ok_or_else(|| format!("`{s}`: `{part}` is not a number")))
        .collect()
}

/// Whether SAM returns three candidate masks (the best by predicted IoU is kept) or one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[derive(clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Multimask {
    /// Three for a single click (ambiguous: part, object, group), one otherwise, as SAM's authors advise.
    #[default]
    Auto,
    On,
    Off,
}

/// How a prompt becomes a mask.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SegmentOptions {
    pub multimask: Multimask,
    pub clean: CleanOptions,
}

/// A loaded SAM and the device it runs on.
pub struct Segmenter {
    sam: Sam,
    device: Device,
    /// The checkpoint, for messages and records.
    pub path: PathBuf,
}

/// A photo's image embedding, reusable for any number of prompts.
pub struct ImageEmbedding {
    embeddings: Tensor,
    /// The photo's (width, height).
    original: (u32, u32),
    /// Its size after the longest-side resize, inside the model's square input.
    resized: (u32, u32),
}

/// A prompt's mask at the photo's size (0 or 255) and SAM's predicted IoU for it.
pub struct Segmentation {
    pub mask: GrayImage,
    pub iou: f32,
}

impl Segmenter {
    /// Loads a SAM checkpoint in the segment-anything layout (the `lmz/candle-sam` conversions):
    /// a `.safetensors` path, a folder holding one, or `org/name/file.safetensors` on the hub.
    /// The model (ViT-B, -L, -H, MobileSAM, or a tiny test model) is read off the tensors.
    pub fn load(spec: &str, opts: &SourceOptions, device: &Device) -> Result<Self> {
        let path = sources::resolve_weight_file(spec, opts)?;
        let layout_fix = "give a SAM ViT-B/L/H or MobileSAM checkpoint in safetensors form, as lmz/candle-sam/sam_vit_b_01ec64.safetensors";
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        // SAFETY: the file is only read; a concurrent writer would be the user's own doing.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(&path))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| bad_input(path.display(), format!("not a safetensors file ({e})"), layout_fix))?;
        let shapes: HashMap<String, Vec<usize>> = header.tensors().into_iter().map(|(name, info)| (name, info.shape.clone())).collect();
        let cfg = SamConfig::from_checkpoint(&shapes, header.metadata().as_ref())
            .map_err(|e| bad_input(path.display(), format!("unknown checkpoint layout ({e})"), layout_fix))?;
        // SAFETY: as above.
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, device) }?;
        let sam = Sam::new(vb, &cfg).map_err(|e| bad_input(path.display(), format!("does not fit the {} layout ({e})", model_name(&cfg)), layout_fix))?;
        Ok(Self { sam, device: device.clone(), path })
    }

    /// "ViT" or "TinyViT (MobileSAM)" and the input size, for messages.
    pub fn describe(&self) -> String {
        let cfg = self.sam.config();
        format!("{} at {}x{}", model_name(cfg), cfg.image_size, cfg.image_size)
    }

    /// Embeds a photo (the costly part: about 6 s on a CPU for MobileSAM, 18 s for ViT-B).
    pub fn embed(&self, photo: &RgbImage) -> Result<ImageEmbedding> {
        let (w, h) = photo.dimensions();
        if w == 0 || h == 0 {
            return Err(bad_input("image", "is empty", "give a photo"));
        }
        let resized = resized_size((w, h), self.sam.config().image_size as u32);
        let input = image::imageops::resize(photo, resized.0, resized.1, image::imageops::FilterType::Triangle);
        let data: Vec<f32> = input.as_raw().iter().map(|&v| v as f32).collect();
        let pixels = Tensor::from_vec(data, (resized.1 as usize, resized.0 as usize, 3), &Device::Cpu)?.permute((2, 0, 1))?.to_device(&self.device)?;
        let embeddings = self.sam.image_embeddings(&self.sam.preprocess(&pixels)?)?;
        Ok(ImageEmbedding { embeddings, original: (w, h), resized })
    }

    /// The prompt's mask: SAM's best candidate, thresholded at logit 0 and cleaned up. An empty
    /// result is an error that suggests another prompt.
    pub fn segment(&self, embedding: &ImageEmbedding, prompt: &Prompt, opts: &SegmentOptions) -> Result<Segmentation> {
        prompt.validate(embedding.original, "")?;
        let multimask = match opts.multimask {
            Multimask::Auto => prompt.points.len() == 1 && prompt.bbox.is_none(),
            Multimask::On => true,
            Multimask::Off => false,
        };
        let (logits, iou) = self.mask_logits(embedding, prompt, multimask)?;
        let (w, h) = embedding.original;
        let binary = GrayImage::from_fn(w, h, |x, y| Luma([if logits[(y * w + x) as usize] > 0.0 { 255 } else { 0 }]));
        let mask = clean_mask(&binary, prompt, &opts.clean);
        if mask.pixels().all(|p| p.0[0] == 0) {
            return Err(bad_input("--point/--box", "the mask came out empty", "try another point, on the middle of the subject, or a box around it"));
        }
        Ok(Segmentation { mask, iou })
    }

    /// The best candidate's logits at the photo's size (row-major) and its predicted IoU, as
    /// `SamPredictor.predict` computes them: low-res logits bilinearly upsampled to the model's
    /// input, the padding cropped, then bilinearly resized to the photo.
    pub fn mask_logits(&self, embedding: &ImageEmbedding, prompt: &Prompt, multimask: bool) -> Result<(Vec<f32>, f32)> {
        let (w, h) = embedding.original;
        let (sx, sy) = (embedding.resized.0 as f32 / w as f32, embedding.resized.1 as f32 / h as f32);
        let points = if prompt.points.is_empty() {
            None
        } else {
            let n = prompt.points.len();
            let coords: Vec<f32> = prompt.points.iter().flat_map(|p| [p.x * sx, p.y * sy]).collect();
            let labels: Vec<f32> = prompt.points.iter().map(|p| if p.foreground { 1.0 } else { 0.0 }).collect();
            Some((Tensor::from_vec(coords, (1, n, 2), &self.device)?, Tensor::from_vec(labels, (1, n), &self.device)?))
        };
        let bbox = match prompt.bbox {
            Some([x0, y0, x1, y1]) => Some(Tensor::from_vec(vec![x0 * sx, y0 * sy, x1 * sx, y1 * sy], (1, 4), &self.device)?),
            None => None,
        };
        let (low_res, iou) = self.sam.predict_masks(&embedding.embeddings, points.as_ref().map(|(c, l)| (c, l)), bbox.as_ref(), None, multimask)?;
        let iou = iou.flatten_all()?.to_vec1::<f32>()?;
        let best = iou.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0);
        let size = self.sam.config().image_size;
        let logits = low_res
            .narrow(1, best, 1)?
            .upsample_bilinear2d(size, size, false)?
            .narrow(2, 0, embedding.resized.1 as usize)?
            .narrow(3, 0, embedding.resized.0 as usize)?
            .upsample_bilinear2d(h as usize, w as usize, false)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((logits, iou[best]))
    }
}

fn model_name(cfg: &SamConfig) -> &'static str {
    match cfg.encoder {
        SamEncoderConfig::Vit(_) => "SAM ViT",
        SamEncoderConfig::TinyVit(_) => "MobileSAM TinyViT",
    }
}

/// The official `ResizeLongestSide.get_preprocess_shape`: the longer side becomes `target`, the
/// other is scaled alike and rounded.
pub fn resized_size((w, h): (u32, u32), target: u32) -> (u32, u32) {
    let scale = target as f64 / w.max(h) as f64;
    let side = |v: u32| ((v as f64 * scale + 0.5) as u32).max(1);
    (side(w), side(h))
}

/// Segments `image` with `prompt` and writes the mask (white on black, the photo's size) to
/// `mask_out` and the overlay beside it ([`overlay_path`]). `flag` names the prompt's options in
/// messages ("" or "background-").
pub fn segment_to_files(sam: &Segmenter, image: &Path, prompt: &Prompt, flag: &str, opts: &SegmentOptions, mask_out: &Path, progress: &mut dyn Progress) -> Result<Segmentation> {
    let photo = image_io::load_rgb(image)?;
    prompt.validate(photo.dimensions(), flag)?;
    progress.start("segmenting", 2);
    let embedding = sam.embed(&photo)?;
    progress.step(1, None);
    let result = sam.segment(&embedding, prompt, opts).map_err(|e| match e {
        crate::Error::BadInput { problem, fix, .. } => bad_input(format!("{}: --{flag}point/--{flag}box", image.display()), problem, fix),
        e => e,
    })?;
    progress.step(2, None);
    progress.finish();
    save_png_atomic(&image_io::gray_to_rgb(&result.mask), mask_out)?;
    save_png_atomic(&draw_overlay(&photo, &result.mask, prompt), &overlay_path(mask_out))?;
    Ok(result)
}

/// `mask.png` -> `mask-overlay.png`, beside it.
pub fn overlay_path(mask: &Path) -> PathBuf {
    let stem = mask.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "mask".into());
    mask.with_file_name(format!("{stem}-overlay.png"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_matches_the_official_rounding() {
        assert_eq!(resized_size((640, 480), 1024), (1024, 768));
        assert_eq!(resized_size((333, 1000), 1024), (341, 1024));
        assert_eq!(resized_size((1500, 1), 1024), (1024, 1));
    }

    #[test]
    fn prompts_are_checked_against_the_image() {
        let point = |x, y| Prompt { points: vec![Point { x, y, foreground: true }], bbox: None };
        assert!(point(10.0, 10.0).validate((64, 48), "").is_ok());
        let err = point(70.0, 10.0).validate((64, 48), "").unwrap_err().to_string();
        assert!(err.contains("--point 70,10") && err.contains("outside the image (64x48)"), "{err}");
        let err = Prompt { points: vec![], bbox: Some([30.0, 5.0, 20.0, 40.0]) }.validate((64, 48), "background-").unwrap_err().to_string();
        assert!(err.contains("--background-box") && err.contains("not ordered"), "{err}");
        assert!(Prompt::default().validate((64, 48), "").unwrap_err().to_string().contains("no prompt"));
        assert_eq!(parse_xy("12, 7.5"), Ok([12.0, 7.5]));
        assert!(parse_xy("12").unwrap_err().contains("give x,y"));
        assert!(parse_box("1,2,3,x").unwrap_err().contains("`x` is not a number"));
    }
}
