//! `mask-overlay.png`: the mask tinted over the photo with its outline, the clicked points and
//! the box drawn on top, so that a person sees at a glance what was selected.

use super::Prompt;
use image::{GrayImage, Rgb, RgbImage};
use imageproc::distance_transform::Norm;
use imageproc::drawing::{draw_filled_circle_mut, draw_hollow_rect_mut};
use imageproc::rect::Rect;

const TINT: [u8; 3] = [30, 144, 255];
const FOREGROUND: Rgb<u8> = Rgb([0, 220, 60]);
const BACKGROUND: Rgb<u8> = Rgb([235, 30, 30]);
const BOX: Rgb<u8> = Rgb([255, 210, 0]);
const RIM: Rgb<u8> = Rgb([255, 255, 255]);

/// The photo with the mask (white = selected) tinted at half strength and outlined, foreground
/// points as green dots, background points as red dots, and the box in yellow. Marks scale with
/// the image so they stay visible on large photos.
pub fn draw_overlay(photo: &RgbImage, mask: &GrayImage, prompt: &Prompt) -> RgbImage {
    let (w, h) = photo.dimensions();
    let unit = (w.min(h) / 150).max(1);
    let grown = imageproc::morphology::dilate(mask, Norm::LInf, unit.min(255) as u8);
    let mut out = RgbImage::from_fn(w, h, |x, y| {
        let p = photo.get_pixel(x, y).0;
        let (inside, rim) = (mask.get_pixel(x, y).0[0] >= 128, grown.get_pixel(x, y).0[0] >= 128);
        match (inside, rim) {
            (true, _) => Rgb(std::array::from_fn(|c| ((p[c] as u16 + TINT[c] as u16) / 2) as u8)),
            (false, true) => Rgb(TINT),
            (false, false) => Rgb(p.map(|v| (v as f32 * 0.6) as u8)),
        }
    });
    if let Some([x0, y0, x1, y1]) = prompt.bbox {
        for i in 0..2 * unit as i32 {
            let (left, top) = (x0 as i32 - i, y0 as i32 - i);
            let (width, height) = ((x1 - x0) as i32 + 2 * i, (y1 - y0) as i32 + 2 * i);
            if width > 0 && height > 0 {
                draw_hollow_rect_mut(&mut out, Rect::at(left, top).of_size(width as u32, height as u32), BOX);
            }
        }
    }
    let radius = 3 * unit as i32;
    for p in &prompt.points {
        let centre = (p.x as i32, p.y as i32);
        draw_filled_circle_mut(&mut out, centre, radius + unit as i32, RIM);
        draw_filled_circle_mut(&mut out, centre, radius, if p.foreground { FOREGROUND } else { BACKGROUND });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::Point;

    #[test]
    fn the_mask_is_tinted_and_the_rest_darkened_with_the_marks_on_top() {
        let photo = RgbImage::from_pixel(300, 300, Rgb([100, 100, 100]));
        let mask = GrayImage::from_fn(300, 300, |x, _| image::Luma([if x < 150 { 255 } else { 0 }]));
        let prompt = Prompt { points: vec![Point { x: 50.0, y: 50.0, foreground: true }, Point { x: 250.0, y: 250.0, foreground: false }], bbox: Some([20.0, 20.0, 120.0, 280.0]) };
        let out = draw_overlay(&photo, &mask, &prompt);
        assert_eq!(out.get_pixel(100, 150).0, [65, 122, 177]);
        assert_eq!(out.get_pixel(200, 150).0, [60, 60, 60]);
        assert_eq!(out.get_pixel(151, 150).0, TINT);
        assert_eq!(*out.get_pixel(50, 50), FOREGROUND);
        assert_eq!(*out.get_pixel(250, 250), BACKGROUND);
        assert_eq!(*out.get_pixel(20, 150), BOX);
    }
}
