//! Reads a scene's attributes back from any image, a render or a model's output, so edits in the
//! toy world are scored exactly rather than by a learned metric. Subject pixels are the saturated
//! ones near a subject colour; the subject is their largest blob, holes filled (the dot is a hole);
//! the background is read from row and column statistics of what lies well outside the subjects.

use super::world::{Background, Colour, Dot, Position, Scene, Shape, Size};
use image::RgbImage;
use std::fmt;

/// What [`read_scene`] saw. `None` where an attribute cannot be read (no subject, no dot).
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub background: Option<Background>,
    pub colour: Option<Colour>,
    pub shape: Option<Shape>,
    pub size: Option<Size>,
    pub position: Option<Position>,
    pub dot: Option<Dot>,
    /// Subject-coloured blobs of at least a quarter of the smallest subject's area.
    pub subjects: usize,
}

/// A pixel belongs to a subject when it is within this distance (RGB, Euclidean) of a subject
/// colour...
const COLOUR_DISTANCE: f32 = 90.0;
/// ...and at least this saturated (max - min channel): greys, sky and ground never are.
const MIN_CHROMA: i32 = 80;
/// A pixel near the subject's centre this far (RGB) from the subject's mean colour is its dot: noise
/// of sigma 8 moves a pixel about 14, a dot blurred into its surround still 100 or more.
const DOT_DISTANCE: f32 = 60.0;
/// Below this total per-channel variance the background is plain: noise of sigma 8 gives about
/// 200, the weakest pattern about 4000.
const PLAIN_VARIANCE: f64 = 1000.0;

/// Reads every attribute of `img` (square, any size).
pub fn read_scene(img: &RgbImage) -> Reading {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let side = w.min(h) as f32;
    let classes: Vec<Option<Colour>> = img.pixels().map(|p| subject_colour(p.0)).collect();
    let blobs = components(&classes, w, h);
    // A quarter of the smallest subject: a small triangle, 2 * (0.16 * side)^2.
    let min_area = (0.25 * 2.0 * (0.16 * side).powi(2)).max(1.0) as usize;
    let big: Vec<&Vec<usize>> = blobs.iter().filter(|b| b.len() >= min_area).collect();

    let mut excluded: Vec<bool> = classes.iter().map(Option::is_some).collect();
    for blob in &big {
        for (i, inside) in fill_holes(blob, w, h).into_iter().enumerate() {
            excluded[i] |= inside;
        }
    }
    let background = Some(read_background(img, &dilate(&excluded, w, h, ((side / 16.0).round() as usize).max(2))));

    let mut reading = Reading { background, colour: None, shape: None, size: None, position: None, dot: None, subjects: big.len() };
    if let Some(blob) = big.iter().max_by_key(|b| b.len()) {
        let far = dilate(&excluded, w, h, 1).into_iter().map(|e| !e).collect::<Vec<_>>();
        read_subject(img, &classes, blob, &far, &mut reading);
    }
    reading
}

/// Fills the subject attributes of `reading` from the largest blob; `far` marks background pixels
/// well away from any subject.
fn read_subject(img: &RgbImage, classes: &[Option<Colour>], blob: &[usize], far: &[bool], reading: &mut Reading) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let side = w.min(h) as f32;
    let mut votes = [0usize; 4];
    for &i in blob {
        if let Some(c) = classes[i] {
            votes[c as usize] += 1;
        }
    }
    let best = (0..4).max_by_key(|&k| votes[k]).unwrap_or(0);
    let colour = Colour::ALL[best];
    reading.colour = Some(colour);

    let pixel = |i: usize| img.get_pixel((i % w) as u32, (i / w) as u32).0.map(f32::from);
    let mut in_blob = vec![false; w * h];
    for &i in blob {
        in_blob[i] = true;
    }
    let interior: Vec<[f32; 3]> =
        blob.iter().filter(|&&i| classes[i] == Some(colour) && neighbours(i, w, h).all(|j| in_blob[j])).map(|&i| pixel(i)).collect();
    let own = if interior.is_empty() { colour.rgb().0.map(f32::from) } else { mean3(&interior) };
    let kept: Vec<usize> = blob.iter().copied().filter(|&i| mostly_subject(pixel(i), own, i, far, w, h, &pixel)).collect();

    let filled = fill_holes(&kept, w, h);
    let (mut area, mut sx, mut sy) = (0usize, 0usize, 0usize);
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    let mut widths = vec![0usize; h];
    for (i, _) in filled.iter().enumerate().filter(|(_, f)| **f) {
        let (x, y) = (i % w, i / w);
        area += 1;
        sx += x;
        sy += y;
        widths[y] += 1;
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
    }
    if area == 0 {
        return;
    }
    let (cx, cy) = (sx as f32 / area as f32 + 0.5, sy as f32 / area as f32 + 0.5);
    // Row widths tell the shapes apart whatever a blurred edge adds or takes: a triangle is much
    // wider at the bottom than at the top, a circle much narrower at top and bottom than in the
    // middle, a square the same all the way.
    let rows = &widths[y0..=y1];
    let band = |from: f32, to: f32| {
        let n = rows.len() as f32;
        let picked: Vec<f32> = rows.iter().enumerate().filter(|(k, _)| (from..to).contains(&((*k as f32 + 0.5) / n))).map(|(_, w)| *w as f32).collect();
        picked.iter().sum::<f32>() / picked.len().max(1) as f32
    };
    let widest = *rows.iter().max().unwrap_or(&1) as f32;
    let shape = if band(2.0 / 3.0, 1.0) > 1.6 * band(0.0, 1.0 / 3.0) {
        Shape::Triangle
    } else if (band(0.0, 0.25) + band(0.75, 1.0)) / 2.0 < 0.82 * widest {
        Shape::Circle
    } else {
        Shape::Square
    };
    reading.shape = Some(shape);
    // Each shape's area is k r^2; the radii are 0.16 and 0.25 of the side, 0.2 their geometric mean.
    let k = match shape {
        Shape::Circle => std::f32::consts::PI,
        Shape::Square => 4.0,
        Shape::Triangle => 2.0,
    };
    let r = (area as f32 / k).sqrt();
    reading.size = Some(if r < 0.2 * side { Size::Small } else { Size::Large });
    reading.position = Some(match cx / w as f32 {
        f if f < 1.0 / 3.0 => Position::Left,
        f if f < 2.0 / 3.0 => Position::Centre,
        _ => Position::Right,
    });

    // The dot: the pixel near the centroid farthest from the subject's own colour, if far enough,
    // darker or brighter than the subject. Not only holes: a blurred dot near an edge may open
    // its hole to the outside.
    let reach = (0.5 * r).max(1.5);
    let dot = (0..w * h)
        .filter(|&i| !far[i] && ((i % w) as f32 + 0.5 - cx).hypot((i / w) as f32 + 0.5 - cy) <= reach)
        .map(|i| (distance(pixel(i), own), pixel(i)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((_, p)) = dot.filter(|(d, _)| *d > DOT_DISTANCE) {
        reading.dot = Some(if luma(p) < luma(own) { Dot::Black } else { Dot::White });
    }
}

fn distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    (0..3).map(|k| (a[k] - b[k]).powi(2)).sum::<f32>().sqrt()
}

/// Whether blob pixel `i`, of colour `p`, is at least half subject: its colour projected on the
/// line from the nearest far background colour (at most 2 pixels off) to the subject's own colour
/// `own`. Pixels with no far background that near are interior, and kept.
fn mostly_subject(p: [f32; 3], own: [f32; 3], i: usize, far: &[bool], w: usize, h: usize, pixel: &impl Fn(usize) -> [f32; 3]) -> bool {
    let (x, y) = ((i % w) as i64, (i / w) as i64);
    for d in 1..=2i64 {
        let ring: Vec<[f32; 3]> = (-d..=d)
            .flat_map(|dy| (-d..=d).map(move |dx| (x + dx, y + dy)))
            .filter(|&(xx, yy)| (xx - x).abs().max((yy - y).abs()) == d && (0..w as i64).contains(&xx) && (0..h as i64).contains(&yy))
            .map(|(xx, yy)| yy as usize * w + xx as usize)
            .filter(|&j| far[j])
            .map(pixel)
            .collect();
        if !ring.is_empty() {
            let b = mean3(&ring);
            let along: f32 = (0..3).map(|k| (p[k] - b[k]) * (own[k] - b[k])).sum();
            let length: f32 = (0..3).map(|k| (own[k] - b[k]).powi(2)).sum();
            return along >= 0.5 * length;
        }
    }
    true
}

fn mean3(pixels: &[[f32; 3]]) -> [f32; 3] {
    let n = pixels.len().max(1) as f32;
    [0, 1, 2].map(|k| pixels.iter().map(|p| p[k]).sum::<f32>() / n)
}

fn luma(p: [f32; 3]) -> f32 {
    0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]
}

/// The subject colour `p` is, if any.
fn subject_colour(p: [u8; 3]) -> Option<Colour> {
    let chroma = *p.iter().max()? as i32 - *p.iter().min()? as i32;
    if chroma < MIN_CHROMA {
        return None;
    }
    let from = |c: Colour| distance(p.map(f32::from), c.rgb().0.map(f32::from));
    let best = Colour::ALL.iter().copied().min_by(|a, b| from(*a).total_cmp(&from(*b)))?;
    (from(best) <= COLOUR_DISTANCE).then_some(best)
}

/// 8-connected blobs of subject-coloured pixels (any subject colour), as pixel indices: a thin
/// blurred triangle stays one blob.
fn components(classes: &[Option<Colour>], w: usize, h: usize) -> Vec<Vec<usize>> {
    let mut seen = vec![false; w * h];
    let mut blobs = Vec::new();
    for start in 0..w * h {
        if seen[start] || classes[start].is_none() {
            continue;
        }
        seen[start] = true;
        let mut blob = vec![start];
        let mut next = 0;
        while next < blob.len() {
            let i = blob[next];
            next += 1;
            for j in neighbours8(i, w, h) {
                if !seen[j] && classes[j].is_some() {
                    seen[j] = true;
                    blob.push(j);
                }
            }
        }
        blobs.push(blob);
    }
    blobs
}

fn neighbours(i: usize, w: usize, h: usize) -> impl Iterator<Item = usize> {
    let (x, y) = (i % w, i / w);
    [(x > 0).then(|| i - 1), (x + 1 < w).then_some(i + 1), (y > 0).then(|| i - w), (y + 1 < h).then_some(i + w)].into_iter().flatten()
}

fn neighbours8(i: usize, w: usize, h: usize) -> impl Iterator<Item = usize> {
    let (x, y) = ((i % w) as i64, (i / w) as i64);
    (-1..=1i64)
        .flat_map(move |dy| (-1..=1i64).map(move |dx| (x + dx, y + dy)))
        .filter(move |&(xx, yy)| (xx, yy) != (x, y) && (0..w as i64).contains(&xx) && (0..h as i64).contains(&yy))
        .map(move |(xx, yy)| yy as usize * w + xx as usize)
}

/// The blob with its holes filled: every pixel the image border cannot reach without crossing it.
fn fill_holes(blob: &[usize], w: usize, h: usize) -> Vec<bool> {
    let mut wall = vec![false; w * h];
    for &i in blob {
        wall[i] = true;
    }
    let mut outside = vec![false; w * h];
    let mut queue: Vec<usize> = (0..w * h).filter(|&i| (i % w == 0 || i % w == w - 1 || i / w == 0 || i / w == h - 1) && !wall[i]).collect();
    for &i in &queue {
        outside[i] = true;
    }
    while let Some(i) = queue.pop() {
        for j in neighbours(i, w, h) {
            if !outside[j] && !wall[j] {
                outside[j] = true;
                queue.push(j);
            }
        }
    }
    outside.into_iter().map(|o| !o).collect()
}

/// `mask` grown by `d` pixels in every direction (a square structuring element).
fn dilate(mask: &[bool], w: usize, h: usize, d: usize) -> Vec<bool> {
    let rows: Vec<bool> = (0..w * h).map(|i| {
        let (x, y) = (i % w, i / w);
        (x.saturating_sub(d)..(x + d + 1).min(w)).any(|xx| mask[y * w + xx])
    }).collect();
    (0..w * h).map(|i| {
        let (x, y) = (i % w, i / w);
        (y.saturating_sub(d)..(y + d + 1).min(h)).any(|yy| rows[yy * w + x])
    }).collect()
}

/// The background pattern from the pixels not `excluded`: how much of their colour variance lies
/// between rows (horizontal structure) and between columns (vertical), and which way sky and
/// ground lie.
fn read_background(img: &RgbImage, excluded: &[bool]) -> Background {
    let (w, h) = (img.width() as usize, img.height() as usize);
    // With almost nothing left outside the subjects, read what there is rather than nothing.
    let keep: Vec<bool> = if excluded.iter().filter(|e| !**e).count() * 10 < w * h {
        vec![true; w * h]
    } else {
        excluded.iter().map(|e| !e).collect()
    };
    let mut total = Moments::default();
    let mut rows = vec![Moments::default(); h];
    let mut cols = vec![Moments::default(); w];
    for (x, y, p) in img.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        if keep[y * w + x] {
            total.add(p.0);
            rows[y].add(p.0);
            cols[x].add(p.0);
        }
    }
    let variance = total.variance();
    if variance < PLAIN_VARIANCE {
        return Background::Plain;
    }
    let mean = total.mean();
    let between = |groups: &[Moments]| -> f64 {
        groups.iter().filter(|g| g.n > 0.0).map(|g| g.n * dist2(g.mean(), mean)).sum::<f64>() / total.n
    };
    let (by_row, by_col) = (between(&rows), between(&cols));
    let band = |from: f64, to: f64| {
        let mut m = Moments::default();
        for g in &rows[(from * h as f64) as usize..(to * h as f64) as usize] {
            m.merge(g);
        }
        m.mean()
    };
    let (top, bottom) = (band(0.0, 0.4), band(0.8, 1.0));
    if by_row >= 0.5 * variance && top[2] - top[0] > 30.0 && bottom[0] - bottom[2] > 20.0 {
        Background::SkyOverGround
    } else if by_row >= 0.5 * variance && by_row >= by_col {
        Background::HorizontalStripes
    } else if by_col >= 0.5 * variance {
        Background::VerticalStripes
    } else {
        Background::Checkerboard
    }
}

/// Running count, sums and sums of squares of RGB values.
#[derive(Clone, Default)]
struct Moments {
    n: f64,
    sum: [f64; 3],
    sq: [f64; 3],
}

impl Moments {
    fn add(&mut self, p: [u8; 3]) {
        self.n += 1.0;
        for (k, v) in p.into_iter().enumerate() {
            self.sum[k] += v as f64;
            self.sq[k] += (v as f64).powi(2);
        }
    }

    fn merge(&mut self, other: &Moments) {
        self.n += other.n;
        for k in 0..3 {
            self.sum[k] += other.sum[k];
            self.sq[k] += other.sq[k];
        }
    }

    fn mean(&self) -> [f64; 3] {
        let n = self.n.max(1.0);
        self.sum.map(|s| s / n)
    }

    /// Variance summed over the channels.
    fn variance(&self) -> f64 {
        let n = self.n.max(1.0);
        (0..3).map(|k| self.sq[k] / n - (self.sum[k] / n).powi(2)).sum()
    }
}

fn dist2(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|k| (a[k] - b[k]).powi(2)).sum()
}

/// Which attributes one reading got right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hits {
    pub background: bool,
    pub colour: bool,
    pub shape: bool,
    pub size: bool,
    pub position: bool,
    pub dot: bool,
    /// Exactly one subject.
    pub single: bool,
}

impl Hits {
    /// Background, colour and shape all right: what a background edit must get (new background,
    /// same subject).
    pub fn all_of(&self) -> bool {
        self.background && self.colour && self.shape
    }

    /// Every attribute right.
    pub fn all(&self) -> bool {
        self.all_of() && self.size && self.position && self.dot && self.single
    }
}

impl Reading {
    /// Compares this reading with the scene the image should show.
    pub fn hits(&self, scene: &Scene) -> Hits {
        Hits {
            background: self.background == Some(scene.background),
            colour: self.colour == Some(scene.colour),
            shape: self.shape == Some(scene.shape),
            size: self.size == Some(scene.size),
            position: self.position == Some(scene.position),
            dot: self.dot == Some(scene.dot),
            single: self.subjects == 1,
        }
    }
}

/// Hit counts over many readings, per attribute.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accuracy {
    pub total: usize,
    pub background: usize,
    pub colour: usize,
    pub shape: usize,
    pub size: usize,
    pub position: usize,
    pub dot: usize,
    pub single: usize,
    /// Readings with background, colour and shape all right ([`Hits::all_of`]).
    pub all_of: usize,
}

impl Accuracy {
    pub fn add(&mut self, hits: Hits) {
        self.total += 1;
        for (count, hit) in [
            (&mut self.background, hits.background),
            (&mut self.colour, hits.colour),
            (&mut self.shape, hits.shape),
            (&mut self.size, hits.size),
            (&mut self.position, hits.position),
            (&mut self.dot, hits.dot),
            (&mut self.single, hits.single),
            (&mut self.all_of, hits.all_of()),
        ] {
            *count += hit as usize;
        }
    }

    /// `count` as a fraction of the readings (0 when there are none).
    pub fn rate(&self, count: usize) -> f64 {
        count as f64 / self.total.max(1) as f64
    }

    /// The lowest per-attribute rate (background, colour, shape, size, position, dot, single).
    pub fn worst(&self) -> f64 {
        [self.background, self.colour, self.shape, self.size, self.position, self.dot, self.single]
            .into_iter()
            .map(|c| self.rate(c))
            .fold(1.0, f64::min)
    }
}

impl fmt::Display for Accuracy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |c| 100.0 * self.rate(c);
        write!(
            f,
            "n {} background {:.1}% colour {:.1}% shape {:.1}% size {:.1}% position {:.1}% dot {:.1}% single {:.1}% all_of(background,colour,shape) {:.1}%",
            self.total,
            pct(self.background),
            pct(self.colour),
            pct(self.shape),
            pct(self.size),
            pct(self.position),
            pct(self.dot),
            pct(self.single),
            pct(self.all_of)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;
    use rand::{Rng, SeedableRng};

    /// Reads `n` sampled scenes at `size`, each rendered and then spoilt by `spoil`.
    fn accuracy(n: usize, size: u32, seed: u64, spoil: impl Fn(&RgbImage, &mut rand::rngs::StdRng) -> RgbImage) -> Accuracy {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut acc = Accuracy::default();
        for _ in 0..n {
            let scene = Scene::sample(&mut rng);
            let img = spoil(&scene.render(size).0, &mut rng);
            let hits = read_scene(&img).hits(&scene);
            if !hits.all() {
                eprintln!("missed {hits:?} on {scene:?}");
            }
            acc.add(hits);
        }
        eprintln!("{size} px: {acc}");
        acc
    }

    fn noise(img: &RgbImage, rng: &mut rand::rngs::StdRng) -> RgbImage {
        let normal = rand_distr::Normal::new(0.0f32, 8.0).expect("sigma is positive");
        let mut out = img.clone();
        for v in out.iter_mut() {
            *v = (*v as f32 + rng.sample(normal)).round().clamp(0.0, 255.0) as u8;
        }
        out
    }

    fn blur(img: &RgbImage, _: &mut rand::rngs::StdRng) -> RgbImage {
        let (w, h) = (img.width() as i64, img.height() as i64);
        RgbImage::from_fn(img.width(), img.height(), |x, y| {
            let mut sum = [0u32; 3];
            for (dx, dy) in (-1..=1).flat_map(|dx| (-1..=1).map(move |dy| (dx, dy))) {
                let p = img.get_pixel((x as i64 + dx).clamp(0, w - 1) as u32, (y as i64 + dy).clamp(0, h - 1) as u32);
                (0..3).for_each(|k| sum[k] += p.0[k] as u32);
            }
            Rgb(sum.map(|s| ((s + 4) / 9) as u8))
        })
    }

    #[test]
    fn reads_clean_renders_exactly() {
        for (n, size) in [(2000, 32), (500, 64), (300, 48), (300, 16)] {
            let acc = accuracy(n, size, size as u64, |img, _| img.clone());
            assert!(acc.worst() >= 0.995, "{size} px: {acc}");
        }
    }

    #[test]
    fn reads_noisy_and_blurred_renders() {
        for size in [32, 64] {
            let n = if size == 32 { 2000 } else { 500 };
            let acc = accuracy(n, size, 7, noise);
            assert!(acc.worst() >= 0.97, "noise, {size} px: {acc}");
            let acc = accuracy(n, size, 8, blur);
            assert!(acc.worst() >= 0.97, "blur, {size} px: {acc}");
        }
    }

    #[test]
    fn blank_image_has_no_subject() {
        let r = read_scene(&RgbImage::from_pixel(32, 32, Rgb([128, 128, 128])));
        assert_eq!(r, Reading { background: Some(Background::Plain), colour: None, shape: None, size: None, position: None, dot: None, subjects: 0 });
    }

    #[test]
    fn counts_two_subjects() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut left = Scene::sample(&mut rng);
        let mut right = Scene::sample(&mut rng);
        (left.position, right.position) = (Position::Left, Position::Right);
        (left.size, right.size) = (Size::Small, Size::Small);
        let (mut img, _) = left.render(32);
        let (other, mask) = right.render(32);
        for (x, y, m) in mask.enumerate_pixels() {
            if m.0[0] == 255 {
                img.put_pixel(x, y, *other.get_pixel(x, y));
            }
        }
        assert_eq!(read_scene(&img).subjects, 2);
        assert_eq!(read_scene(&left.render(32).0).subjects, 1);
    }

    #[test]
    fn accuracy_counts_and_prints() {
        let scene = Scene::sample(&mut rand::rngs::StdRng::seed_from_u64(2));
        let mut acc = Accuracy::default();
        acc.add(read_scene(&scene.render(32).0).hits(&scene));
        acc.add(read_scene(&RgbImage::from_pixel(32, 32, Rgb([128; 3]))).hits(&scene));
        assert_eq!((acc.total, acc.colour, acc.single), (2, 1, 1));
        assert!(acc.to_string().contains("colour 50.0%"), "{acc}");
    }
}
