//! A stand-in for the Hugging Face hub on 127.0.0.1: serves repos in the hub's URL layout
//! (`/{org}/{name}/resolve/{revision}/{file}`) with the headers hf-hub reads (`x-repo-commit`,
//! `etag`, and `content-range` for ranged requests), and stops when dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The commit every served revision resolves to.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A repo's files by path.
pub type RepoFiles = BTreeMap<String, Vec<u8>>;

/// The server gives up after this many requests, so a runaway client cannot keep a test alive.
const MAX_REQUESTS: usize = 1000;

pub struct HubServer {
    /// `http://127.0.0.1:<port>`, for `HF_ENDPOINT` or `SourceOptions::endpoint`.
    pub endpoint: String,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    /// Serves `repos` (repo id -> files) on an ephemeral port; with `token`, answers 401 to any
    /// request that does not bear it.
    pub fn start(repos: BTreeMap<String, RepoFiles>, token: Option<&str>) -> HubServer {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind 127.0.0.1"));
        let port = server.server_addr().to_ip().expect("an IP address").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (server, requests, stop) = (server.clone(), requests.clone(), stop.clone());
            let token = token.map(|t| format!("Bearer {t}"));
            std::thread::spawn(move || {
                let mut served = 0;
                while served < MAX_REQUESTS && !stop.load(Ordering::SeqCst) {
                    match server.recv_timeout(Duration::from_millis(50)) {
                        Ok(Some(request)) => {
                            served += 1;
                            requests.lock().unwrap().push(format!("{} {}", request.method(), request.url()));
                            respond(request, &repos, token.as_deref());
                        }
                        Ok(None) => {}
                        Err(_) => break,
                    }
                }
            })
        };
        HubServer { endpoint: format!("http://127.0.0.1:{port}"), requests, stop, server, thread: Some(thread) }
    }

    /// `METHOD /url` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn respond(request: tiny_http::Request, repos: &BTreeMap<String, RepoFiles>, token: Option<&str>) {
    let header = |name: &'static str| {
        request.headers().iter().find(|h| h.field.equiv(name)).map(|h| h.value.as_str().to_string())
    };
    let h = |k: &str, v: &str| tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).expect("valid header");
    if token.is_some() && header("Authorization").as_deref() != token {
        let _ = request.respond(tiny_http::Response::from_string("Invalid credentials").with_status_code(401));
        return;
    }
    let Some(data) = find(request.url(), repos) else {
        let not_found = tiny_http::Response::from_string("Entry not found")
            .with_status_code(404)
            .with_header(h("x-error-code", "EntryNotFound"));
        let _ = request.respond(not_found);
        return;
    };
    // hf-hub asks `bytes=0-0` for the metadata, then `bytes=<start>-` for the body.
    let len = data.len();
    let (start, end) = match header("Range").as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) {
        Some((s, e)) => (s.parse().unwrap_or(0), e.parse().unwrap_or(len - 1)),
        None => (0, len - 1),
    };
    let (start, end) = (start.min(len - 1), end.min(len - 1));
    let response = tiny_http::Response::from_data(data[start..=end].to_vec())
        .with_status_code(206)
        .with_header(h("Content-Range", &format!("bytes {start}-{end}/{len}")))
        .with_header(h("x-repo-commit", COMMIT))
        .with_header(h("ETag", &format!("\"{:016x}\"", fnv1a(data))));
    let _ = request.respond(response);
}

/// The served file for `/{org}/{name}/resolve/{revision}/{file}` at `main` or [`COMMIT`]
/// (never an empty one: it has no byte range to answer with).
fn find<'a>(url: &str, repos: &'a BTreeMap<String, RepoFiles>) -> Option<&'a Vec<u8>> {
    let mut parts = url.trim_start_matches('/').splitn(5, '/');
    let (org, name, resolve, revision, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if resolve != "resolve" || !(revision == "main" || revision == COMMIT) {
        return None;
    }
    repos.get(&format!("{org}/{name}"))?.get(file).filter(|d| !d.is_empty())
}

/// A content hash for the ETag, which hf-hub uses as the blob's file name.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}
