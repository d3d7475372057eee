//! The metrics of the paper's table and of subject-driven editing work:
//!
//! - **CLIP score**: the cosine between the CLIP embeddings of an output and of its target text,
//!   raw (the paper's 0.35) and as torchmetrics' `CLIPScore` reports one image, `max(100 cos, 0)`.
//! - **Subject fidelity**: the cosine between the subject of the input and what is at the same
//!   place in the output, in CLIP's image space and in DINOv2's (its class token, as DreamBooth's
//!   DINO metric). The subject is cut out the same way from both: the square around the
//!   bounding box of the subject mask (centred on it, moved inside the image where it fits, black
//!   where it leaves it), every pixel outside the mask set to black. Square, so that the metric
//!   models' centre crop keeps all of it; black outside the mask, so that only the subject is
//!   compared.
//! - **Background fidelity**: the same between the output and the background source, on the whole
//!   image with every pixel that is subject (in the input) or not background (in the source) set
//!   to black.
//! - **Whole-image fidelity** (DreamBooth's CLIP-I and DINO): the cosine between the whole input
//!   and the whole output.
//!
//! Masks are gray, a pixel is selected at 128 and above (the edit's own threshold), and every
//! image and mask of one comparison has the same size: the edit's working size ([`Reference`]).

use super::models::{ClipEmbedder, DinoEmbedder};
use crate::error::{bad_input, Result};
use crate::models::clip::cosine_similarity;
use crate::sources::SourceOptions;
use candle_core::{Device, Tensor};
use image::{GrayImage, RgbImage};
use serde::Serialize;

/// The CLIP model the paper's CLIP score uses by default (torchmetrics' default, ViT-L/14).
pub const DEFAULT_CLIP_MODEL: &str = "openai/clip-vit-large-patch14";
/// The DINOv2 model of the fidelity metrics. DreamBooth reports DINO ViT-S/16
/// (`facebook/dino-vits16`, DINO v1); DINOv2's base model is its usual stand-in today.
pub const DEFAULT_DINO_MODEL: &str = "facebook/dinov2-base";

/// Which models score, and from where.
#[derive(Debug, Clone)]
pub struct ScorerOptions {
    /// A `CLIPModel` folder or hub repo id (`--clip-model`).
    pub clip_model: String,
    /// A `Dinov2Model` folder or hub repo id (`--dino-model`); `None`: no DINOv2 metrics.
    pub dino_model: Option<String>,
    pub source: SourceOptions,
    pub device: Device,
}

impl Default for ScorerOptions {
    fn default() -> Self {
        Self {
            clip_model: DEFAULT_CLIP_MODEL.into(),
            dino_model: Some(DEFAULT_DINO_MODEL.into()),
            source: SourceOptions::from_env(),
            device: Device::Cpu,
        }
    }
}

/// A CLIP score, both ways it is reported.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClipScore {
    /// The cosine of the image and text embeddings (the paper's 0.35).
    pub cosine: f32,
    /// `max(100 cosine, 0)`, torchmetrics' `CLIPScore` of one image (over several, torchmetrics
    /// clips the mean of `100 cosine` instead).
    pub torchmetrics: f32,
}

impl ClipScore {
    pub fn from_cosine(cosine: f32) -> Self {
        Self { cosine, torchmetrics: (100.0 * cosine).max(0.0) }
    }
}

/// A cosine in each metric model's space; DINOv2's is `None` without a DINOv2 model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fidelity {
    pub clip: f32,
    pub dino: Option<f32>,
}

/// Every metric of one output. The fidelities are `None` when their region is empty (no mask:
/// the whole image is the subject and nothing is background).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scores {
    pub clip_score: ClipScore,
    /// Input vs output, whole images (DreamBooth's CLIP-I and DINO); `None` without an input.
    pub image: Option<Fidelity>,
    pub subject: Option<Fidelity>,
    pub background: Option<Fidelity>,
}

/// The metric models.
#[derive(Debug)]
pub struct Scorer {
    pub clip: ClipEmbedder,
    pub dino: Option<DinoEmbedder>,
}

/// The input side of the comparisons, embedded once for every output of the same input: the
/// input photo and its subject, and the background source's background, each in both spaces.
#[derive(Debug, Clone)]
pub struct Reference {
    subject_mask: Option<GrayImage>,
    /// Pixels that are subject in the input or not background in the source.
    not_background: Option<GrayImage>,
    image: Option<Embeddings>,
    subject: Option<Embeddings>,
    background: Option<Embeddings>,
}

/// One picture in CLIP's space and, with a DINOv2 model, in DINOv2's: `(1, d)` rows.
#[derive(Debug, Clone)]
struct Embeddings {
    clip: Tensor,
    dino: Option<Tensor>,
}

impl Scorer {
    /// Loads the CLIP model and, if asked, the DINOv2 model; a model of the wrong kind is a
    /// one-line error.
    pub fn load(opts: &ScorerOptions) -> Result<Self> {
        let clip = ClipEmbedder::load(&opts.clip_model, &opts.source, &opts.device)?;
        let dino = opts.dino_model.as_deref().map(|spec| DinoEmbedder::load(spec, &opts.source, &opts.device)).transpose()?;
        Ok(Self { clip, dino })
    }

    /// The CLIP score of one image for one text.
    pub fn clip_score(&self, image: &RgbImage, text: &str) -> Result<ClipScore> {
        let image = self.clip.image_embeds(&[image])?;
        self.clip_score_of(&image, text)
    }

    fn clip_score_of(&self, image_embeds: &Tensor, text: &str) -> Result<ClipScore> {
        let text = self.clip.text_embeds(&[text])?;
        Ok(ClipScore::from_cosine(cosine(image_embeds, &text)?))
    }

    /// Subject fidelity of one output: the masked subject crops of `input` and `output`
    /// (`input_mask` white = subject), compared in both spaces. All three the same size.
    pub fn subject_fidelity(&self, input: &RgbImage, input_mask: &GrayImage, output: &RgbImage) -> Result<Fidelity> {
        same_size(&[input.dimensions(), input_mask.dimensions(), output.dimensions()])?;
        let (a, b) = (subject_crop(input, input_mask)?, subject_crop(output, input_mask)?);
        self.fidelity(&self.embed(&a)?, &self.embed(&b)?)
    }

    /// Background fidelity of one output: `source` and `output` with every pixel of
    /// `not_background` (white: the subject, and what is not background in the source) black.
    pub fn background_fidelity(&self, source: &RgbImage, not_background: &GrayImage, output: &RgbImage) -> Result<Option<Fidelity>> {
        same_size(&[source.dimensions(), not_background.dimensions(), output.dimensions()])?;
        let (Some(a), Some(b)) = (background_region(source, not_background), background_region(output, not_background)) else {
            return Ok(None);
        };
        Ok(Some(self.fidelity(&self.embed(&a)?, &self.embed(&b)?)?))
    }

    /// Whole-image fidelity: `input` against `output`.
    pub fn image_fidelity(&self, input: &RgbImage, output: &RgbImage) -> Result<Fidelity> {
        self.fidelity(&self.embed(input)?, &self.embed(output)?)
    }

    /// Embeds the input side of an edit once. `subject_mask`: white = subject, `None`: the whole
    /// photo is the subject. `background`: the background source and its mask of what is not
    /// background (`None`: all of it is); without it, the background is not compared. Every image
    /// and mask the input's size.
    pub fn reference(&self, input: &RgbImage, subject_mask: Option<&GrayImage>, background: Option<(&RgbImage, Option<&GrayImage>)>) -> Result<Reference> {
        let mut sizes = vec![input.dimensions()];
        sizes.extend(subject_mask.map(|m| m.dimensions()));
        if let Some((img, mask)) = background {
            sizes.push(img.dimensions());
            sizes.extend(mask.map(|m| m.dimensions()));
        }
        same_size(&sizes)?;
        let image = self.embed(input)?;
        let subject = subject_mask.map(|m| self.embed(&subject_crop(input, m)?)).transpose()?;
        let (w, h) = input.dimensions();
        let not_background = background.map(|(_, source_mask)| {
            let subject = subject_mask.cloned().unwrap_or_else(|| GrayImage::from_pixel(w, h, image::Luma([255])));
            match source_mask {
                Some(m) => union(&subject, m),
                None => subject,
            }
        });
        let background = match (background, &not_background) {
            (Some((source, _)), Some(nb)) => background_region(source, nb).map(|region| self.embed(&region)).transpose()?,
            _ => None,
        };
        Ok(Reference { subject_mask: subject_mask.cloned(), not_background, image: Some(image), subject, background })
    }

    /// No input to compare with: [`Self::score`] gives the CLIP score alone.
    pub fn no_reference() -> Reference {
        Reference { subject_mask: None, not_background: None, image: None, subject: None, background: None }
    }

    /// Every metric of one output of the edit `reference` was made for, `text` its target text.
    pub fn score(&self, reference: &Reference, output: &RgbImage, text: &str) -> Result<Scores> {
        let output_size = output.dimensions();
        if let Some(m) = &reference.not_background.as_ref().or(reference.subject_mask.as_ref()) {
            same_size(&[m.dimensions(), output_size])?;
        }
        // One batch per model: the whole output, its subject crop, its background region.
        let mut images = vec![output.clone()];
        if let Some(mask) = &reference.subject_mask {
            images.push(subject_crop(output, mask)?);
        }
        let background = reference.background.as_ref().and(reference.not_background.as_ref()).and_then(|nb| background_region(output, nb));
        if let Some(region) = background {
            images.push(region);
        }
        let refs: Vec<&RgbImage> = images.iter().collect();
        let clip = self.clip.image_embeds(&refs)?;
        let dino = self.dino.as_ref().map(|d| d.image_embeds(&refs)).transpose()?;
        let row = |i: usize| -> Result<Embeddings> {
            Ok(Embeddings { clip: clip.narrow(0, i, 1)?, dino: dino.as_ref().map(|d| d.narrow(0, i, 1)).transpose()? })
        };
        let whole = row(0)?;
        let clip_score = self.clip_score_of(&whole.clip, text)?;
        let image = reference.image.as_ref().map(|r| self.fidelity(r, &whole)).transpose()?;
        let mut next = 1;
        let subject = match &reference.subject {
            Some(r) => {
                next += 1;
                Some(self.fidelity(r, &row(1)?)?)
            }
            None => None,
        };
        let background = match (&reference.background, images.len() > next) {
            (Some(r), true) => Some(self.fidelity(r, &row(next)?)?),
            _ => None,
        };
        Ok(Scores { clip_score, image, subject, background })
    }

    fn embed(&self, image: &RgbImage) -> Result<Embeddings> {
        let clip = self.clip.image_embeds(&[image])?;
        let dino = self.dino.as_ref().map(|d| d.image_embeds(&[image])).transpose()?;
        Ok(Embeddings { clip, dino })
    }

    fn fidelity(&self, a: &Embeddings, b: &Embeddings) -> Result<Fidelity> {
        let dino = match (&a.dino, &b.dino) {
            (Some(a), Some(b)) => Some(cosine(a, b)?),
            _ => None,
        };
        Ok(Fidelity { clip: cosine(&a.clip, &b.clip)?, dino })
    }
}

/// The cosine of two `(1, d)` embeddings.
fn cosine(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(cosine_similarity(a, b)?.squeeze(0)?.to_scalar::<f32>()?)
}

fn same_size(sizes: &[(u32, u32)]) -> Result<()> {
    match sizes.iter().find(|s| **s != sizes[0]) {
        None => Ok(()),
        Some((w, h)) => Err(bad_input(
            "metric inputs",
            format!("images and masks of one comparison differ in size ({}x{} and {w}x{h})", sizes[0].0, sizes[0].1),
            "bring them to the output's size first, as the edit crops the photo (image_io::resize_center_crop)",
        )),
    }
}

/// Whether a mask value selects its pixel.
fn selected(v: u8) -> bool {
    v >= 128
}

/// The bounding box `(x0, y0, x1, y1)` (exclusive ends) of a mask's selected pixels.
pub fn mask_bbox(mask: &GrayImage) -> Option<(u32, u32, u32, u32)> {
    let mut bbox: Option<(u32, u32, u32, u32)> = None;
    for (x, y, p) in mask.enumerate_pixels() {
        if selected(p.0[0]) {
            bbox = Some(match bbox {
                None => (x, y, x + 1, y + 1),
                Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1)),
            });
        }
    }
    bbox
}

/// The subject of `img` as the fidelity metrics compare it: the square around the bounding box of
/// `mask`'s selected pixels (centred on the box, shifted to stay inside the image where it fits,
/// black where it cannot), with every pixel the mask does not select black. An empty mask is an
/// error.
pub fn subject_crop(img: &RgbImage, mask: &GrayImage) -> Result<RgbImage> {
    let Some((x0, y0, x1, y1)) = mask_bbox(mask) else {
        return Err(bad_input("subject mask", "selects nothing (no value of 128 or more)", "give the mask of the subject, white on black"));
    };
    let side = (x1 - x0).max(y1 - y0);
    // top-left of the square along one axis: centred on the box, then inside [0, size - side]
    let start = |lo: u32, hi: u32, size: u32| -> i64 {
        let s = (lo + hi) as i64 / 2 - side as i64 / 2;
        if side <= size {
            s.clamp(0, (size - side) as i64)
        } else {
            (size as i64 - side as i64) / 2
        }
    };
    let (w, h) = img.dimensions();
    let (sx, sy) = (start(x0, x1, w), start(y0, y1, h));
    Ok(RgbImage::from_fn(side, side, |x, y| {
        let (ix, iy) = (sx + x as i64, sy + y as i64);
        if ix < 0 || iy < 0 || ix >= w as i64 || iy >= h as i64 || !selected(mask.get_pixel(ix as u32, iy as u32).0[0]) {
            image::Rgb([0, 0, 0])
        } else {
            *img.get_pixel(ix as u32, iy as u32)
        }
    }))
}

/// `img` with every pixel `not_background` selects black; `None` when it selects all of them.
pub fn background_region(img: &RgbImage, not_background: &GrayImage) -> Option<RgbImage> {
    if not_background.pixels().all(|p| selected(p.0[0])) {
        return None;
    }
    Some(RgbImage::from_fn(img.width(), img.height(), |x, y| {
        if selected(not_background.get_pixel(x, y).0[0]) {
            image::Rgb([0, 0, 0])
        } else {
            *img.get_pixel(x, y)
        }
    }))
}

/// The pixelwise maximum of two masks: selected in either.
fn union(a: &GrayImage, b: &GrayImage) -> GrayImage {
    GrayImage::from_fn(a.width(), a.height(), |x, y| image::Luma([a.get_pixel(x, y).0[0].max(b.get_pixel(x, y).0[0])]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_crop_is_the_square_around_the_mask_with_black_elsewhere() {
        let img = RgbImage::from_fn(20, 10, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        // a 4 x 2 subject at x 3..7, y 1..3, with one hole
        let mask = GrayImage::from_fn(20, 10, |x, y| image::Luma([if (3..7).contains(&x) && (1..3).contains(&y) && (x, y) != (4, 2) { 255 } else { 0 }]));
        let crop = subject_crop(&img, &mask).unwrap();
        assert_eq!(crop.dimensions(), (4, 4));
        // square centred on the box vertically: rows 0..4 (1 + 3 = 4, 4 / 2 - 2 = 0)
        assert_eq!(crop.get_pixel(0, 1).0, [30, 20, 7]);
        assert_eq!(crop.get_pixel(1, 2).0, [0, 0, 0], "hole");
        assert_eq!(crop.get_pixel(0, 0).0, [0, 0, 0], "outside the mask");
        assert_eq!(mask_bbox(&mask), Some((3, 1, 7, 3)));
        assert!(subject_crop(&img, &GrayImage::new(20, 10)).is_err());
        // a box taller than the image is wide: black beyond the sides
        let tall = GrayImage::from_fn(4, 10, |_, _| image::Luma([255]));
        let crop = subject_crop(&RgbImage::from_pixel(4, 10, image::Rgb([9, 9, 9])), &tall).unwrap();
        assert_eq!(crop.dimensions(), (10, 10));
        assert_eq!((crop.get_pixel(0, 0).0, crop.get_pixel(3, 0).0, crop.get_pixel(9, 9).0), ([0; 3], [9; 3], [0; 3]));
    }

    #[test]
    fn background_region_blacks_out_what_is_not_background() {
        let img = RgbImage::from_pixel(3, 2, image::Rgb([5, 6, 7]));
        let nb = GrayImage::from_fn(3, 2, |x, _| image::Luma([if x == 0 { 200 } else { 10 }]));
        let region = background_region(&img, &nb).unwrap();
        assert_eq!((region.get_pixel(0, 1).0, region.get_pixel(1, 1).0), ([0; 3], [5, 6, 7]));
        assert!(background_region(&img, &GrayImage::from_pixel(3, 2, image::Luma([255]))).is_none());
    }

    #[test]
    fn torchmetrics_clips_at_zero() {
        assert_eq!(ClipScore::from_cosine(0.35).torchmetrics, 35.0);
        assert_eq!(ClipScore::from_cosine(-0.1).torchmetrics, 0.0);
    }
}
