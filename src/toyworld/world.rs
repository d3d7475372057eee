//! Scenes of the toy world: one subject on one background, described by a handful of discrete
//! attributes (what captions and edits talk about) plus small continuous jitter (so no two renders
//! are the same picture), rendered with hard edges at any size from 16 pixels up.

use crate::error::{bad_input, Result};
use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Declares an attribute enum with its words: `ALL`, `word()`, `Display` and `FromStr`, all from
/// one table so they cannot disagree. Words equal the serde (snake_case) names.
macro_rules! attribute {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($variant:ident => $word:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in a fixed order (for sampling and for tables).
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value's name in captions, files and on the command line.
            pub fn word(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }

            fn sample(rng: &mut impl Rng) -> $name {
                Self::ALL[rng.random_range(0..Self::ALL.len())]
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.word())
            }
        }

        impl FromStr for $name {
            type Err = crate::Error;
            fn from_str(s: &str) -> Result<$name> {
                Self::ALL.iter().copied().find(|v| v.word() == s).ok_or_else(|| {
                    let words: Vec<&str> = Self::ALL.iter().map(|v| v.word()).collect();
                    bad_input(format!("{s:?}"), concat!("is not a ", $what), format!("choose one of {}", words.join(", ")))
                })
            }
        }
    };
}

attribute!(
    /// The subject's outline.
    Shape, "shape" { Circle => "circle", Square => "square", Triangle => "triangle" }
);
attribute!(
    /// The subject's colour: saturated, far from every background colour, so a scorer can find it.
    Colour, "colour" { Red => "red", Green => "green", Blue => "blue", Yellow => "yellow" }
);
attribute!(
    /// The subject's size: radius 0.16 or 0.25 of the image side.
    Size, "size" { Small => "small", Large => "large" }
);
attribute!(
    /// Where the subject stands: a quarter, a half or three quarters across.
    Position, "position" { Left => "left", Centre => "centre", Right => "right" }
);
attribute!(
    /// A disc at the subject's centre: an identity detail that captions never mention, so an edit
    /// that keeps the subject must keep it too.
    Dot, "dot" { Black => "black", White => "white" }
);
attribute!(
    /// The background pattern.
    Background, "background" {
        Plain => "plain",
        HorizontalStripes => "horizontal_stripes",
        VerticalStripes => "vertical_stripes",
        Checkerboard => "checkerboard",
        SkyOverGround => "sky_over_ground",
    }
);

impl Colour {
    /// The subject's pixel colour.
    pub fn rgb(self) -> Rgb<u8> {
        Rgb(match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [20, 180, 40],
            Colour::Blue => [30, 60, 220],
            Colour::Yellow => [235, 205, 30],
        })
    }
}

impl Size {
    /// The subject's "radius" as a fraction of the image side.
    pub fn radius(self) -> f32 {
        match self {
            Size::Small => 0.16,
            Size::Large => 0.25,
        }
    }
}

impl Position {
    /// How captions say it.
    pub fn phrase(self) -> &'static str {
        match self {
            Position::Left => "on the left",
            Position::Centre => "in the centre",
            Position::Right => "on the right",
        }
    }

    /// The subject centre's x before jitter, as a fraction of the image side.
    pub fn x(self) -> f32 {
        match self {
            Position::Left => 0.25,
            Position::Centre => 0.5,
            Position::Right => 0.75,
        }
    }
}

impl Dot {
    /// The dot's pixel colour.
    pub fn rgb(self) -> Rgb<u8> {
        Rgb(match self {
            Dot::Black => [0, 0, 0],
            Dot::White => [255, 255, 255],
        })
    }
}

impl Background {
    /// How captions say it: "a checkerboard background".
    pub fn phrase(self) -> String {
        format!("a {} background", self.word().replace('_', " "))
    }
}

/// How many colour variants each background has ([`Scene::palette`]).
pub const PALETTES: u8 = 3;

/// The most the subject centre moves off its nominal place, as a fraction of the image side.
pub const MAX_JITTER: f32 = 0.04;

/// One scene: the attributes a caption names, the dot it does not, and the jitter that makes each
/// render its own picture. Fractions are of the image side, so a scene renders at any size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub position: Position,
    pub dot: Dot,
    pub background: Background,
    /// Subject centre offset from its nominal place, x and y, in [-MAX_JITTER, MAX_JITTER].
    pub offset: (f32, f32),
    /// Which of the background's [`PALETTES`] colour variants.
    pub palette: u8,
    /// Shift of the stripe / checkerboard pattern, as a fraction of one cell, in [0, 1).
    pub phase: f32,
    /// Height of the sky-over-ground horizon, as a fraction of the side from the top.
    pub horizon: f32,
}

impl Scene {
    /// A scene uniform over every attribute, with jitter.
    pub fn sample(rng: &mut impl Rng) -> Scene {
        Scene {
            shape: Shape::sample(rng),
            colour: Colour::sample(rng),
            size: Size::sample(rng),
            position: Position::sample(rng),
            dot: Dot::sample(rng),
            background: Background::sample(rng),
            offset: (rng.random_range(-MAX_JITTER..=MAX_JITTER), rng.random_range(-MAX_JITTER..=MAX_JITTER)),
            palette: rng.random_range(0..PALETTES),
            phase: rng.random_range(0.0..1.0),
            horizon: rng.random_range(0.55..=0.65),
        }
    }

    /// The subject's words, "a large red circle on the left" (the editing tool's T_o).
    pub fn object_text(&self) -> String {
        format!("a {} {} {} {}", self.size, self.colour, self.shape, self.position.phrase())
    }

    /// The background's words, "a checkerboard background" (the editing tool's T_b).
    pub fn background_text(&self) -> String {
        self.background.phrase()
    }

    /// The full caption, "T_o in T_b", as the editing tool builds its full text.
    pub fn caption(&self) -> String {
        format!("{} in {}", self.object_text(), self.background_text())
    }

    /// The picture at `size` x `size` and the exact subject mask (255 on the subject and its dot).
    pub fn render(&self, size: u32) -> (RgbImage, GrayImage) {
        let subject = Subject::of(self, size);
        let mut img = RgbImage::new(size, size);
        let mut mask = GrayImage::new(size, size);
        for (x, y, pixel) in img.enumerate_pixels_mut() {
            // Pixel centres, so shapes are symmetric and scale without bias.
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            *pixel = if subject.dot(px, py) {
                self.dot.rgb()
            } else if subject.contains(px, py) {
                self.colour.rgb()
            } else {
                self.background_at(px, py, size as f32)
            };
            if subject.contains(px, py) {
                mask.put_pixel(x, y, Luma([255]));
            }
        }
        (img, mask)
    }

    fn background_at(&self, px: f32, py: f32, side: f32) -> Rgb<u8> {
        let p = self.palette as usize % PALETTES as usize;
        // Cells of side/8 (4 pixels at 32): fine enough to be a pattern, coarse enough to survive
        // a small VAE.
        let cell = side / 8.0;
        let row = ((py / cell) + self.phase).floor() as i64;
        let col = ((px / cell) + self.phase).floor() as i64;
        let stripes = |i: i64| Rgb(STRIPES[p][i.rem_euclid(2) as usize]);
        match self.background {
            Background::Plain => Rgb(PLAIN[p]),
            Background::HorizontalStripes => stripes(row),
            Background::VerticalStripes => stripes(col),
            Background::Checkerboard => stripes(row + col),
            Background::SkyOverGround => Rgb(if py < self.horizon * side { SKY[p] } else { GROUND[p] }),
        }
    }
}

/// Muted background colours, far from every subject colour.
const PLAIN: [[u8; 3]; 3] = [[128, 128, 128], [185, 185, 185], [200, 190, 165]];
const STRIPES: [[[u8; 3]; 2]; 3] = [
    [[95, 95, 95], [170, 170, 170]],
    [[120, 115, 105], [190, 185, 175]],
    [[80, 85, 90], [155, 160, 165]],
];
const SKY: [[u8; 3]; 3] = [[140, 190, 235], [160, 200, 230], [125, 175, 225]];
const GROUND: [[u8; 3]; 3] = [[120, 85, 55], [105, 90, 60], [135, 100, 65]];

/// A scene's subject in pixel units at one render size.
struct Subject {
    shape: Shape,
    cx: f32,
    cy: f32,
    r: f32,
    dot_r: f32,
}

impl Subject {
    fn of(scene: &Scene, size: u32) -> Subject {
        let side = size as f32;
        let r = scene.size.radius() * side;
        // Jitter may not push the subject off the picture: keep a pixel of background round it.
        let place = |nominal: f32, offset: f32| ((nominal + offset) * side).clamp(r + 1.0, side - r - 1.0);
        Subject {
            shape: scene.shape,
            cx: place(scene.position.x(), scene.offset.0),
            cy: place(0.5, scene.offset.1),
            r,
            dot_r: 0.3 * r,
        }
    }

    fn contains(&self, px: f32, py: f32) -> bool {
        let (dx, dy) = (px - self.cx, py - self.cy);
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= self.r * self.r,
            Shape::Square => dx.abs() <= self.r && dy.abs() <= self.r,
            // Apex at the top of the 2r x 2r box, base along its bottom: half-width grows by 1/2
            // per pixel of depth.
            Shape::Triangle => {
                let depth = dy + self.r;
                (0.0..=2.0 * self.r).contains(&depth) && dx.abs() <= depth / 2.0
            }
        }
    }

    fn dot(&self, px: f32, py: f32) -> bool {
        // The triangle's centroid lies a third of the way up from its base.
        let cy = if self.shape == Shape::Triangle { self.cy + self.r / 3.0 } else { self.cy };
        let (dx, dy) = (px - self.cx, py - cy);
        dx * dx + dy * dy <= self.dot_r * self.dot_r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn scene(shape: Shape, size: Size, position: Position) -> Scene {
        Scene {
            shape,
            colour: Colour::Red,
            size,
            position,
            dot: Dot::White,
            background: Background::Checkerboard,
            offset: (0.0, 0.0),
            palette: 0,
            phase: 0.0,
            horizon: 0.6,
        }
    }

    #[test]
    fn words_round_trip_and_match_serde() {
        for b in Background::ALL {
            assert_eq!(b.word().parse::<Background>().unwrap(), *b);
            assert_eq!(serde_json::to_string(b).unwrap(), format!("\"{}\"", b.word()));
        }
        assert_eq!(Position::ALL.iter().map(|p| p.word()).collect::<Vec<_>>(), ["left", "centre", "right"]);
        let err = "hexagon".parse::<Shape>().unwrap_err().to_string();
        assert_eq!(err, "\"hexagon\": is not a shape; choose one of circle, square, triangle");
    }

    #[test]
    fn captions_are_exact() {
        let mut s = scene(Shape::Circle, Size::Large, Position::Left);
        assert_eq!(s.caption(), "a large red circle on the left in a checkerboard background");
        s.background = Background::SkyOverGround;
        s.position = Position::Centre;
        assert_eq!(s.background_text(), "a sky over ground background");
        assert_eq!(s.object_text(), "a large red circle in the centre");
    }

    #[test]
    fn areas_follow_the_geometry() {
        let size = 64;
        let r = 0.25 * size as f32;
        for (shape, expected) in [(Shape::Circle, std::f32::consts::PI * r * r), (Shape::Square, 4.0 * r * r), (Shape::Triangle, 2.0 * r * r)] {
            let (_, mask) = scene(shape, Size::Large, Position::Centre).render(size);
            let area = mask.pixels().filter(|p| p.0[0] == 255).count() as f32;
            assert!((area / expected - 1.0).abs() < 0.06, "{shape}: {area} px, expected {expected}");
        }
    }

    #[test]
    fn subject_stays_inside_and_dot_is_visible() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for size in [16, 32, 48] {
            for _ in 0..300 {
                let s = Scene::sample(&mut rng);
                let (img, mask) = s.render(size);
                let border = (0..size).flat_map(|i| [(i, 0), (i, size - 1), (0, i), (size - 1, i)]);
                assert!(border.into_iter().all(|(x, y)| mask.get_pixel(x, y).0[0] == 0), "{s:?} touches the border");
                let dots = img.pixels().filter(|p| **p == s.dot.rgb()).count();
                assert!(dots >= 3 || size < 32, "{s:?}: dot of {dots} px at {size}");
                assert!(dots >= 1, "{s:?}: no dot at {size}");
            }
        }
    }

    #[test]
    fn positions_and_jitter_move_the_subject() {
        let centre_x = |s: &Scene| {
            let (_, mask) = s.render(64);
            let xs: Vec<u32> = mask.enumerate_pixels().filter(|p| p.2 .0[0] == 255).map(|p| p.0).collect();
            xs.iter().sum::<u32>() as f32 / xs.len() as f32
        };
        let left = scene(Shape::Square, Size::Small, Position::Left);
        let right = scene(Shape::Square, Size::Small, Position::Right);
        assert!((centre_x(&left) - 16.0).abs() < 0.6 && (centre_x(&right) - 48.0).abs() < 0.6);
        let moved = Scene { offset: (0.04, 0.0), ..left.clone() };
        assert!(centre_x(&moved) > centre_x(&left) + 2.0);
    }
}
