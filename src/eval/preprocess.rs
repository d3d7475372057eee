//! Image preprocessing for the metric models, as transformers' `CLIPImageProcessor` (CLIP) and
//! `BitImageProcessor` (DINOv2): resize the shortest side, centre crop, rescale, normalize.
//!
//! The resize is Pillow's (`Image.resize`, `libImaging/Resample.c`) re-done step by step:
//! coefficients normalized in f64 and rounded to 22-bit fixed point, a horizontal pass, then a
//! vertical one, each rounded and clipped to 8 bits. It gives the bytes transformers' PIL backend
//! (`CLIPImageProcessorPil`) gives; transformers 5's default backend (torchvision's uint8 antialiased
//! bicubic) differs from Pillow by 1 level on a few tenths of a percent of the values.

use crate::error::{bad_input, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use serde_json::Value;
use std::path::Path;

/// `OPENAI_CLIP_MEAN`, `OPENAI_CLIP_STD`.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
/// `IMAGENET_DEFAULT_MEAN`, `IMAGENET_DEFAULT_STD` (DINOv2).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Pillow's resampling filters, by their `PIL.Image.Resampling` numbers (`resample` in
/// `preprocessor_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// 1
    Lanczos,
    /// 2
    Bilinear,
    /// 3 (`a = -0.5`, Keys' cubic; the image crate's `CatmullRom`)
    Bicubic,
    /// 4
    Box,
    /// 5
    Hamming,
}

impl Resample {
    pub fn from_pil(code: u64) -> Option<Self> {
        match code {
            1 => Some(Self::Lanczos),
            2 => Some(Self::Bilinear),
            3 => Some(Self::Bicubic),
            4 => Some(Self::Box),
            5 => Some(Self::Hamming),
            _ => None,
        }
    }

    pub fn pil_code(self) -> u64 {
        match self {
            Self::Lanczos => 1,
            Self::Bilinear => 2,
            Self::Bicubic => 3,
            Self::Box => 4,
            Self::Hamming => 5,
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    /// Pillow's filter functions (`box_filter`, `bilinear_filter`, ...).
    fn weight(self, x: f64) -> f64 {
        let sinc = |x: f64| if x == 0.0 { 1.0 } else { (x * std::f64::consts::PI).sin() / (x * std::f64::consts::PI) };
        match self {
            Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let px = x * std::f64::consts::PI;
                    px.sin() / px * (0.54 + 0.46 * px.cos())
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// How the image is resized before the crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// The shortest side becomes this, the other `int(side * long / short)` (`{"shortest_edge": n}`).
    ShortestEdge(u32),
    /// Exactly this size, aspect ratio not kept (`{"height": h, "width": w}`).
    Exact { height: u32, width: u32 },
}

/// A `preprocessor_config.json`'s settings (`CLIPImageProcessor` / `BitImageProcessor`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub do_resize: bool,
    pub size: ResizeTo,
    pub resample: Resample,
    pub do_center_crop: bool,
    /// (height, width)
    pub crop_size: (u32, u32),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl ImageProcessor {
    /// `CLIPImageProcessor`'s defaults, which OpenAI's CLIP models use: shortest side 224
    /// bicubic, centre crop 224, CLIP's mean and std.
    pub fn clip() -> Self {
        Self {
            do_resize: true,
            size: ResizeTo::ShortestEdge(224),
            resample: Resample::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    /// The `BitImageProcessor` settings of the `facebook/dinov2-*` models: shortest side 256
    /// bicubic, centre crop 224, ImageNet's mean and std.
    pub fn dinov2() -> Self {
        Self { size: ResizeTo::ShortestEdge(256), image_mean: IMAGENET_MEAN, image_std: IMAGENET_STD, ..Self::clip() }
    }

    /// Reads a `preprocessor_config.json` (`file` names it in errors); keys it lacks keep the
    /// values of `defaults`.
    pub fn from_json(config: &Value, file: &str, defaults: Self) -> Result<Self> {
        let fix = "use the preprocessor_config.json of a CLIP or DINOv2 model";
        let bad = |key: &str, v: &Value| bad_input(file, format!("`{key}` = {v} is not supported"), fix);
        let Some(obj) = config.as_object() else {
            return Err(bad_input(file, "not a JSON object", fix));
        };
        let mut p = defaults;
        let flag = |key: &str, default: bool| -> Result<bool> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(bad(key, v)),
            }
        };
        p.do_resize = flag("do_resize", p.do_resize)?;
        p.do_center_crop = flag("do_center_crop", p.do_center_crop)?;
        p.do_rescale = flag("do_rescale", p.do_rescale)?;
        p.do_normalize = flag("do_normalize", p.do_normalize)?;
        let side = |v: &Value| v.as_u64().filter(|&n| n > 0 && n <= 1 << 16).map(|n| n as u32);
        if let Some(v) = obj.get("size").filter(|v| !v.is_null()) {
            p.size = match (side(v), v.get("shortest_edge").and_then(side), v.get("height").and_then(side), v.get("width").and_then(side)) {
                // An int means the shortest side for these processors (`default_to_square=False`).
                (Some(n), ..) | (None, Some(n), ..) => ResizeTo::ShortestEdge(n),
                (None, None, Some(height), Some(width)) => ResizeTo::Exact { height, width },
                _ => return Err(bad("size", v)),
            };
        }
        if let Some(v) = obj.get("crop_size").filter(|v| !v.is_null()) {
            p.crop_size = match (side(v), v.get("height").and_then(side), v.get("width").and_then(side)) {
                (Some(n), ..) => (n, n),
                (None, Some(h), Some(w)) => (h, w),
                _ => return Err(bad("crop_size", v)),
            };
        }
        if let Some(v) = obj.get("resample").filter(|v| !v.is_null()) {
            p.resample = v.as_u64().and_then(Resample::from_pil).ok_or_else(|| bad("resample", v))?;
        }
        if let Some(v) = obj.get("rescale_factor").filter(|v| !v.is_null()) {
            p.rescale_factor = v.as_f64().ok_or_else(|| bad("rescale_factor", v))?;
        }
        let triple = |key: &str, v: &Value| -> Result<[f32; 3]> {
            let vals: Option<Vec<f32>> = match v {
                Value::Array(a) => a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect(),
                Value::Number(n) => n.as_f64().map(|x| vec![x as f32; 3]),
                _ => None,
            };
            match vals.as_deref() {
                Some([a, b, c]) => Ok([*a, *b, *c]),
                _ => Err(bad(key, v)),
            }
        };
        if let Some(v) = obj.get("image_mean").filter(|v| !v.is_null()) {
            p.image_mean = triple("image_mean", v)?;
        }
        if let Some(v) = obj.get("image_std").filter(|v| !v.is_null()) {
            p.image_std = triple("image_std", v)?;
            if p.image_std.contains(&0.0) {
                return Err(bad("image_std", v));
            }
        }
        Ok(p)
    }

    /// The config as transformers writes it, for tiny models.
    pub fn to_json(&self, image_processor_type: &str) -> Value {
        let size = match self.size {
            ResizeTo::ShortestEdge(n) => serde_json::json!({ "shortest_edge": n }),
            ResizeTo::Exact { height, width } => serde_json::json!({ "height": height, "width": width }),
        };
        serde_json::json!({
            "image_processor_type": image_processor_type,
            "do_convert_rgb": true,
            "do_resize": self.do_resize, "size": size, "resample": self.resample.pil_code(),
            "do_center_crop": self.do_center_crop,
            "crop_size": { "height": self.crop_size.0, "width": self.crop_size.1 },
            "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize, "image_mean": self.image_mean, "image_std": self.image_std
        })
    }

    /// The resized and cropped image, still in 8 bits: the levels [`Self::preprocess`] rescales.
    pub fn resize_and_crop(&self, img: &RgbImage) -> RgbImage {
        let resized = if self.do_resize {
            let (w, h) = self.resized_size(img.dimensions());
            pil_resize(img, w, h, self.resample)
        } else {
            img.clone()
        };
        if self.do_center_crop {
            center_crop(&resized, self.crop_size.0, self.crop_size.1)
        } else {
            resized
        }
    }

    /// `get_resize_output_image_size` with `default_to_square=False`: (width, height).
    fn resized_size(&self, (w, h): (u32, u32)) -> (u32, u32) {
        match self.size {
            ResizeTo::Exact { height, width } => (width, height),
            ResizeTo::ShortestEdge(side) => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (side as f64 * long as f64 / short as f64) as u32;
                if w <= h {
                    (side, new_long)
                } else {
                    (new_long, side)
                }
            }
        }
    }

    /// `pixel_values (3, h, w)` f32 on `device` for one RGB image.
    pub fn preprocess(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let img = self.resize_and_crop(img);
        let (w, h) = img.dimensions();
        let (w, h) = (w as usize, h as usize);
        let mut data = vec![0f32; 3 * h * w];
        let scale = if self.do_rescale { self.rescale_factor as f32 } else { 1.0 };
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                let v = px.0[c] as f32 * scale;
                data[c * h * w + i] = if self.do_normalize { (v - self.image_mean[c]) / self.image_std[c] } else { v };
            }
        }
        Ok(Tensor::from_vec(data, (3, h, w), device)?)
    }

    /// `pixel_values (n, 3, h, w)` for several images (they end up the same size when the
    /// processor crops).
    pub fn preprocess_batch(&self, images: &[&RgbImage], device: &Device) -> Result<Tensor> {
        let items = images.iter().map(|img| self.preprocess(img, device)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&items, 0)?)
    }
}

/// `center_crop` of transformers' numpy backend: the `height x width` window at
/// `((H - height) // 2, (W - width) // 2)`; an image smaller than the window is first padded
/// with black, centred (`ceil` of half the missing pixels before).
pub fn center_crop(img: &RgbImage, height: u32, width: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w >= width && h >= height {
        return image::imageops::crop_imm(img, (w - width) / 2, (h - height) / 2, width, height).to_image();
    }
    let (new_w, new_h) = (w.max(width), h.max(height));
    let (left_pad, top_pad) = ((new_w - w).div_ceil(2), (new_h - h).div_ceil(2));
    let mut padded = RgbImage::new(new_w, new_h);
    image::imageops::replace(&mut padded, img, left_pad as i64, top_pad as i64);
    // floor division of a possibly negative difference, then shifted by the padding
    let top = (h as i64 - height as i64).div_euclid(2) + top_pad as i64;
    let left = (w as i64 - width as i64).div_euclid(2) + left_pad as i64;
    image::imageops::crop_imm(&padded, left as u32, top as u32, width, height).to_image()
}

/// Pillow's `PRECISION_BITS` for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` along one axis: per output sample, the
/// first input index and the fixed-point weights.
fn coefficients(in_size: u32, out_size: u32, filter: Resample) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
            let mut k: Vec<f64> = (0..xmax).map(|x| filter.weight(((x + xmin) as f64 - center + 0.5) * ss)).collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|w| *w /= ww);
            }
            let one = (1u64 << PRECISION_BITS) as f64;
            let fixed = k.iter().map(|&w| if w < 0.0 { (-0.5 + w * one) as i32 } else { (0.5 + w * one) as i32 }).collect();
            (xmin as usize, fixed)
        })
        .collect()
}

/// `clip8`: the fixed-point sum back to a byte.
fn clip8(ss: i64) -> u8 {
    if ss >= (1i64 << PRECISION_BITS) << 8 {
        255
    } else if ss <= 0 {
        0
    } else {
        (ss >> PRECISION_BITS) as u8
    }
}

/// `Image.resize((width, height), filter)` of an RGB image, byte for byte as Pillow: a horizontal
/// pass (on the rows the vertical pass needs), then a vertical one, each rounded to 8 bits.
pub fn pil_resize(img: &RgbImage, width: u32, height: u32, filter: Resample) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if (in_w, in_h) == (width, height) {
        return img.clone();
    }
    let horiz = coefficients(in_w, width, filter);
    let vert = coefficients(in_h, height, filter);
    let rounding = 1i64 << (PRECISION_BITS - 1);
    // 1. horizontal pass, on the rows from the first to the last the vertical pass reads
    let (first_row, last_row) = if in_h == height {
        (0, in_h as usize)
    } else {
        let (ymin, k) = &vert[height as usize - 1];
        (vert[0].0, ymin + k.len())
    };
    let src = img.as_raw();
    let stride = in_w as usize * 3;
    let rows = last_row - first_row;
    let tmp: Vec<u8> = if in_w == width {
        src[first_row * stride..last_row * stride].to_vec()
    } else {
        let mut tmp = vec![0u8; rows * width as usize * 3];
        for y in 0..rows {
            let row = &src[(y + first_row) * stride..][..stride];
            for (xx, (xmin, k)) in horiz.iter().enumerate() {
                for c in 0..3 {
                    let ss = k.iter().enumerate().fold(rounding, |ss, (x, &w)| ss + row[(xmin + x) * 3 + c] as i64 * w as i64);
                    tmp[(y * width as usize + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        tmp
    };
    if in_h == height {
        return RgbImage::from_raw(width, height, tmp).expect("sizes match");
    }
    // 2. vertical pass
    let stride = width as usize * 3;
    let mut out = vec![0u8; height as usize * stride];
    for (yy, (ymin, k)) in vert.iter().enumerate() {
        let ymin = ymin - first_row;
        for i in 0..stride {
            let ss = k.iter().enumerate().fold(rounding, |ss, (y, &w)| ss + tmp[(ymin + y) * stride + i] as i64 * w as i64);
            out[yy * stride + i] = clip8(ss);
        }
    }
    RgbImage::from_raw(width, height, out).expect("sizes match")
}

/// An image file as transformers' `convert_to_rgb` reads it: transparency composited onto
/// white, grayscale repeated (where the project's [`crate::image_io::load_rgb`] drops alpha).
pub fn load_rgb_for_metrics(path: &Path) -> Result<RgbImage> {
    let img = crate::image_io::load_image(path)?;
    if !img.color().has_alpha() {
        return Ok(img.to_rgb8());
    }
    let rgba = img.to_rgba8();
    // PIL's `ImagingAlphaComposite` onto opaque white, in its fixed point (7 bits):
    // about (src * a + 255 * (255 - a)) / 255, rounded
    Ok(RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let coef1 = p[3] as u32 * 128;
        let coef2 = 255 * 128 - coef1;
        let mix = |c: u8| {
            let tmp = c as u32 * coef1 + 255 * coef2 + (0x80 << 7);
            ((((tmp >> 8) + tmp) >> 8) >> 7) as u8
        };
        image::Rgb([mix(p[0]), mix(p[1]), mix(p[2])])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_keeps_the_aspect_ratio_truncating() {
        let p = ImageProcessor::clip();
        assert_eq!(p.resized_size((1045, 1046)), (224, 224));
        assert_eq!(p.resized_size((640, 480)), (298, 224));
        assert_eq!(p.resized_size((480, 640)), (224, 298));
    }

    #[test]
    fn resize_of_a_flat_image_is_flat_and_identity_is_a_copy() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 17, 90]));
        for f in [Resample::Bicubic, Resample::Lanczos, Resample::Bilinear, Resample::Box, Resample::Hamming] {
            let out = pil_resize(&img, 11, 50, f);
            assert!(out.pixels().all(|p| p.0 == [200, 17, 90]), "{f:?}");
        }
        assert_eq!(pil_resize(&img, 37, 23, Resample::Bicubic), img);
    }

    #[test]
    fn center_crop_pads_small_images_with_black() {
        let img = RgbImage::from_pixel(3, 5, image::Rgb([9, 9, 9]));
        let out = center_crop(&img, 4, 6);
        assert_eq!(out.dimensions(), (6, 4));
        // width: 3 pixels padded to 6, ceil(3 / 2) = 2 before; height: 5 cropped to 4 from row 0
        let row: Vec<u8> = (0..6).map(|x| out.get_pixel(x, 0).0[0]).collect();
        assert_eq!(row, vec![0, 0, 9, 9, 9, 0]);
    }

    #[test]
    fn preprocessor_config_overrides_defaults() {
        let v = serde_json::json!({"size": {"shortest_edge": 256}, "crop_size": 200, "resample": 2,
            "image_mean": [0.5, 0.5, 0.5], "do_normalize": true});
        let p = ImageProcessor::from_json(&v, "x", ImageProcessor::clip()).unwrap();
        assert_eq!(p.size, ResizeTo::ShortestEdge(256));
        assert_eq!(p.crop_size, (200, 200));
        assert_eq!(p.resample, Resample::Bilinear);
        assert_eq!(p.image_std, CLIP_STD);
        assert!(ImageProcessor::from_json(&serde_json::json!({"resample": 0}), "x", ImageProcessor::clip()).is_err());
    }
}
