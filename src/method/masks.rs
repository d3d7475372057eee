//! Subject and background masks: loading a user's mask, checking it, fitting it to the model's
//! size exactly as the photo is fitted, and bringing it to latent size (area average, soft edges).
//!
//! Masks are gray images, 255 = subject (or "not background" for `M_b`), 0 = background; values in
//! between are kept (soft edges). They are loaded at the ORIGINAL photo's size and then cropped with
//! the photo's recorded [`Crop`] ([`crate::image_io::apply_crop`] with [`MASK_FILTER`]).

use crate::error::{bad_input, Result};
use crate::image_io;
use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use image::GrayImage;
use std::path::Path;

pub use crate::image_io::{apply_crop, fit_size, resize_center_crop_recorded, Crop};

/// The filter masks are resized with: linear, so soft values stay in range without ringing.
pub const MASK_FILTER: FilterType = FilterType::Triangle;

/// Largest relative difference of aspect ratio between a mask and its image that is accepted
/// (rounding of a mask saved at another resolution).
pub const ASPECT_TOLERANCE: f64 = 0.01;

/// Reads a mask for an image of `image_size` (w, h), the ORIGINAL photo's size: any format and
/// size, as gray (white = subject; no threshold, soft values kept), resized to `image_size`.
/// An image with transparency that varies is read through its alpha channel (a cut-out: opaque =
/// subject). A mask whose aspect ratio differs from the image's by more than 1 % is refused.
pub fn load_mask(path: &Path, image_size: (u32, u32)) -> Result<GrayImage> {
    let img = image_io::load_image(path)?;
    let gray = if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        if rgba.pixels().any(|p| p.0[3] != 255) {
            GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| image::Luma([rgba.get_pixel(x, y).0[3]]))
        } else {
            img.to_luma8()
        }
    } else {
        img.to_luma8()
    };
    let (mw, mh) = gray.dimensions();
    let (iw, ih) = image_size;
    if mw == 0 || mh == 0 || iw == 0 || ih == 0 {
        return Err(bad_input(path.display(), format!("mask is {mw}x{mh} for an image of {iw}x{ih}"), "give a mask made for this image"));
    }
    let (mask_ratio, image_ratio) = (mw as f64 / mh as f64, iw as f64 / ih as f64);
    if (mask_ratio / image_ratio - 1.0).abs() > ASPECT_TOLERANCE {
        return Err(bad_input(
            path.display(),
            format!("aspect ratio {mw}:{mh} differs from the image's {iw}:{ih}"),
            "give a mask made for this image",
        ));
    }
    if (mw, mh) == image_size {
        return Ok(gray);
    }
    Ok(image::imageops::resize(&gray, iw, ih, MASK_FILTER))
}

/// Refuses a mask that selects nothing (every value under 0.5) or everything (every value 0.5 or
/// more). `what` names the mask in the message (a path or a flag).
pub fn validate_mask(mask: &GrayImage, what: &str) -> Result<()> {
    let on = mask.pixels().filter(|p| p.0[0] >= 128).count();
    if on == 0 {
        return Err(bad_input(what, "mask is empty", "paint the subject white"));
    }
    if on == mask.pixels().len() {
        return Err(bad_input(what, "mask covers the whole image", "paint only the subject white, the background black"));
    }
    Ok(())
}

/// The mask at latent size: the mean of each `factor` x `factor` block, in [0, 1], as a
/// `[1, 1, h / factor, w / factor]` tensor. The mask's sides must be multiples of `factor`.
pub fn mask_to_latent(mask: &GrayImage, factor: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    if factor == 0 || w == 0 || h == 0 || !w.is_multiple_of(factor) || !h.is_multiple_of(factor) {
        return Err(bad_input("mask", format!("{w}x{h} is not a positive multiple of {factor}"), "fit the mask to the model's size first"));
    }
    let (lw, lh) = (w / factor, h / factor);
    let mut sums = vec![0u64; lw * lh];
    for (x, y, p) in mask.enumerate_pixels() {
        sums[(y as usize / factor) * lw + x as usize / factor] += p.0[0] as u64;
    }
    let norm = 255.0 * (factor * factor) as f64;
    let data: Vec<f32> = sums.iter().map(|&s| (s as f64 / norm) as f32).collect();
    Ok(Tensor::from_vec(data, (1, 1, lh, lw), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
}

/// The mean of the mask's values in [0, 1]: the subject's share of the image (the small-subject
/// rule of stage 2 applies under 0.1).
pub fn area_fraction(mask: &GrayImage) -> f64 {
    let n = mask.pixels().len();
    if n == 0 {
        return 0.0;
    }
    mask.pixels().map(|p| p.0[0] as f64).sum::<f64>() / (255.0 * n as f64)
}

/// A mask of the given size that is all zero: `M_b` for a generated background, which holds no
/// subject.
pub fn empty_mask(width: u32, height: u32) -> GrayImage {
    GrayImage::new(width, height)
}
