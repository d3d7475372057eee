//! Images in and out: loading, resizing, tensor conversion as diffusers does it, atomic PNG writes.

use crate::error::{bad_input, io_err, Result};
use candle_core::{DType, Device, Tensor};
use image::{imageops::FilterType, RgbImage};
use std::path::Path;

/// Reads a photo as RGB, whatever its format or colour type.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| bad_input(path.display(), format!("cannot open ({e})"), "check the path"))?
        .with_guessed_format()
        .map_err(|e| bad_input(path.display(), format!("cannot read ({e})"), "check the file"))?;
    let img = reader.decode().map_err(|e| {
        bad_input(path.display(), format!("not a readable image ({e})"), "give a PNG, JPEG or WebP file")
    })?;
    Ok(img.to_rgb8())
}

/// Scales `img` to cover `width` x `height` and crops the centre, keeping the aspect ratio.
pub fn resize_center_crop(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    let scale = f64::max(width as f64 / img.width() as f64, height as f64 / img.height() as f64);
    let (w, h) = ((img.width() as f64 * scale).round() as u32, (img.height() as f64 * scale).round() as u32);
    let resized = image::imageops::resize(img, w.max(width), h.max(height), FilterType::Lanczos3);
    let (x, y) = ((resized.width() - width) / 2, (resized.height() - height) / 2);
    image::imageops::crop_imm(&resized, x, y, width, height).to_image()
}

/// RGB image to a `[1, 3, H, W]` tensor in [-1, 1], as diffusers' `VaeImageProcessor.preprocess`.
pub fn image_to_tensor(img: &RgbImage, device: &Device, dtype: DType) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 255.0 * 2.0 - 1.0).collect();
    let t = Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?;
    Ok(t.to_dtype(dtype)?.to_device(device)?)
}

/// `[B, 3, H, W]` in [-1, 1] to RGB images, as diffusers' postprocess: `round(clamp(x/2+0.5) * 255)`.
pub fn tensor_to_images(t: &Tensor) -> Result<Vec<RgbImage>> {
    let t = ((t.to_device(&Device::Cpu)?.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let (b, _, h, w) = t.dims4()?;
    let mut images = Vec::with_capacity(b);
    for i in 0..b {
        let pixels = t.get(i)?.permute((1, 2, 0))?.flatten_all()?.to_vec1::<f32>()?;
        let bytes = pixels.iter().map(|v| (v * 255.0).round() as u8).collect();
        let img = RgbImage::from_raw(w as u32, h as u32, bytes).ok_or_else(|| {
            candle_core::Error::Msg("image buffer size mismatch".into())
        })?;
        images.push(img);
    }
    Ok(images)
}

/// Encodes a PNG and writes it atomically.
pub fn save_png_atomic(img: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| bad_input(path.display(), format!("cannot encode PNG ({e})"), "report this bug"))?;
    write_atomic(path, bytes.get_ref())
}

/// Writes `bytes` to a temporary file beside `path`, then renames it: a reader never sees half a
/// file and a killed run leaves the old file intact.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(".layerdiff-");
    // A temporary file is private (0600); the result should read like any other output file.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut tmp = builder.tempfile_in(dir).map_err(io_err(dir))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| io_err(path)(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_round_trip_is_exact() -> Result<()> {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([(x * 50) as u8, (y * 100) as u8, 255]));
        let back = tensor_to_images(&image_to_tensor(&img, &Device::Cpu, DType::F32)?)?;
        assert_eq!(back[0], img);
        Ok(())
    }

    #[test]
    fn center_crop_keeps_the_middle() {
        // A 40x20 image whose middle 20x20 is white: cropping to 10x10 keeps only white.
        let img = RgbImage::from_fn(40, 20, |x, _| if (10..30).contains(&x) { image::Rgb([255; 3]) } else { image::Rgb([0; 3]) });
        let out = resize_center_crop(&img, 10, 10);
        assert_eq!(out.dimensions(), (10, 10));
        assert!(out.pixels().all(|p| p.0[0] > 200), "crop was not centred");
    }

    #[test]
    fn atomic_save_leaves_no_temp_files() -> Result<()> {
        let dir = tempfile::tempdir().map_err(io_err(Path::new("tmp")))?;
        let path = dir.path().join("out.png");
        save_png_atomic(&RgbImage::new(4, 4), &path)?;
        assert_eq!(load_rgb(&path)?.dimensions(), (4, 4));
        assert_eq!(std::fs::read_dir(dir.path()).map_err(io_err(dir.path()))?.count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).map_err(io_err(&path))?.permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
        Ok(())
    }

    #[test]
    fn unreadable_image_is_a_one_line_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.png");
        std::fs::write(&path, b"not an image").expect("write");
        let msg = load_rgb(&path).unwrap_err().to_string();
        assert!(msg.contains("bad.png") && !msg.contains('\n'), "{msg}");
    }
}
