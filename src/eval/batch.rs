//! Batch edits over a benchmark manifest (`layerdiff batch`): every row of a TEdBench-style
//! manifest edited by each method, scored with every metric, into one CSV and a summary table
//! like the paper's Table 1.
//!
//! The manifest is a JSON list of rows `{"img_name": ..., "target_text": ...}` (TEdBench's
//! `input_list.json`), each optionally with
//! - `object`: the object layer's text `T_o` (default: the whole target text),
//! - `background`: the background layer's text `T_b` (default: the whole target text; with the
//!   default background source `keep` it only steers stage 1, the photo's background is kept),
//! - the subject, one of `mask` (a path relative to the images folder, white = subject),
//!   `point` `[x, y]` or `box` `[x0, y0, x1, y1]` (pixels of the photo; Segment Anything makes
//!   the mask, once per row, as `<row dir>/sam-mask.png`).
//!
//! A row without a subject is not edited by `layerdiffusion` (it needs `M_s`: the row is listed
//! as skipped with that reason); `imagic` and `sdedit` edit the whole photo and are given a
//! full-white mask (`<row dir>/full-mask.png`), so their subject fidelity is the whole image's
//! and they have no background fidelity.
//!
//! Layout under `out`: `<row index>-<image stem>/<method>/` holds what `layerdiff edit` writes
//! (`edit-<seed>.png`, `session.json`, `sheet.png`, ...) and `scores.csv` (every metric per
//! seed); `<row dir>/sheet-all.png` shows the input and every method's outputs. A (row, method)
//! whose `edit-<seed>.png` all exist is not edited again (resume); an interrupted one is redone
//! from its start. `results.csv` (`results-shard-K-of-N.csv` for a shard) holds every scored
//! output, `skipped.csv` (`skipped-shard-K-of-N.csv`) the skipped rows and why, and
//! `summary.md` (unsharded runs, and [`summarize`] over a folder of shards) the mean of each
//! metric per method.

use super::metrics::{Scorer, ScorerOptions};
use super::score::{csv_field, score_folder, ScoreRequest, ScoredImage};
use crate::error::{bad_input, io_err, Result};
use crate::image_io::{self, save_png_atomic, write_atomic};
use crate::method::edit::{self as method_edit, BackgroundSource, EditRequest, Progress};
use crate::method::EditSettings;
use crate::pipeline::StableDiffusion;
use crate::segment::{segment_to_files, Point, Prompt, SegmentOptions, Segmenter};
use crate::sources::{ModelFiles, SourceOptions};
use candle_core::{DType, Device};
use image::{GrayImage, Luma};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// One manifest row.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestRow {
    /// The photo, relative to the images folder.
    pub img_name: String,
    /// The full target text `T`: what the CLIP score compares with.
    pub target_text: String,
    /// `T_o`; `None`: the target text.
    pub object: Option<String>,
    /// `T_b`; `None`: the target text.
    pub background: Option<String>,
    /// A click on the subject, for Segment Anything.
    pub point: Option<[f32; 2]>,
    /// A box around the subject, for Segment Anything.
    pub bbox: Option<[f32; 4]>,
    /// The subject mask, relative to the images folder.
    pub mask: Option<PathBuf>,
}

impl ManifestRow {
    /// The row's folder name: `<index>-<image stem>`.
    pub fn dir_name(&self, index: usize) -> String {
        let stem = Path::new(&self.img_name).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let stem: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
        format!("{index}-{stem}")
    }

    fn has_subject(&self) -> bool {
        self.mask.is_some() || self.point.is_some() || self.bbox.is_some()
    }
}

/// Reads a manifest; a file that is not a JSON list, or a row without `img_name` or
/// `target_text` (or with a key of the wrong type), is a one-line error naming the row.
pub fn read_manifest(path: &Path) -> Result<Vec<ManifestRow>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let fix = "give a JSON list of {\"img_name\": ..., \"target_text\": ...} rows, as TEdBench's input_list.json";
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad_input(path.display(), format!("not JSON ({e})"), fix))?;
    let serde_json::Value::Array(rows) = value else {
        return Err(bad_input(path.display(), "not a JSON list", fix));
    };
    rows.iter().enumerate().map(|(i, row)| parse_row(path, i, row)).collect()
}

fn parse_row(path: &Path, i: usize, row: &serde_json::Value) -> Result<ManifestRow> {
    let err = |problem: String| bad_input(format!("{} row {i}", path.display()), problem, "each row needs \"img_name\" and \"target_text\" strings; \"object\", \"background\", \"mask\" strings, \"point\" [x, y] and \"box\" [x0, y0, x1, y1] are optional");
    let Some(obj) = row.as_object() else {
        return Err(err("not a JSON object".into()));
    };
    let string = |key: &str, required: bool| -> Result<Option<String>> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) if required => Err(err(format!("missing key `{key}`"))),
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) if required && s.trim().is_empty() => Err(err(format!("`{key}` is empty"))),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(err(format!("`{key}` is not a string"))),
        }
    };
    let numbers = |key: &str, n: usize| -> Result<Option<Vec<f32>>> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Array(a)) if a.len() == n && a.iter().all(|v| v.is_number()) => {
                Ok(Some(a.iter().map(|v| v.as_f64().unwrap_or_default() as f32).collect()))
            }
            Some(_) => Err(err(format!("`{key}` is not a list of {n} numbers"))),
        }
    };
    let row = ManifestRow {
        img_name: string("img_name", true)?.unwrap_or_default(),
        target_text: string("target_text", true)?.unwrap_or_default(),
        object: string("object", false)?,
        background: string("background", false)?,
        point: numbers("point", 2)?.map(|v| [v[0], v[1]]),
        bbox: numbers("box", 4)?.map(|v| [v[0], v[1], v[2], v[3]]),
        mask: string("mask", false)?.map(PathBuf::from),
    };
    if row.mask.is_some() && (row.point.is_some() || row.bbox.is_some()) {
        return Err(err("`mask` with `point`/`box`".into()));
    }
    Ok(row)
}

/// `--shard K/N`: the rows whose index mod N is K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn contains(&self, row: usize) -> bool {
        row % self.count == self.index
    }
}

impl FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}` is not a shard; give K/N with 0 <= K < N, e.g. 0/4 (Slurm: $SLURM_ARRAY_TASK_ID/$N)");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The methods a batch compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BatchMethod {
    Layerdiffusion,
    Imagic,
    Sdedit,
}

impl BatchMethod {
    /// The name of its folder and CSV cells, as `session.json` names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Layerdiffusion => "layerdiffusion",
            Self::Imagic => "imagic",
            Self::Sdedit => "sdedit",
        }
    }
}

/// A batch: where everything comes from and goes, and the edit settings of each method.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    /// The Stable Diffusion model: a folder, a single file or a hub id.
    pub model: String,
    pub manifest: PathBuf,
    /// The folder the manifest's `img_name` and `mask` are relative to.
    pub images: PathBuf,
    pub methods: Vec<BatchMethod>,
    pub seeds: Vec<u64>,
    pub size: u32,
    pub train_seed: u64,
    /// `Keep` or `Generated` (a user's picture per row is not supported).
    pub background_source: BackgroundSource,
    /// LayerDiffusion's and SDEdit's settings.
    pub settings: EditSettings,
    /// Imagic's settings (`baselines::imagic_settings` with the same overrides).
    pub imagic_settings: EditSettings,
    /// SDEdit's strength.
    pub strength: f64,
    pub shard: Option<Shard>,
    pub out: PathBuf,
    /// The Segment Anything checkpoint, for rows with `point` or `box`.
    pub sam_model: String,
    /// The metric models (its `device` and `source` are used for them).
    pub scorer: ScorerOptions,
    /// Where the SD and SAM weights come from.
    pub source: SourceOptions,
    pub device: Device,
    pub dtype: DType,
}

/// A row (or one method of it) that was not edited, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub row: usize,
    pub img_name: String,
    /// `None`: every method.
    pub method: Option<String>,
    pub reason: String,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct BatchReport {
    /// (row, method) pairs edited in this run.
    pub edited: usize,
    /// (row, method) pairs already complete (resume).
    pub already_done: usize,
    pub skipped: Vec<Skipped>,
    /// Outputs in the results CSV.
    pub scored: usize,
    pub results_csv: PathBuf,
    /// `None` for a shard: run [`summarize`] over the folder when every shard is done.
    pub summary: Option<PathBuf>,
}

/// The results CSV's columns: the row and its photo, then [`ScoredImage::CSV_HEADER`].
pub fn results_header() -> String {
    format!("row,img_name,{}", ScoredImage::CSV_HEADER)
}

const SKIPPED_HEADER: &str = "row,img_name,method,reason";

/// `results.csv` or `results-shard-K-of-N.csv` (and the same for `skipped`).
fn shard_file(stem: &str, shard: Option<Shard>) -> String {
    match shard {
        None => format!("{stem}.csv"),
        Some(s) => format!("{stem}-shard-{}-of-{}.csv", s.index, s.count),
    }
}

/// The models, loaded on first use: a resumed batch with nothing left to do loads none.
struct Models<'a> {
    req: &'a BatchRequest,
    sd: Option<(ModelFiles, StableDiffusion)>,
    sam: Option<Segmenter>,
    scorer: Option<Scorer>,
}

impl Models<'_> {
    /// The pipeline, with its UNet (an edit before released it, in its stage 2).
    fn sd(&mut self) -> Result<(&ModelFiles, &mut StableDiffusion)> {
        if self.sd.is_none() {
            let files = ModelFiles::resolve(&self.req.model, &self.req.source)?;
            let sd = StableDiffusion::load(&files, &self.req.device, self.req.dtype)?;
            self.sd = Some((files, sd));
        }
        let (files, sd) = self.sd.as_mut().expect("loaded above");
        sd.reload_unet(files)?;
        Ok((files, sd))
    }

    fn sam(&mut self) -> Result<&Segmenter> {
        if self.sam.is_none() {
            self.sam = Some(Segmenter::load(&self.req.sam_model, &self.req.source, &self.req.device)?);
        }
        Ok(self.sam.as_ref().expect("loaded above"))
    }

    fn scorer(&mut self) -> Result<&Scorer> {
        if self.scorer.is_none() {
            self.scorer = Some(Scorer::load(&self.req.scorer)?);
        }
        Ok(self.scorer.as_ref().expect("loaded above"))
    }
}

/// Runs the batch: edits what is not done yet, scores it, and writes the results CSV, the
/// skipped rows, the contact sheets and (unsharded) `summary.md` after every row. `report`
/// gets one line per event (a row started, skipped, done).
pub fn run_batch(req: &BatchRequest, progress: &mut dyn Progress, report: &mut dyn FnMut(String)) -> Result<BatchReport> {
    // 1. check inputs
    let rows = read_manifest(&req.manifest)?;
    if req.methods.is_empty() {
        return Err(bad_input("--method", "no method", "give layerdiffusion, imagic and/or sdedit"));
    }
    if req.seeds.is_empty() {
        return Err(bad_input("--seeds", "no seed", "give --seeds 1,2,3"));
    }
    if !req.images.is_dir() {
        return Err(bad_input(format!("--images {}", req.images.display()), "not a folder", "give the folder the manifest's img_name are relative to"));
    }
    if matches!(req.background_source, BackgroundSource::Image { .. }) {
        return Err(bad_input("--background-source image", "not supported by batch", "use keep or generated"));
    }
    std::fs::create_dir_all(&req.out).map_err(io_err(&req.out))?;
    let results_csv = req.out.join(shard_file("results", req.shard));
    let skipped_csv = req.out.join(shard_file("skipped", req.shard));

    // 2. the rows, one after the other; the CSVs and the summary after each
    let mut models = Models { req, sd: None, sam: None, scorer: None };
    let mut out = BatchReport { results_csv: results_csv.clone(), ..Default::default() };
    let summary = req.shard.is_none().then(|| req.out.join("summary.md"));
    let mut results: Vec<Vec<String>> = Vec::new();
    let write_all = |results: &[Vec<String>], skipped: &[Skipped]| -> Result<()> {
        write_results(&results_csv, results)?;
        write_skipped(&skipped_csv, skipped)?;
        if let Some(path) = &summary {
            let md = summary_markdown(&parse_results(results)?, skipped, std::slice::from_ref(&results_csv));
            write_atomic(path, md.as_bytes())?;
        }
        Ok(())
    };
    for (index, row) in rows.iter().enumerate() {
        if req.shard.is_some_and(|s| !s.contains(index)) {
            continue;
        }
        report(format!("row {index}: {} \"{}\"", row.img_name, row.target_text));
        run_row(req, &mut models, index, row, progress, report, &mut out, &mut results)?;
        write_all(&results, &out.skipped)?;
    }
    write_all(&results, &out.skipped)?;
    out.scored = results.len();
    out.summary = summary.clone();
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn run_row(
    req: &BatchRequest,
    models: &mut Models,
    index: usize,
    row: &ManifestRow,
    progress: &mut dyn Progress,
    report: &mut dyn FnMut(String),
    out: &mut BatchReport,
    results: &mut Vec<Vec<String>>,
) -> Result<()> {
    let row_dir = req.out.join(row.dir_name(index));
    let skip = |method: Option<BatchMethod>, reason: String| Skipped { row: index, img_name: row.img_name.clone(), method: method.map(|m| m.name().to_string()), reason };
    // a. the photo
    let image = req.images.join(&row.img_name);
    if !image.is_file() {
        let s = skip(None, format!("image not found: {}", image.display()));
        report(format!("row {index}: skipped, {}", s.reason));
        out.skipped.push(s);
        return Ok(());
    }
    let done = |m: BatchMethod| req.seeds.iter().all(|s| row_dir.join(m.name()).join(format!("edit-{s}.png")).is_file());
    let mut todo = Vec::new();
    for &m in &req.methods {
        if m == BatchMethod::Layerdiffusion && !row.has_subject() {
            let s = skip(Some(m), "no mask, point or box: layerdiffusion needs the subject's mask".into());
            report(format!("row {index}: {} skipped, {}", m.name(), s.reason));
            out.skipped.push(s);
        } else if done(m) {
            out.already_done += 1;
            report(format!("row {index}: {} already done", m.name()));
        } else {
            todo.push(m);
        }
    }

    // b. the subject mask, when a method still needs it
    let mut mask = None;
    if !todo.is_empty() {
        std::fs::create_dir_all(&row_dir).map_err(io_err(&row_dir))?;
        match row_mask(req, models, row, &image, &row_dir, progress) {
            Ok(m) => mask = Some(m),
            Err(e) => {
                for &m in &todo {
                    let s = skip(Some(m), format!("no subject mask: {e}"));
                    report(format!("row {index}: {} skipped, {}", m.name(), s.reason));
                    out.skipped.push(s);
                }
                todo.clear();
            }
        }
    }

    // c. the edits
    let mut edited_now = BTreeSet::new();
    for &m in &todo {
        let dir = row_dir.join(m.name());
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let request = EditRequest {
            image: image.clone(),
            mask: mask.clone().expect("made above"),
            object: row.object.clone().unwrap_or_else(|| row.target_text.clone()),
            background: row.background.clone().unwrap_or_else(|| row.target_text.clone()),
            prompt: Some(row.target_text.clone()),
            background_source: req.background_source.clone(),
            size: req.size,
            seeds: req.seeds.clone(),
            train_seed: req.train_seed,
            settings: if m == BatchMethod::Imagic { req.imagic_settings.clone() } else { req.settings.clone() },
            checkpoint_every: 50,
        };
        let (files, sd) = models.sd()?;
        let result = match m {
            BatchMethod::Layerdiffusion => method_edit::edit(sd, files, &request, &dir, false, progress).map(|_| ()),
            BatchMethod::Imagic => crate::baselines::imagic(sd, files, &request, &dir, progress).map(|_| ()),
            BatchMethod::Sdedit => crate::baselines::sdedit(sd, files, &request, req.strength, &dir, progress).map(|_| ()),
        };
        match result {
            Ok(()) => {
                out.edited += 1;
                edited_now.insert(m);
                report(format!("row {index}: {} edited", m.name()));
            }
            Err(e) => {
                let s = skip(Some(m), format!("edit failed: {e}"));
                report(format!("row {index}: {} skipped, {}", m.name(), s.reason));
                out.skipped.push(s);
            }
        }
    }

    // d. scores: each complete (row, method) into its scores.csv, then into the results
    for &m in &req.methods {
        let dir = row_dir.join(m.name());
        if !done(m) {
            continue;
        }
        let scores = dir.join("scores.csv");
        if edited_now.contains(&m) || !scores.is_file() {
            let request = ScoreRequest { images: vec![dir.clone()], ..Default::default() };
            score_folder(models.scorer()?, &request, &scores, &mut |_, _| {})?;
        }
        let text = std::fs::read_to_string(&scores).map_err(io_err(&scores))?;
        let records = parse_csv(&text).map_err(|e| bad_input(scores.display(), e, "delete it to score that folder again"))?;
        let wanted: BTreeSet<String> = req.seeds.iter().map(u64::to_string).collect();
        for record in records.into_iter().skip(1).filter(|r| r.len() > 2 && wanted.contains(&r[2])) {
            let mut line = vec![index.to_string(), row.img_name.clone()];
            line.extend(record);
            results.push(line);
        }
    }

    // e. the row's contact sheet: the input and every method's outputs
    let sheet = row_dir.join("sheet-all.png");
    if !edited_now.is_empty() || (!sheet.is_file() && req.methods.iter().any(|&m| done(m))) {
        let photo = image_io::load_rgb(&image)?;
        let mut items = vec![("input".to_string(), image_io::resize_center_crop(&photo, req.size, req.size).0)];
        for &m in &req.methods {
            for seed in &req.seeds {
                if let Ok(img) = image_io::load_rgb(&row_dir.join(m.name()).join(format!("edit-{seed}.png"))) {
                    items.push((format!("{} {seed}", m.name()), img));
                }
            }
        }
        save_png_atomic(&image_io::contact_sheet(&items, req.size.clamp(64, 256)), &sheet)?;
    }
    Ok(())
}

/// The row's subject mask: its `mask`, Segment Anything's from its `point`/`box` (made once,
/// `sam-mask.png`), or a full-white one (`full-mask.png`, for the whole-photo baselines).
fn row_mask(req: &BatchRequest, models: &mut Models, row: &ManifestRow, image: &Path, row_dir: &Path, progress: &mut dyn Progress) -> Result<PathBuf> {
    if let Some(mask) = &row.mask {
        let path = req.images.join(mask);
        if !path.is_file() {
            return Err(bad_input(path.display(), "mask not found", "fix the row's \"mask\" (relative to --images)"));
        }
        return Ok(path);
    }
    if row.point.is_some() || row.bbox.is_some() {
        let path = row_dir.join("sam-mask.png");
        if !path.is_file() {
            let prompt = Prompt { points: row.point.iter().map(|&[x, y]| Point { x, y, foreground: true }).collect(), bbox: row.bbox };
            prompt.validate(image_io::dimensions(image)?, "")?;
            segment_to_files(models.sam()?, image, &prompt, "", &SegmentOptions::default(), &path, progress)?;
        }
        return Ok(path);
    }
    let path = row_dir.join("full-mask.png");
    if !path.is_file() {
        let (w, h) = image_io::dimensions(image)?;
        save_png_atomic(&image_io::gray_to_rgb(&GrayImage::from_pixel(w, h, Luma([255]))), &path)?;
    }
    Ok(path)
}

fn write_results(path: &Path, rows: &[Vec<String>]) -> Result<()> {
    let mut text = results_header();
    text.push('\n');
    for row in rows {
        text.push_str(&row.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(","));
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

fn write_skipped(path: &Path, skipped: &[Skipped]) -> Result<()> {
    let mut text = format!("{SKIPPED_HEADER}\n");
    for s in skipped {
        text.push_str(&format!("{},{},{},{}\n", s.row, csv_field(&s.img_name), csv_field(s.method.as_deref().unwrap_or("")), csv_field(&s.reason)));
    }
    write_atomic(path, text.as_bytes())
}

/// RFC 4180 records: quoted cells may hold commas, doubled quotes and line breaks.
pub fn parse_csv(text: &str) -> std::result::Result<Vec<Vec<String>>, String> {
    let (mut records, mut record, mut cell) = (Vec::new(), Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') if cell.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut cell)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut cell));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => cell.push(c),
        }
    }
    if quoted {
        return Err("a quoted cell is not closed".into());
    }
    if !cell.is_empty() || !record.is_empty() {
        record.push(cell);
        records.push(record);
    }
    Ok(records)
}

/// One line of a results CSV, by column name.
#[derive(Debug, Clone)]
pub struct ResultRow {
    pub row: usize,
    pub img_name: String,
    pub method: String,
    pub seed: String,
    /// Metric column name to value (empty cells left out).
    pub metrics: BTreeMap<String, f64>,
}

/// The metric columns of the summary table, in order, with their titles.
pub const SUMMARY_COLUMNS: [(&str, &str); 8] = [
    ("clip_score", "CLIP score"),
    ("clip_score_x100", "CLIP score x100"),
    ("subject_clip", "subject CLIP"),
    ("subject_dino", "subject DINO"),
    ("background_clip", "background CLIP"),
    ("background_dino", "background DINO"),
    ("image_clip", "image CLIP"),
    ("image_dino", "image DINO"),
];

fn parse_results(records: &[Vec<String>]) -> Result<Vec<ResultRow>> {
    let header: Vec<String> = results_header().split(',').map(str::to_string).collect();
    records.iter().map(|r| result_row(&header, r, "results")).collect()
}

fn result_row(header: &[String], record: &[String], what: &str) -> Result<ResultRow> {
    let get = |name: &str| header.iter().position(|h| h == name).and_then(|i| record.get(i)).cloned().unwrap_or_default();
    let row = get("row").parse().map_err(|_| bad_input(what, format!("`{}` is not a row index", get("row")), "give a results CSV of `layerdiff batch`"))?;
    let metrics = SUMMARY_COLUMNS.iter().filter_map(|(name, _)| get(name).parse::<f64>().ok().map(|v| (name.to_string(), v))).collect();
    Ok(ResultRow { row, img_name: get("img_name"), method: get("method"), seed: get("seed"), metrics })
}

/// `summary.md`: per method the mean of each metric over its outputs (a metric's mean over
/// the outputs it applies to; "-" where none), then the skipped rows. Sorted, so the merged
/// shards of a batch give the same file as the unsharded run but for the sources line.
pub fn summary_markdown(results: &[ResultRow], skipped: &[Skipped], sources: &[PathBuf]) -> String {
    let mut sorted: Vec<&ResultRow> = results.iter().collect();
    sorted.sort_by(|a, b| (a.row, &a.method, &a.seed).cmp(&(b.row, &b.method, &b.seed)));
    let mut by_method: BTreeMap<&str, Vec<&ResultRow>> = BTreeMap::new();
    for r in sorted {
        by_method.entry(r.method.as_str()).or_default().push(r);
    }
    let rows: BTreeSet<usize> = results.iter().map(|r| r.row).collect();
    let names: Vec<String> = sources.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect();
    let mut md = String::from("# Batch summary\n\n");
    md.push_str(&format!("{} scored outputs of {} rows, from {}.\n\n", results.len(), rows.len(), names.join(", ")));
    md.push_str("Means per method. CLIP score: the cosine of the output's CLIP image embedding and its target text's (the paper's 0.35); x100: max(100 cosine, 0) per output, as torchmetrics, then the mean. Subject / background / image: the cosine with the input photo's subject crop, its background and the whole photo, in CLIP and DINOv2 spaces.\n\n");
    md.push_str("| method | outputs |");
    for (_, title) in SUMMARY_COLUMNS {
        md.push_str(&format!(" {title} |"));
    }
    md.push_str("\n|---|---:|");
    md.push_str(&"---:|".repeat(SUMMARY_COLUMNS.len()));
    md.push('\n');
    for (method, outputs) in &by_method {
        md.push_str(&format!("| {method} | {} |", outputs.len()));
        for (name, _) in SUMMARY_COLUMNS {
            let values: Vec<f64> = outputs.iter().filter_map(|r| r.metrics.get(name).copied()).collect();
            if values.is_empty() {
                md.push_str(" - |");
            } else {
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                md.push_str(&if name == "clip_score_x100" { format!(" {mean:.2} |") } else { format!(" {mean:.4} |") });
            }
        }
        md.push('\n');
    }
    md.push_str("\n## Skipped\n\n");
    if skipped.is_empty() {
        md.push_str("None.\n");
    }
    let mut skipped = skipped.to_vec();
    skipped.sort_by(|a, b| (a.row, &a.method).cmp(&(b.row, &b.method)));
    for s in &skipped {
        let what = s.method.clone().unwrap_or_else(|| "every method".into());
        md.push_str(&format!("- row {} ({}), {what}: {}\n", s.row, s.img_name, s.reason.replace('\n', " ")));
    }
    md
}

/// `layerdiff batch --summarize`: merges every `results*.csv` and `skipped*.csv` in `dir` (the
/// shards of one batch; a (row, method, seed) seen twice counts once, a skip is dropped when
/// another file has that row's results) into `dir/summary.md`. Needs no model.
pub fn summarize(dir: &Path) -> Result<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    files.sort();
    let name = |p: &PathBuf| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let result_files: Vec<PathBuf> = files.iter().filter(|p| name(p).starts_with("results")).cloned().collect();
    if result_files.is_empty() {
        return Err(bad_input(dir.display(), "holds no results*.csv", "give the --out folder of `layerdiff batch` runs"));
    }
    let mut merged: BTreeMap<(usize, String, String), ResultRow> = BTreeMap::new();
    for path in &result_files {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let records = parse_csv(&text).map_err(|e| bad_input(path.display(), e, "give a results CSV of `layerdiff batch`"))?;
        let Some((header, rest)) = records.split_first() else { continue };
        if !header.iter().any(|h| h == "row") || !header.iter().any(|h| h == "clip_score") {
            return Err(bad_input(path.display(), "not a results CSV (no row and clip_score columns)", "give the --out folder of `layerdiff batch` runs"));
        }
        for record in rest {
            let r = result_row(header, record, &path.display().to_string())?;
            merged.insert((r.row, r.method.clone(), r.seed.clone()), r);
        }
    }
    let done: BTreeSet<(usize, String)> = merged.keys().map(|(row, m, _)| (*row, m.clone())).collect();
    let mut skipped: BTreeMap<(usize, Option<String>), Skipped> = BTreeMap::new();
    for path in files.iter().filter(|p| name(p).starts_with("skipped")) {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let records = parse_csv(&text).map_err(|e| bad_input(path.display(), e, "delete it"))?;
        for r in records.iter().skip(1).filter(|r| r.len() >= 4) {
            let Ok(row) = r[0].parse::<usize>() else { continue };
            let method = (!r[2].is_empty()).then(|| r[2].clone());
            if method.as_ref().is_some_and(|m| done.contains(&(row, m.clone()))) {
                continue;
            }
            skipped.insert((row, method.clone()), Skipped { row, img_name: r[1].clone(), method, reason: r[3].clone() });
        }
    }
    let results: Vec<ResultRow> = merged.into_values().collect();
    let skipped: Vec<Skipped> = skipped.into_values().collect();
    let path = dir.join("summary.md");
    write_atomic(&path, summary_markdown(&results, &skipped, &result_files).as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_partition() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!((0..7).filter(|&i| s.contains(i)).collect::<Vec<_>>(), [1, 4]);
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn csv_round_trips_quotes_and_commas() {
        let line = ["a", "b, \"c\"", "", "d\ne"].iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(",");
        assert_eq!(parse_csv(&format!("x,y\n{line}\n")).unwrap(), vec![vec!["x", "y"], vec!["a", "b, \"c\"", "", "d\ne"]]);
    }

    #[test]
    fn manifest_errors_name_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        let check = |json: &str, want: &str| {
            std::fs::write(&path, json).unwrap();
            let e = read_manifest(&path).unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{e}");
        };
        check("{\"img_name\": \"a.png\"}", "not a JSON list");
        check("[{\"img_name\": \"a.png\", \"target_text\": \"t\"}, {\"img_name\": \"b.png\"}]", "row 1: missing key `target_text`");
        check("[{\"img_name\": \"a.png\", \"target_text\": \"t\", \"box\": [1, 2]}]", "row 0: `box`");
        std::fs::write(&path, "[{\"img_name\": \"a b.png\", \"target_text\": \"t\", \"point\": [1, 2]}]").unwrap();
        let rows = read_manifest(&path).unwrap();
        assert_eq!((rows[0].point, rows[0].dir_name(3).as_str()), (Some([1.0, 2.0]), "3-a_b"));
    }
}
