//! Toy-world datasets on disk: `images/000000.png` (RGB), `masks/000000.png` (L8, 255 on the
//! subject), `scenes.jsonl` (one record per scene: paths, caption, texts, the scene itself) and
//! `world.json` (the settings). Scene `i` depends on the seed and `i` alone, so every example is
//! reproducible by itself, a run can resume, and held-out scenes come from another seed.

use super::world::Scene;
use crate::error::{bad_input, io_err, Result};
use crate::image_io::{load_image, load_rgb, save_png_atomic, write_atomic};
use crate::pipeline::splitmix64;
use image::{GrayImage, RgbImage};
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `world.json` format version.
pub const VERSION: u32 = 1;

const GENERATE: &str = "generate it with `layerdiff toyworld data --out DIR`";

/// What to write: `n` scenes at `size` x `size` from `seed` into `out`.
#[derive(Clone, Debug)]
pub struct DataOptions {
    pub n: usize,
    pub size: u32,
    pub seed: u64,
    pub out: PathBuf,
}

/// A dataset's settings, as `world.json` holds them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldInfo {
    pub version: u32,
    pub size: u32,
    pub n: usize,
    pub seed: u64,
}

/// One line of `scenes.jsonl`. The texts are stored, not only the scene, so tools in other
/// languages need not rebuild captions.
#[derive(Serialize, Deserialize)]
struct Record {
    index: usize,
    image: String,
    mask: String,
    caption: String,
    object_text: String,
    background_text: String,
    scene: Scene,
}

/// One loaded scene.
#[derive(Clone, Debug)]
pub struct Example {
    pub index: usize,
    pub image: RgbImage,
    pub mask: GrayImage,
    pub caption: String,
    pub scene: Scene,
}

/// Scene `index` of the dataset drawn from `seed`: its own RNG, seeded from both.
pub fn scene_for(seed: u64, index: usize) -> Scene {
    Scene::sample(&mut rand::rngs::StdRng::seed_from_u64(seed ^ splitmix64(index as u64)))
}

/// Writes the dataset, calling `progress(done, n)` after each scene. Resumes a dataset of the same
/// settings in `opts.out` (scenes whose image and mask exist are kept); refuses any other
/// non-empty folder.
pub fn write_dataset(opts: &DataOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
    if opts.n == 0 {
        return Err(bad_input("--n 0", "a dataset needs at least one scene", "give --n 1 or more"));
    }
    if opts.size < 16 {
        return Err(bad_input(format!("--size {}", opts.size), "is too small for a subject and its dot", "give --size 16 or more (32 by default)"));
    }
    let out = &opts.out;
    let info = WorldInfo { version: VERSION, size: opts.size, n: opts.n, seed: opts.seed };
    let world = out.join("world.json");
    if world.exists() {
        let found = read_info(&world)?;
        if found != info {
            return Err(bad_input(
                out.display(),
                format!("holds a toy-world dataset of other settings (n {}, size {}, seed {})", found.n, found.size, found.seed),
                "choose another --out or delete it",
            ));
        }
    } else {
        if out.exists() && (!out.is_dir() || out.read_dir().map_err(io_err(out))?.next().is_some()) {
            return Err(bad_input(out.display(), "is not empty and holds no toy-world dataset (no world.json)", "choose another --out or delete it"));
        }
        // Settings first, so an interrupted run is recognised and resumed.
        write_atomic(&world, &to_json(&info)?)?;
    }

    let mut lines = String::new();
    for index in 0..opts.n {
        let scene = scene_for(opts.seed, index);
        let (image, mask) = (format!("images/{index:06}.png"), format!("masks/{index:06}.png"));
        let (image_path, mask_path) = (out.join(&image), out.join(&mask));
        if !(image_path.exists() && mask_path.exists()) {
            let (img, m) = scene.render(opts.size);
            save_png_atomic(&img, &image_path)?;
            save_png_atomic(&m, &mask_path)?;
        }
        let record = Record { index, image, mask, caption: scene.caption(), object_text: scene.object_text(), background_text: scene.background_text(), scene };
        lines.push_str(&String::from_utf8_lossy(&to_json(&record)?));
        lines.push('\n');
        progress(index + 1, opts.n);
    }
    write_atomic(&out.join("scenes.jsonl"), lines.as_bytes())
}

/// Loads a dataset written by [`write_dataset`]: its settings and every example, in index order.
pub fn load_dataset(dir: &Path) -> Result<(WorldInfo, Vec<Example>)> {
    let world = dir.join("world.json");
    if !world.exists() {
        return Err(bad_input(dir.display(), "is not a toy-world dataset (no world.json)", GENERATE));
    }
    let info = read_info(&world)?;
    let scenes = dir.join("scenes.jsonl");
    if !scenes.exists() {
        return Err(bad_input(scenes.display(), "is missing (an interrupted run?)", "rerun `layerdiff toyworld data` with the same settings to finish it"));
    }
    let text = std::fs::read_to_string(&scenes).map_err(io_err(&scenes))?;
    let records = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let at = format!("{}:{}", scenes.display(), i + 1);
            let record: Record = serde_json::from_str(line).map_err(|e| bad_input(&at, format!("is not a scene record ({e})"), GENERATE))?;
            Ok((at, record))
        })
        .collect::<Result<Vec<_>>>()?;
    if records.len() != info.n {
        return Err(bad_input(scenes.display(), format!("lists {} scenes but world.json says {}", records.len(), info.n), GENERATE));
    }
    let examples = records
        .into_par_iter()
        .enumerate()
        .map(|(expected, (at, r))| {
            if r.index != expected {
                return Err(bad_input(&at, format!("has index {} where {expected} belongs", r.index), GENERATE));
            }
            let image = load_rgb(&dir.join(&r.image))?;
            let mask = load_image(&dir.join(&r.mask))?.to_luma8();
            if image.dimensions() != (info.size, info.size) || mask.dimensions() != (info.size, info.size) {
                return Err(bad_input(&at, format!("image or mask is not {0} x {0} as world.json says", info.size), GENERATE));
            }
            Ok(Example { index: r.index, image, mask, caption: r.caption, scene: r.scene })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((info, examples))
}

fn read_info(path: &Path) -> Result<WorldInfo> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let info: WorldInfo = serde_json::from_str(&text).map_err(|e| bad_input(path.display(), format!("is not a toy-world description ({e})"), GENERATE))?;
    if info.version != VERSION {
        return Err(bad_input(path.display(), format!("is version {}, this build reads {VERSION}", info.version), GENERATE));
    }
    Ok(info)
}

fn to_json(value: &impl Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| bad_input("toy-world record", format!("cannot be written as JSON ({e})"), "report this bug"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_depend_on_seed_and_index_only() {
        assert_eq!(scene_for(5, 17), scene_for(5, 17));
        assert_ne!(scene_for(5, 17), scene_for(6, 17));
        let distinct: std::collections::HashSet<String> = (0..50).map(|i| format!("{:?}", scene_for(5, i))).collect();
        assert_eq!(distinct.len(), 50);
    }

    #[test]
    fn refuses_bad_settings_and_foreign_folders() {
        let dir = tempfile::tempdir().unwrap();
        let opts = |n, size, out: &Path| DataOptions { n, size, seed: 1, out: out.to_path_buf() };
        let err = |o: &DataOptions| write_dataset(o, &mut |_, _| {}).unwrap_err().to_string();
        assert!(err(&opts(0, 32, dir.path())).contains("--n 0"));
        assert!(err(&opts(4, 15, dir.path())).contains("--size 15"));
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        assert!(err(&opts(4, 32, dir.path())).contains("holds no toy-world dataset"));
        assert!(!dir.path().join("world.json").exists());
    }

    #[test]
    fn load_names_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("d");
        write_dataset(&DataOptions { n: 2, size: 16, seed: 3, out: out.clone() }, &mut |_, _| {}).unwrap();
        let scenes = out.join("scenes.jsonl");
        let text = std::fs::read_to_string(&scenes).unwrap();
        let first = text.lines().next().unwrap();
        std::fs::write(&scenes, format!("{first}\n{{\"index\": 1}}\n")).unwrap();
        let err = load_dataset(&out).unwrap_err().to_string();
        assert!(err.contains("scenes.jsonl:2: is not a scene record"), "{err}");
        assert!(err.contains("layerdiff toyworld data --out DIR"), "{err}");
        assert!(load_dataset(dir.path()).unwrap_err().to_string().contains("no world.json"));
    }
}
