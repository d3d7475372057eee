//! From SAM's thresholded mask to a clean subject mask: keep the connected region the user
//! pointed at, fill its holes, grow it by a margin. SAM's raw masks often carry specks elsewhere
//! in the photo and pinholes in textured fur; the method wants one solid subject.

use super::Prompt;
use image::{GrayImage, Luma};
use imageproc::distance_transform::Norm;
use imageproc::region_labelling::{connected_components, Connectivity};

/// How [`clean_mask`] treats a binary mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanOptions {
    /// Fill regions of background that the mask encloses (not those under a negative point).
    pub fill_holes: bool,
    /// Grow the mask by this many pixels (a round structuring element), at most 255.
    pub dilate: u8,
}

impl Default for CleanOptions {
    fn default() -> Self {
        Self { fill_holes: true, dilate: 0 }
    }
}

/// Keeps the connected regions (8-connected) under the prompt's foreground points; with none of
/// them on the mask, the largest region (inside the box, when there is one). Then fills holes and
/// dilates as `opts` says. `mask` is 0 or 255; so is the result.
pub fn clean_mask(mask: &GrayImage, prompt: &Prompt, opts: &CleanOptions) -> GrayImage {
    let mut mask = keep_pointed_regions(mask, prompt);
    if opts.fill_holes {
        mask = fill_holes(&mask, prompt);
    }
    if opts.dilate > 0 {
        mask = imageproc::morphology::dilate(&mask, Norm::L2, opts.dilate);
    }
    mask
}

fn keep_pointed_regions(mask: &GrayImage, prompt: &Prompt) -> GrayImage {
    let labels = connected_components(mask, Connectivity::Eight, Luma([0u8]));
    let label_at = |x: f32, y: f32| {
        let (px, py) = (x.floor() as u32, y.floor() as u32);
        (px < labels.width() && py < labels.height()).then(|| labels.get_pixel(px, py).0[0]).filter(|&l| l != 0)
    };
    let mut keep: Vec<u32> = prompt.points.iter().filter(|p| p.foreground).filter_map(|p| label_at(p.x, p.y)).collect();
    if keep.is_empty() {
        keep.extend(largest_region(&labels, prompt.bbox));
    }
    GrayImage::from_fn(mask.width(), mask.height(), |x, y| {
        let l = labels.get_pixel(x, y).0[0];
        Luma([if l != 0 && keep.contains(&l) { 255 } else { 0 }])
    })
}

/// The label with the most pixels, counting only those inside `bbox` when given.
fn largest_region(labels: &image::ImageBuffer<Luma<u32>, Vec<u32>>, bbox: Option<[f32; 4]>) -> Option<u32> {
    let mut counts = std::collections::HashMap::<u32, usize>::new();
    for (x, y, l) in labels.enumerate_pixels() {
        let inside = bbox.is_none_or(|[x0, y0, x1, y1]| (x as f32) >= x0 && (x as f32) < x1 && (y as f32) >= y0 && (y as f32) < y1);
        if l.0[0] != 0 && inside {
            *counts.entry(l.0[0]).or_default() += 1;
        }
    }
    counts.into_iter().max_by_key(|&(label, n)| (n, std::cmp::Reverse(label))).map(|(label, _)| label)
}

/// Fills the background regions (4-connected) that do not touch the image border, except those
/// holding a negative point: the user said that hole is background.
fn fill_holes(mask: &GrayImage, prompt: &Prompt) -> GrayImage {
    let (w, h) = mask.dimensions();
    let background = GrayImage::from_fn(w, h, |x, y| Luma([if mask.get_pixel(x, y).0[0] == 0 { 255 } else { 0 }]));
    let labels = connected_components(&background, Connectivity::Four, Luma([0u8]));
    let mut open: Vec<u32> = Vec::new();
    for (x, y, l) in labels.enumerate_pixels() {
        if l.0[0] != 0 && (x == 0 || y == 0 || x == w - 1 || y == h - 1) {
            open.push(l.0[0]);
        }
    }
    for p in prompt.points.iter().filter(|p| !p.foreground) {
        let (px, py) = (p.x.floor() as u32, p.y.floor() as u32);
        if px < w && py < h {
            open.push(labels.get_pixel(px, py).0[0]);
        }
    }
    open.sort_unstable();
    open.dedup();
    GrayImage::from_fn(w, h, |x, y| {
        let l = labels.get_pixel(x, y).0[0];
        Luma([if l == 0 || open.binary_search(&l).is_err() { 255 } else { 0 }])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::Point;

    fn disc(w: u32, h: u32, cx: f32, cy: f32, r: f32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| {
            let d = ((x as f32 + 0.5 - cx).powi(2) + (y as f32 + 0.5 - cy).powi(2)).sqrt();
            Luma([if d <= r { 255 } else { 0 }])
        })
    }

    fn click(x: f32, y: f32) -> Prompt {
        Prompt { points: vec![Point { x, y, foreground: true }], bbox: None }
    }

    fn union(a: &GrayImage, b: &GrayImage) -> GrayImage {
        GrayImage::from_fn(a.width(), a.height(), |x, y| Luma([a.get_pixel(x, y).0[0].max(b.get_pixel(x, y).0[0])]))
    }

    #[test]
    fn a_disc_with_specks_and_holes_comes_back_as_the_disc() {
        let target = disc(64, 48, 30.0, 24.0, 12.0);
        let mut noisy = union(&target, &disc(64, 48, 58.0, 5.0, 3.0));
        for (x, y) in [(28, 22), (33, 27), (26, 25)] {
            noisy.put_pixel(x, y, Luma([0]));
        }
        noisy.put_pixel(2, 45, Luma([255]));
        let out = clean_mask(&noisy, &click(30.0, 24.0), &CleanOptions::default());
        assert_eq!(out, target);
    }

    #[test]
    fn two_clicks_keep_two_regions_and_no_click_on_the_mask_keeps_the_largest() {
        let big = disc(64, 64, 20.0, 20.0, 10.0);
        let small = disc(64, 64, 50.0, 50.0, 5.0);
        let both = union(&big, &small);
        let mut two = click(20.0, 20.0);
        two.points.push(Point { x: 50.0, y: 50.0, foreground: true });
        assert_eq!(clean_mask(&both, &two, &CleanOptions::default()), both);
        assert_eq!(clean_mask(&both, &click(50.0, 50.0), &CleanOptions::default()), small);
        assert_eq!(clean_mask(&both, &click(1.0, 62.0), &CleanOptions::default()), big);
        let boxed = Prompt { points: vec![], bbox: Some([40.0, 40.0, 63.0, 63.0]) };
        assert_eq!(clean_mask(&both, &boxed, &CleanOptions::default()), small);
    }

    #[test]
    fn a_hole_under_a_negative_point_stays_open() {
        let ring = GrayImage::from_fn(40, 40, |x, y| {
            let d = ((x as f32 - 20.0).powi(2) + (y as f32 - 20.0).powi(2)).sqrt();
            Luma([if (6.0..=14.0).contains(&d) { 255 } else { 0 }])
        });
        let mut prompt = click(20.0, 10.0);
        assert_eq!(clean_mask(&ring, &prompt, &CleanOptions::default()).get_pixel(20, 20).0[0], 255);
        prompt.points.push(Point { x: 20.0, y: 20.0, foreground: false });
        assert_eq!(clean_mask(&ring, &prompt, &CleanOptions::default()), ring);
    }

    #[test]
    fn dilation_grows_a_disc_by_the_margin() {
        let out = clean_mask(&disc(64, 64, 32.0, 32.0, 8.0), &click(32.0, 32.0), &CleanOptions { fill_holes: true, dilate: 4 });
        let radius_along = |dx: i32, dy: i32| (0..32).take_while(|&i| out.get_pixel((32 + dx * i) as u32, (32 + dy * i) as u32).0[0] == 255).count();
        for (dx, dy) in [(1, 0), (-1, 0), (0, 1), (0, -1)] {
            let r = radius_along(dx, dy);
            assert!((11..=13).contains(&r), "radius {r} along ({dx}, {dy})");
        }
    }
}
