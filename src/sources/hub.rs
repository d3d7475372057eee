//! Hugging Face hub repos, fetched file by file through hf-hub into the cache layout that Python's
//! huggingface_hub shares (`<cache>/models--org--name/{blobs,refs,snapshots}`), so either tool
//! finds what the other downloaded.

use super::layout::{self, ModelRoot};
use super::{ModelFiles, SourceOptions};
use crate::error::{bad_input, Error, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};
use std::path::{Path, PathBuf};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Whether `spec` reads as `org/name`. Paths (`./x`, `/x`, `x.safetensors`) do not, so that a
/// mistyped path is reported as missing rather than looked up on the hub.
pub(crate) fn is_repo_id(spec: &str) -> bool {
    let Some((org, name)) = spec.split_once('/') else { return false };
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    part_ok(org) && part_ok(name) && !name.ends_with(".safetensors") && !layout::is_pickle(Path::new(name))
}

/// `HF_HUB_OFFLINE`, read as huggingface_hub reads it.
pub(crate) fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"))
}

pub(crate) fn token_from_env() -> Option<String> {
    non_empty(std::env::var("HF_TOKEN").ok())
}

pub(crate) fn resolve(id: &str, opts: &SourceOptions) -> Result<ModelFiles> {
    let repo = HubRepo::new(id, opts)?;
    layout::resolve(&repo, id, opts)
}

/// One file of a hub repo (`file` may be in a subfolder), from the cache or downloaded.
pub(crate) fn fetch_file(id: &str, file: &str, opts: &SourceOptions) -> Result<PathBuf> {
    let repo = HubRepo::new(id, opts)?;
    repo.fetch(file, false)?.ok_or_else(|| match &repo.online {
        Some(_) => bad_input(repo.display(file), format!("not in the repo at revision {}", repo.revision), "check the repo id and the file name"),
        None => {
            let (problem, fix) = repo.absence();
            bad_input(repo.display(file), problem, fix)
        }
    })
}

/// One repo at one revision, online or from the cache alone.
struct HubRepo {
    id: String,
    revision: String,
    /// `<cache>/models--org--name`.
    repo_dir: PathBuf,
    cache_dir: PathBuf,
    /// `None` offline.
    online: Option<Online>,
}

struct Online {
    api: ApiRepo,
    endpoint: String,
    has_token: bool,
}

impl HubRepo {
    fn new(id: &str, opts: &SourceOptions) -> Result<Self> {
        let revision = opts.revision.clone().unwrap_or_else(|| "main".into());
        let cache_dir = match &opts.cache_dir {
            Some(dir) => dir.clone(),
            None => default_cache_dir()?,
        };
        let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.clone());
        let repo_dir = cache_dir.join(repo.folder_name());
        let online = if opts.offline || offline_from_env() {
            None
        } else {
            let endpoint = opts
                .endpoint
                .clone()
                .or_else(|| non_empty(std::env::var("HF_ENDPOINT").ok()))
                .unwrap_or_else(|| DEFAULT_ENDPOINT.into());
            let endpoint = endpoint.trim_end_matches('/').to_string();
            let token = opts.token.clone().or_else(token_from_env).or_else(token_from_file);
            let has_token = token.is_some();
            let api = ApiBuilder::from_cache(hf_hub::Cache::new(cache_dir.clone()))
                .with_endpoint(endpoint.clone())
                .with_token(token)
                .build()
                .map_err(|e| bad_input(&endpoint, format!("cannot set up the hub client ({e})"), "check HF_ENDPOINT"))?;
            Some(Online { api: api.repo(repo), endpoint, has_token })
        };
        let hub = Self { id: id.to_string(), revision, repo_dir, cache_dir, online };
        if hub.online.is_none() && hub.snapshot().is_none() {
            return Err(bad_input(
                id,
                format!("not in the Hugging Face cache at {} and offline mode is on", hub.cache_dir.display()),
                format!("run once without HF_HUB_OFFLINE (or --offline), or download it with `huggingface-cli download {id}`"),
            ));
        }
        Ok(hub)
    }

    /// The cached snapshot folder of the revision: the commit that `refs/<revision>` names, or
    /// the revision itself when it is a commit hash.
    fn snapshot(&self) -> Option<PathBuf> {
        let commit = std::fs::read_to_string(self.repo_dir.join("refs").join(&self.revision))
            .map(|c| c.trim().to_string())
            .unwrap_or_else(|_| self.revision.clone());
        let dir = self.repo_dir.join("snapshots").join(commit);
        dir.is_dir().then_some(dir)
    }

    /// A one-line error for a failed download of `file`.
    fn download_error(&self, online: &Online, file: &str, e: ApiError) -> Error {
        let input = self.display(file);
        match (&e, http_status(&e)) {
            (_, Some(401 | 403)) if online.has_token => bad_input(
                &self.id,
                "the hub refused the token",
                "check the token (HF_TOKEN or the one `huggingface-cli login` saved) and that it may read this repo",
            ),
            (_, Some(401 | 403)) => bad_input(
                &self.id,
                "the hub refused access: the repo is gated, private or does not exist",
                "check the id; for a gated or private repo accept its terms on the hub, then give an access \
                 token: set HF_TOKEN or run `huggingface-cli login`",
            ),
            (_, Some(code)) => bad_input(input, format!("the hub answered HTTP {code}"), "try again later, or use the cache with HF_HUB_OFFLINE=1"),
            (ApiError::RequestError(_), None) => bad_input(
                &online.endpoint,
                format!("cannot reach the hub ({})", one_line(&e)),
                "check the network or HF_ENDPOINT, or use the cache with HF_HUB_OFFLINE=1",
            ),
            (ApiError::IoError(_), _) | (ApiError::LockAcquisition(_), _) => bad_input(
                input,
                format!("cannot write to the cache at {} ({})", self.cache_dir.display(), one_line(&e)),
                "check its permissions and free space, or set HF_HOME",
            ),
            _ => bad_input(input, format!("download failed ({})", one_line(&e)), "try again; check HF_ENDPOINT if it is set"),
        }
    }

    /// `file` from the cache, else downloaded; `None` when the hub has no such file, or, for an
    /// `optional` one, when the hub cannot be reached.
    fn fetch(&self, file: &str, optional: bool) -> Result<Option<PathBuf>> {
        // The cache first, so that a downloaded model loads without the network.
        if let Some(path) = self.snapshot().map(|s| s.join(file)).filter(|p| p.exists()) {
            return Ok(Some(path));
        }
        let Some(online) = &self.online else { return Ok(None) };
        match online.api.download(file) {
            Ok(path) => Ok(Some(path)),
            Err(e) => match http_status(&e) {
                Some(404) => Ok(None),
                None if optional && matches!(e, ApiError::RequestError(_)) => Ok(None),
                _ => Err(self.download_error(online, file, e)),
            },
        }
    }
}

impl ModelRoot for HubRepo {
    fn find(&self, file: &str) -> Result<Option<PathBuf>> {
        self.fetch(file, false)
    }

    fn find_optional(&self, file: &str) -> Result<Option<PathBuf>> {
        self.fetch(file, true)
    }

    fn display(&self, file: &str) -> String {
        format!("{}/{file}", self.id)
    }

    fn absence(&self) -> (String, String) {
        match &self.online {
            Some(_) => (
                format!("not in the repo at revision {}", self.revision),
                "check the repo id and revision: it must be a Stable Diffusion v1 model in diffusers layout \
                 (with .safetensors weights)"
                    .into(),
            ),
            None => (
                format!("not in the Hugging Face cache at {} and offline mode is on", self.cache_dir.display()),
                format!("run once without HF_HUB_OFFLINE (or --offline), or download it with `huggingface-cli download {}`", self.id),
            ),
        }
    }
}

/// The HTTP status of a failed request. hf-hub wraps ureq's error, whose message is
/// `<url>: status code <n>`; reading it there spares a direct dependency on ureq.
fn http_status(e: &ApiError) -> Option<u16> {
    let ApiError::RequestError(_) = e else { return None };
    let text = e.to_string();
    let (_, after) = text.rsplit_once("status code ")?;
    after.get(..3)?.parse().ok()
}

/// huggingface_hub's `HF_HOME`: `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> Result<PathBuf> {
    let env = |k: &str| non_empty(std::env::var(k).ok()).map(PathBuf::from);
    if let Some(home) = env("HF_HOME") {
        return Ok(home);
    }
    if let Some(xdg) = env("XDG_CACHE_HOME") {
        return Ok(xdg.join("huggingface"));
    }
    match env("HOME").or_else(|| env("USERPROFILE")) {
        Some(home) => Ok(home.join(".cache").join("huggingface")),
        None => Err(bad_input("HF_HOME", "not set, and there is no home folder to put the cache in", "set HF_HOME to a writable folder")),
    }
}

/// `$HF_HUB_CACHE`, else `$HF_HOME/hub`.
fn default_cache_dir() -> Result<PathBuf> {
    match non_empty(std::env::var("HF_HUB_CACHE").ok()) {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Ok(hf_home()?.join("hub")),
    }
}

/// The token `huggingface-cli login` saved: `$HF_TOKEN_PATH`, else `$HF_HOME/token`.
fn token_from_file() -> Option<String> {
    let path = match non_empty(std::env::var("HF_TOKEN_PATH").ok()) {
        Some(p) => PathBuf::from(p),
        None => hf_home().ok()?.join("token"),
    };
    non_empty(std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()))
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string().replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_told_from_paths() {
        for id in ["CompVis/stable-diffusion-v1-4", "runwayml/stable-diffusion-v1-5", "a-b/c_d.e"] {
            assert!(is_repo_id(id), "{id}");
        }
        for not in ["./nope", "/abs/missing", "nope", "a/b/c", "../x", "org/", "/x", "org/model.safetensors", "org/sd.ckpt", "org/a..b", "o rg/x"] {
            assert!(!is_repo_id(not), "{not}");
        }
    }
}
