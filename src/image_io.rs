//! Images in and out: loading, resizing, tensor conversion as diffusers does it, atomic PNG writes.

use crate::error::{bad_input, io_err, Result};
use candle_core::{DType, Device, Tensor};
use image::{imageops::FilterType, GrayImage, ImageBuffer, Pixel, Rgb, RgbImage};
use std::path::Path;

/// Reads a photo as RGB, whatever its format or colour type.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    Ok(load_image(path)?.to_rgb8())
}

/// Reads any PNG, JPEG or WebP file, guessing the format from its contents; one-line errors.
pub fn load_image(path: &Path) -> Result<image::DynamicImage> {
    let reader = reader(path)?;
    let jpeg = reader.format() == Some(image::ImageFormat::Jpeg);
    let img = reader.decode().map_err(not_an_image(path))?;
    Ok(if jpeg { decode_jpeg_as_pillow(path).unwrap_or(img) } else { img })
}

/// A JPEG through libjpeg-turbo's decoder (mozjpeg's, the same code), as Pillow and so every
/// Python reference decodes it: the image crate's decoder differs by up to 4 levels on a few
/// percent of pixels, enough to move metrics and edits off the references. `None` where it fails
/// or for CMYK; the image crate's decode has already checked the file. mozjpeg reports errors by
/// unwinding without the panic hook, which `catch_unwind` turns back into a value.
fn decode_jpeg_as_pillow(path: &Path) -> Option<image::DynamicImage> {
    use mozjpeg::decompress::Format;
    std::panic::catch_unwind(|| -> Option<image::DynamicImage> {
        match mozjpeg::Decompress::new_path(path).ok()?.image().ok()? {
            Format::RGB(mut d) => {
                let (w, h) = (d.width() as u32, d.height() as u32);
                let pixels: Vec<u8> = d.read_scanlines().ok()?;
                d.finish().ok()?;
                RgbImage::from_raw(w, h, pixels).map(image::DynamicImage::ImageRgb8)
            }
            Format::Gray(mut d) => {
                let (w, h) = (d.width() as u32, d.height() as u32);
                let pixels: Vec<u8> = d.read_scanlines().ok()?;
                d.finish().ok()?;
                GrayImage::from_raw(w, h, pixels).map(image::DynamicImage::ImageLuma8)
            }
            Format::CMYK(_) => None,
        }
    })
    .ok()
    .flatten()
}

/// An image file's (width, height), read from its header alone.
pub fn dimensions(path: &Path) -> Result<(u32, u32)> {
    reader(path)?.into_dimensions().map_err(not_an_image(path))
}

fn reader(path: &Path) -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>> {
    image::ImageReader::open(path)
        .map_err(|e| bad_input(path.display(), format!("cannot open ({e})"), "check the path"))?
        .with_guessed_format()
        .map_err(|e| bad_input(path.display(), format!("cannot read ({e})"), "check the file"))
}

fn not_an_image(path: &Path) -> impl FnOnce(image::ImageError) -> crate::Error + '_ {
    move |e| bad_input(path.display(), format!("not a readable image ({e})"), "give a PNG, JPEG or WebP file")
}

/// Scales `img` to cover `width` x `height` and crops the centre, keeping the aspect ratio; returns
/// the crop it applied, to record and to replay on the image's mask ([`apply_crop`]). Colour images
/// are resized with Lanczos3, single-channel ones (masks) with a linear filter, which keeps soft
/// values without ringing.
pub fn resize_center_crop<P>(img: &ImageBuffer<P, Vec<P::Subpixel>>, width: u32, height: u32) -> (ImageBuffer<P, Vec<P::Subpixel>>, Crop)
where
    P: Pixel + 'static,
{
    let filter = if P::CHANNEL_COUNT == 1 { FilterType::Triangle } else { FilterType::Lanczos3 };
    resize_center_crop_recorded(img, width, height, filter)
}

/// How an image was fitted to the model's size: scaled by `scale` (to cover the target, aspect
/// ratio kept), then the `width` x `height` window at (`x`, `y`) of the scaled image kept. Recorded
/// in edit sessions; [`apply_crop`] replays it on another image of the same original size (a mask).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Crop {
    pub scale: f64,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Crop {
    /// The centred crop that fits an image of `source` size (w, h) to `width` x `height`.
    pub fn center(source: (u32, u32), width: u32, height: u32) -> Crop {
        if source == (width, height) {
            return Crop { scale: 1.0, x: 0, y: 0, width, height };
        }
        let scale = f64::max(width as f64 / source.0 as f64, height as f64 / source.1 as f64);
        let (w, h) = Self::scaled_size(source, scale, width, height);
        Crop { scale, x: (w - width) / 2, y: (h - height) / 2, width, height }
    }

    /// The size of the scaled image before cropping, for an image of `source` size.
    pub fn resized_size(&self, source: (u32, u32)) -> (u32, u32) {
        Self::scaled_size(source, self.scale, self.width, self.height)
    }

    fn scaled_size(source: (u32, u32), scale: f64, width: u32, height: u32) -> (u32, u32) {
        let w = (source.0 as f64 * scale).round() as u32;
        let h = (source.1 as f64 * scale).round() as u32;
        (w.max(width), h.max(height))
    }
}

/// [`resize_center_crop`] with a chosen filter.
pub fn resize_center_crop_recorded<P>(
    img: &ImageBuffer<P, Vec<P::Subpixel>>,
    width: u32,
    height: u32,
    filter: FilterType,
) -> (ImageBuffer<P, Vec<P::Subpixel>>, Crop)
where
    P: Pixel + 'static,
{
    let crop = Crop::center(img.dimensions(), width, height);
    (apply_crop(img, &crop, filter), crop)
}

/// Scales `img` by `crop.scale` and keeps the crop's window: the same geometry as the image the
/// crop was recorded on, when `img` has that image's size (its mask, say).
pub fn apply_crop<P>(img: &ImageBuffer<P, Vec<P::Subpixel>>, crop: &Crop, filter: FilterType) -> ImageBuffer<P, Vec<P::Subpixel>>
where
    P: Pixel + 'static,
{
    let (w, h) = crop.resized_size(img.dimensions());
    if (w, h) == img.dimensions() && (crop.x, crop.y, crop.width, crop.height) == (0, 0, w, h) {
        return img.clone();
    }
    let resized = if (w, h) == img.dimensions() { img.clone() } else { image::imageops::resize(img, w, h, filter) };
    let width = crop.width.min(w.saturating_sub(crop.x));
    let height = crop.height.min(h.saturating_sub(crop.y));
    image::imageops::crop_imm(&resized, crop.x, crop.y, width, height).to_image()
}

/// The size the model works at for a photo of `original` size: a `size` x `size` square (as the
/// paper's 512 x 512), `size` rounded down to a multiple of `factor` (at least `factor`). The photo
/// is scaled to cover the square and centre-cropped ([`Crop::center`]).
pub fn fit_size(_original: (u32, u32), size: u32, factor: u32) -> (u32, u32) {
    let factor = factor.max(1);
    let side = (size / factor * factor).max(factor);
    (side, side)
}

/// A mask (or any gray image) as RGB, for showing it.
pub fn gray_to_rgb(mask: &GrayImage) -> RgbImage {
    RgbImage::from_fn(mask.width(), mask.height(), |x, y| {
        let v = mask.get_pixel(x, y).0[0];
        Rgb([v, v, v])
    })
}

/// Space between cells of a [`contact_sheet`], and around it, in pixels.
pub const SHEET_GAP: u32 = 4;
/// The most cells in one row of a [`contact_sheet`].
pub const SHEET_COLUMNS: usize = 6;

/// The glyph scale of labels under cells of side `cell`: 2 from 256 pixels up, else 1.
pub fn label_scale(cell: u32) -> u32 {
    if cell >= 256 { 2 } else { 1 }
}

/// The height of the label strip under each cell: one line of 8 x 8 glyphs at [`label_scale`],
/// with [`SHEET_GAP`] above and below.
pub fn label_height(cell: u32) -> u32 {
    8 * label_scale(cell) + 2 * SHEET_GAP
}

/// Images side by side, each scaled to fit a `cell` x `cell` box (aspect kept, centred) with its
/// label under it in black on white (8 x 8 font, cut to the cell's width), at most
/// [`SHEET_COLUMNS`] to a row. The sheet is `cols * (cell + SHEET_GAP) + SHEET_GAP` wide and
/// `rows * (cell + label_height(cell) + SHEET_GAP) + SHEET_GAP` high.
pub fn contact_sheet(items: &[(String, RgbImage)], cell: u32) -> RgbImage {
    let cell = cell.max(1);
    let cols = items.len().clamp(1, SHEET_COLUMNS) as u32;
    let rows = items.len().div_ceil(SHEET_COLUMNS).max(1) as u32;
    let row_height = cell + label_height(cell) + SHEET_GAP;
    let mut sheet = RgbImage::from_pixel(cols * (cell + SHEET_GAP) + SHEET_GAP, rows * row_height + SHEET_GAP, Rgb([255; 3]));
    for (i, (label, img)) in items.iter().enumerate() {
        let (col, row) = ((i % SHEET_COLUMNS) as u32, (i / SHEET_COLUMNS) as u32);
        let (x0, y0) = (SHEET_GAP + col * (cell + SHEET_GAP), SHEET_GAP + row * row_height);
        let fitted = fit_into(img, cell);
        let (dx, dy) = ((cell - fitted.width()) / 2, (cell - fitted.height()) / 2);
        image::imageops::replace(&mut sheet, &fitted, (x0 + dx) as i64, (y0 + dy) as i64);
        draw_label(&mut sheet, label, x0, y0 + cell + SHEET_GAP, cell);
    }
    sheet
}

/// `img` scaled to fit a `cell` x `cell` box: Lanczos down, nearest neighbour up (small latents
/// and masks stay crisp).
fn fit_into(img: &RgbImage, cell: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return RgbImage::new(0, 0);
    }
    let scale = f64::min(cell as f64 / w as f64, cell as f64 / h as f64);
    let (nw, nh) = (((w as f64 * scale).round() as u32).clamp(1, cell), ((h as f64 * scale).round() as u32).clamp(1, cell));
    if (nw, nh) == (w, h) {
        return img.clone();
    }
    let filter = if scale < 1.0 { FilterType::Lanczos3 } else { FilterType::Nearest };
    image::imageops::resize(img, nw, nh, filter)
}

/// Draws `text` in black from (`x`, `y`), cut to `max_width` pixels; non-ASCII shows as `?`.
fn draw_label(img: &mut RgbImage, text: &str, x: u32, y: u32, max_width: u32) {
    let s = label_scale(max_width);
    let max_chars = (max_width / (8 * s)) as usize;
    for (i, ch) in text.chars().take(max_chars).enumerate() {
        let code = if ch.is_ascii() { ch as usize } else { '?' as usize };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        for (gy, bits) in glyph.iter().enumerate() {
            for gx in 0..8u32 {
                if bits >> gx & 1 == 0 {
                    continue;
                }
                for sy in 0..s {
                    for sx in 0..s {
                        let (px, py) = (x + i as u32 * 8 * s + gx * s + sx, y + gy as u32 * s + sy);
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, Rgb([0; 3]));
                        }
                    }
                }
            }
        }
    }
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

/// Encodes a PNG (RGB, or gray for masks) and writes it atomically.
pub fn save_png_atomic<P>(img: &ImageBuffer<P, Vec<P::Subpixel>>, path: &Path) -> Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
{
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
        let (out, crop) = resize_center_crop(&img, 10, 10);
        assert_eq!((crop.x, crop.y, crop.scale), (5, 0, 0.5));
        assert_eq!(out.dimensions(), (10, 10));
        assert!(out.pixels().all(|p| p.0[0] > 200), "crop was not centred");
    }

    #[test]
    fn contact_sheet_places_images_and_labels() {
        let red = RgbImage::from_pixel(64, 32, Rgb([255, 0, 0]));
        let mask = gray_to_rgb(&GrayImage::from_pixel(8, 8, image::Luma([0])));
        assert_eq!(mask.get_pixel(3, 3).0, [0, 0, 0]);
        let cell = 32;
        let items: Vec<(String, RgbImage)> =
            (0..7).map(|i| (format!("img {i}"), if i == 1 { mask.clone() } else { red.clone() })).collect();
        let sheet = contact_sheet(&items, cell);
        let (cols, rows) = (6, 2);
        let lh = label_height(cell);
        assert_eq!(lh, 8 + 2 * SHEET_GAP);
        assert_eq!(sheet.dimensions(), (cols * (cell + SHEET_GAP) + SHEET_GAP, rows * (cell + lh + SHEET_GAP) + SHEET_GAP));

        let origin = |i: u32| (SHEET_GAP + (i % 6) * (cell + SHEET_GAP), SHEET_GAP + (i / 6) * (cell + lh + SHEET_GAP));
        // item 0: 64x32 scaled to 32x16, centred vertically in its cell (rows 8..24), white around
        let (x0, y0) = origin(0);
        assert_eq!(sheet.get_pixel(x0 + 16, y0 + 16).0, [255, 0, 0]);
        assert_eq!(sheet.get_pixel(x0, y0 + 8).0, [255, 0, 0]);
        assert_eq!(sheet.get_pixel(x0 + 16, y0 + 2).0, [255, 255, 255]);
        // item 1: an 8x8 black mask scaled up to fill the cell
        let (x1, y1) = origin(1);
        assert!([(0, 0), (31, 31), (16, 5)].iter().all(|&(dx, dy)| sheet.get_pixel(x1 + dx, y1 + dy).0 == [0, 0, 0]));
        // item 6 wraps to the second row
        let (x6, y6) = origin(6);
        assert_eq!(sheet.get_pixel(x6 + 16, y6 + 16).0, [255, 0, 0]);
        assert_eq!(sheet.get_pixel(origin(7).0 + 16, y6 + 16).0, [255, 255, 255], "no 8th image");

        // labels: black pixels in every used label strip, none in the gaps between strips
        let strip_dark = |i: u32| {
            let (x, y) = origin(i);
            (x..x + cell).flat_map(|px| (y + cell..y + cell + lh).map(move |py| (px, py))).filter(|&(px, py)| sheet.get_pixel(px, py).0 == [0, 0, 0]).count()
        };
        for i in 0..7 {
            assert!(strip_dark(i) > 10, "label {i} not drawn");
        }
        assert_eq!(strip_dark(7), 0);
        assert_eq!(label_scale(512), 2);
        assert_eq!(contact_sheet(&[("a".into(), red)], 512).dimensions(), (512 + 2 * SHEET_GAP, 512 + label_height(512) + 2 * SHEET_GAP));
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
