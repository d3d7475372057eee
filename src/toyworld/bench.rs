//! The toy-world benchmark (`layerdiff toyworld bench`): edit tasks built from held-out scenes,
//! each run through LayerDiffusion, its ablations and the baselines, every output read by the
//! exact scorers. The table has the form of the paper's Table 1, with "satisfies the text" read
//! exactly instead of by people.
//!
//! A task takes a scene (its picture and true mask are the input photo and `M_s`) and asks for a
//! new background, a new size or a new position, or a new background with one of those; the
//! target texts are the target scene's `T_o` ("a large red circle on the left") and `T_b` ("a
//! checkerboard background"). An output is scored on: the target background reached, the target
//! attribute reached (size or position; for a background-only task, the subject's size and
//! position kept), the subject's colour and shape kept, its identity dot kept (never in any text:
//! only the photo carries it), one subject drawn, and all of these at once.

use super::data::scene_for;
use super::score::read_scene;
use super::world::{Background, Position, Scene, Size};
use crate::baselines::{imagic, sdedit};
use crate::error::{bad_input, io_err, Result};
use crate::image_io::{contact_sheet, save_png_atomic, write_atomic};
use crate::method::edit::{edit, sample_session, BackgroundSource, EditRequest, Progress, Resample};
use crate::method::session::{self, SessionInfo};
use crate::method::EditSettings;
use crate::pipeline::StableDiffusion;
use crate::sources::ModelFiles;
use image::RgbImage;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What a task changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Background,
    Size,
    Position,
    BackgroundAndSize,
    BackgroundAndPosition,
}

impl Change {
    pub const ALL: [Change; 5] = [Change::Background, Change::Size, Change::Position, Change::BackgroundAndSize, Change::BackgroundAndPosition];

    pub fn name(self) -> &'static str {
        match self {
            Change::Background => "background",
            Change::Size => "size",
            Change::Position => "position",
            Change::BackgroundAndSize => "background+size",
            Change::BackgroundAndPosition => "background+position",
        }
    }

    fn background(self) -> bool {
        matches!(self, Change::Background | Change::BackgroundAndSize | Change::BackgroundAndPosition)
    }
}

/// One edit task: the input scene and the scene the texts ask for.
#[derive(Debug, Clone)]
pub struct Task {
    pub index: usize,
    pub change: Change,
    pub input: Scene,
    pub target: Scene,
}

/// `n` tasks from the held-out scenes of `seed`, the changes in turn; a new background, size or
/// position is the next one in the list after the input's.
pub fn make_tasks(seed: u64, n: usize) -> Vec<Task> {
    (0..n)
        .map(|index| {
            let input = scene_for(seed, index);
            let change = Change::ALL[index % Change::ALL.len()];
            let mut target = input.clone();
            if change.background() {
                target.background = next(Background::ALL, input.background);
            }
            match change {
                Change::Size | Change::BackgroundAndSize => target.size = next(Size::ALL, input.size),
                Change::Position | Change::BackgroundAndPosition => target.position = next(Position::ALL, input.position),
                Change::Background => {}
            }
            Task { index, change, input, target }
        })
        .collect()
}

/// LayerDiffusion's settings for the toy model (32 px, trained at lr 1e-3): the spec's method
/// with fewer steps, the guidance scale it was evaluated at, and a fine-tuning rate fit for
/// weights of its scale (SD's 2e-6 moves them nowhere).
pub fn toy_edit_settings() -> EditSettings {
    EditSettings {
        embedding_steps: 100,
        finetune_steps: 50,
        finetune_lr: 1e-4,
        steps: 25,
        guidance_scale: 3.0,
        ..EditSettings::default()
    }
}

/// The value after `now` in `all`, cyclically.
fn next<T: Copy + PartialEq>(all: &[T], now: T) -> T {
    let i = all.iter().position(|x| *x == now).unwrap_or(0);
    all[(i + 1) % all.len()]
}

/// How an output is edited: a method and its settings.
#[derive(Debug, Clone)]
pub struct Variant {
    /// The table's row name, e.g. `layerdiffusion`, `imagic`, `no-stage-1`.
    pub name: String,
    pub method: Method,
    pub settings: EditSettings,
    /// For an ablation of stage 3 only: stage 3 of the task's LayerDiffusion session (in its
    /// [`BASE_SESSION`] folder), redrawn with these settings. The images equal a whole edit's
    /// with them, bit for bit, without repeating stages 1 and 2.
    pub resample: Option<Resample>,
}

/// The folder, in each task's, of the LayerDiffusion edit that stage-3 ablations redraw.
pub const BASE_SESSION: &str = "layerdiffusion";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Layerdiffusion,
    Imagic,
    Sdedit,
}

/// The variants a run compares: each of `methods` (`layerdiffusion`, `imagic`, `sdedit`), and
/// with `ablations` LayerDiffusion without stage 1, without fine-tuning, without iterative
/// guidance, with alpha 0 and 1, and with lambda_o 1 and 3. `base` holds LayerDiffusion's
/// settings; Imagic takes its own defaults with `base`'s step counts and guidance.
pub fn variants(methods: &[String], ablations: bool, base: &EditSettings) -> Result<Vec<Variant>> {
    let mut out = Vec::new();
    for m in methods {
        let (method, settings) = match m.as_str() {
            "layerdiffusion" => (Method::Layerdiffusion, base.clone()),
            "imagic" => {
                let s = crate::baselines::imagic_settings();
                let settings = EditSettings {
                    embedding_steps: base.embedding_steps,
                    finetune_steps: base.finetune_steps,
                    finetune_lr: base.finetune_lr,
                    steps: base.steps,
                    guidance_scale: base.guidance_scale,
                    ..s
                };
                (Method::Imagic, settings)
            }
            "sdedit" => (Method::Sdedit, base.clone()),
            other => return Err(bad_input(format!("--methods {other}"), "unknown method", "use layerdiffusion, imagic, sdedit")),
        };
        out.push(Variant { name: m.clone(), method, settings, resample: None });
    }
    if ablations {
        let ablation = |name: &str, f: &dyn Fn(&mut EditSettings)| {
            let mut settings = base.clone();
            f(&mut settings);
            Variant { name: name.to_string(), method: Method::Layerdiffusion, settings, resample: None }
        };
        let stage3_ablation = |name: &str, resample: Resample| Variant {
            name: name.to_string(),
            method: Method::Layerdiffusion,
            settings: base.clone(),
            resample: Some(resample),
        };
        out.push(ablation("no-stage-1", &|s| s.embedding_steps = 0));
        out.push(ablation("no-finetune", &|s| s.finetune_steps = 0));
        out.push(stage3_ablation("no-guidance", Resample { guidance_period: Some(0), ..Default::default() }));
        out.push(stage3_ablation("alpha-0", Resample { alpha: Some(0.0), ..Default::default() }));
        out.push(stage3_ablation("alpha-1", Resample { alpha: Some(1.0), ..Default::default() }));
        out.push(ablation("lambda_o-1", &|s| s.lambda_object = Some(1.0)));
        out.push(ablation("lambda_o-3", &|s| s.lambda_object = Some(3.0)));
    }
    if out.is_empty() {
        return Err(bad_input("--methods", "none given", "give --methods layerdiffusion,imagic,sdedit"));
    }
    Ok(out)
}

/// What one output got right.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    pub background: bool,
    pub attribute: bool,
    pub colour: bool,
    pub shape: bool,
    pub dot: bool,
    pub single: bool,
}

impl Outcome {
    pub fn all(&self) -> bool {
        self.background && self.attribute && self.colour && self.shape && self.dot && self.single
    }

    const CSV_HEADER: &'static str = "background,attribute,colour,shape,dot,single,all";

    fn flags(&self) -> [bool; 7] {
        [self.background, self.attribute, self.colour, self.shape, self.dot, self.single, self.all()]
    }
}

/// Scores an edited image against its task.
pub fn score_output(task: &Task, image: &RgbImage) -> Outcome {
    let r = read_scene(image);
    let t = &task.target;
    Outcome {
        background: r.background == Some(t.background),
        attribute: r.size == Some(t.size) && r.position == Some(t.position),
        colour: r.colour == Some(t.colour),
        shape: r.shape == Some(t.shape),
        dot: r.dot == Some(t.dot),
        single: r.subjects == 1,
    }
}

/// A benchmark run.
pub struct BenchRequest {
    pub tasks: Vec<Task>,
    pub variants: Vec<Variant>,
    pub seeds: Vec<u64>,
    /// The image side (the model's training size).
    pub size: u32,
    /// SDEdit's strength.
    pub strength: f64,
    pub out: PathBuf,
}

/// One scored output.
#[derive(Debug, Clone)]
pub struct BenchResult {
    pub task: usize,
    pub change: Change,
    pub variant: String,
    pub seed: u64,
    pub outcome: Outcome,
}

/// Runs every (task, variant) not done yet (a variant's folder with all its `edit-<seed>.png` is
/// done: a stopped run resumes), scores everything, and writes `results.csv`, `summary.md` and
/// `sheet.png` (the first tasks' inputs and every variant's first output) into `out`.
pub fn run_bench(
    sd: &mut StableDiffusion,
    files: &ModelFiles,
    req: &BenchRequest,
    progress: &mut dyn Progress,
    report: &mut dyn FnMut(String),
) -> Result<Vec<BenchResult>> {
    if req.seeds.is_empty() || req.tasks.is_empty() {
        return Err(bad_input("--tasks / --seeds", "nothing to run", "give --tasks N and --seeds with at least one each"));
    }
    let mut results = Vec::new();
    let mut sheet_rows = Vec::new();
    for task in &req.tasks {
        let dir = req.out.join(format!("task-{:03}", task.index));
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let (image, mask) = task.input.render(req.size);
        let (image_path, mask_path) = (dir.join("input.png"), dir.join("mask.png"));
        save_png_atomic(&image, &image_path)?;
        save_png_atomic(&mask, &mask_path)?;
        let mut row = vec![("input".to_string(), image.clone())];
        for variant in &req.variants {
            let vdir = dir.join(&variant.name);
            let outputs: Vec<PathBuf> = req.seeds.iter().map(|s| vdir.join(format!("edit-{s}.png"))).collect();
            if !outputs.iter().all(|p| p.is_file()) {
                report(format!("task {} ({}): {}", task.index, task.change.name(), variant.name));
                run_variant(sd, files, task, variant, req, &image_path, &mask_path, &vdir, progress)?;
            }
            for (seed, path) in req.seeds.iter().zip(&outputs) {
                let img = crate::image_io::load_rgb(path)?;
                if *seed == req.seeds[0] {
                    row.push((variant.name.clone(), img.clone()));
                }
                results.push(BenchResult { task: task.index, change: task.change, variant: variant.name.clone(), seed: *seed, outcome: score_output(task, &img) });
            }
        }
        sheet_rows.push(row);
        write_atomic(&req.out.join("results.csv"), results_csv(&results).as_bytes())?;
        write_atomic(&req.out.join("summary.md"), summary_markdown(&results, &req.variants, req.tasks.len(), req.seeds.len()).as_bytes())?;
    }
    save_png_atomic(&sheet(&sheet_rows), &req.out.join("sheet.png"))?;
    Ok(results)
}

#[allow(clippy::too_many_arguments)]
fn run_variant(
    sd: &mut StableDiffusion,
    files: &ModelFiles,
    task: &Task,
    variant: &Variant,
    req: &BenchRequest,
    image: &Path,
    mask: &Path,
    dir: &Path,
    progress: &mut dyn Progress,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let request = EditRequest {
        image: image.to_path_buf(),
        mask: mask.to_path_buf(),
        object: task.target.object_text(),
        background: task.target.background_text(),
        prompt: None,
        background_source: BackgroundSource::Generated,
        size: req.size,
        seeds: req.seeds.clone(),
        train_seed: task.index as u64,
        settings: variant.settings.clone(),
        checkpoint_every: 1000,
    };
    // An edit before this one released the pipeline's UNet (its stage 2).
    sd.reload_unet(files)?;
    match (variant.method, variant.resample) {
        (Method::Layerdiffusion, Some(resample)) => {
            let base = dir.parent().unwrap_or(dir).join(BASE_SESSION);
            let finished = session::read_json::<SessionInfo>(&base.join(session::SESSION_JSON)).is_ok_and(|info| info.progress == "done");
            if !finished {
                edit(sd, files, &request, &base, false, progress)?;
            }
            sample_session(sd, files, &base, &req.seeds, resample, dir, progress).map(|_| ())
        }
        (Method::Layerdiffusion, None) => edit(sd, files, &request, dir, false, progress).map(|_| ()),
        (Method::Imagic, _) => imagic(sd, files, &request, dir, progress).map(|_| ()),
        (Method::Sdedit, _) => sdedit(sd, files, &request, req.strength, dir, progress).map(|_| ()),
    }
}

fn results_csv(results: &[BenchResult]) -> String {
    let mut s = format!("task,change,variant,seed,{}\n", Outcome::CSV_HEADER);
    for r in results {
        let flags: Vec<&str> = r.outcome.flags().iter().map(|&f| if f { "1" } else { "0" }).collect();
        let _ = writeln!(s, "{},{},{},{},{}", r.task, r.change.name(), r.variant, r.seed, flags.join(","));
    }
    s
}

/// Per variant, the share of outputs with each property, in percent.
pub fn rates(results: &[BenchResult], variant: &str) -> Option<[f64; 7]> {
    let mine: Vec<&BenchResult> = results.iter().filter(|r| r.variant == variant).collect();
    if mine.is_empty() {
        return None;
    }
    let mut rates = [0.0; 7];
    for r in &mine {
        for (rate, flag) in rates.iter_mut().zip(r.outcome.flags()) {
            *rate += f64::from(u8::from(flag));
        }
    }
    Some(rates.map(|x| 100.0 * x / mine.len() as f64))
}

/// The table of the paper's Table 1 form: one row per variant.
pub fn summary_markdown(results: &[BenchResult], variants: &[Variant], tasks: usize, seeds: usize) -> String {
    let mut s = format!(
        "# Toy-world benchmark\n\n{tasks} task(s) x {seeds} seed(s); percent of outputs (exact scorers).\n\n\
         | variant | background reached | attribute reached | colour kept | shape kept | identity dot kept | one subject | all (satisfies the text, keeps the subject) | n |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for v in variants {
        if let Some(r) = rates(results, &v.name) {
            let n = results.iter().filter(|x| x.variant == v.name).count();
            let cells: Vec<String> = r.iter().map(|x| format!("{x:.0}")).collect();
            let _ = writeln!(s, "| {} | {} | {n} |", v.name, cells.join(" | "));
        }
    }
    s
}

/// One contact-sheet row per task (at most 8), stacked.
fn sheet(rows: &[Vec<(String, RgbImage)>]) -> RgbImage {
    let parts: Vec<RgbImage> = rows.iter().take(8).map(|r| contact_sheet(r, 96)).collect();
    let width = parts.iter().map(|p| p.width()).max().unwrap_or(1);
    let height = parts.iter().map(|p| p.height()).sum::<u32>().max(1);
    let mut out = RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let mut y = 0;
    for p in &parts {
        image::imageops::overlay(&mut out, p, 0, i64::from(y));
        y += p.height();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_change_exactly_what_they_say() {
        for t in make_tasks(7, 20) {
            let (i, g) = (&t.input, &t.target);
            assert_eq!(i.background != g.background, t.change.background(), "task {}", t.index);
            assert_eq!(i.size != g.size, matches!(t.change, Change::Size | Change::BackgroundAndSize));
            assert_eq!(i.position != g.position, matches!(t.change, Change::Position | Change::BackgroundAndPosition));
            assert_eq!((i.colour, i.shape, i.dot), (g.colour, g.shape, g.dot));
        }
    }

    #[test]
    fn a_perfect_edit_scores_all_and_the_input_fails_the_change() {
        for t in make_tasks(3, 10) {
            let (target, _) = t.target.render(32);
            assert!(score_output(&t, &target).all(), "task {}", t.index);
            let (input, _) = t.input.render(32);
            let o = score_output(&t, &input);
            assert!(!o.all() && o.colour && o.shape && o.dot, "task {}: {o:?}", t.index);
        }
    }

    #[test]
    fn variants_cover_the_ablations() -> Result<()> {
        let v = variants(&["layerdiffusion".into(), "sdedit".into()], true, &EditSettings::default())?;
        let names: Vec<&str> = v.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["layerdiffusion", "sdedit", "no-stage-1", "no-finetune", "no-guidance", "alpha-0", "alpha-1", "lambda_o-1", "lambda_o-3"]);
        assert_eq!(v[2].settings.embedding_steps, 0);
        assert_eq!(v[4].resample.and_then(|r| r.guidance_period), Some(0));
        assert_eq!(v[6].resample.and_then(|r| r.alpha), Some(1.0));
        assert!(v[..4].iter().chain(&v[7..]).all(|v| v.resample.is_none()));
        assert!(variants(&["dalle".into()], false, &EditSettings::default()).is_err());
        Ok(())
    }
}
