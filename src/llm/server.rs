//! Inference on a server that speaks the OpenAI chat-completions API — llama-server, vLLM,
//! SGLang — instead of llama.cpp in this process. One HTTP request per sample, carrying the
//! sample's own seed (so a sample does not depend on what else is in flight), streamed so that a
//! sample can end where seedflow ends it (the first code block closed) and the server stop work
//! on it. The server applies the model's chat template to the same turns the local backend
//! renders; each sample's mean log-probability comes from the API's `logprobs`.
//!
//! Adapters: llama-server serves the LoRA files it was started with (`--lora FILE`), chosen per
//! request (`"lora": [{"id", "scale"}]`, listed at `GET /lora-adapters`); vLLM loads a PEFT
//! directory at run time (`POST /v1/load_lora_adapter`) and serves it under its own model name.
//! seedflow asks the server which of the two it is by that listing.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{
    Cancelled, Generated, Generation, Inference, LlmError, Progress, Request, Sampled, Sampling, Timing, extract,
};

/// Tries of one request before its step fails: the first and three retries, 1, 2 and 4 s apart,
/// on a connection that fails or an answer of 5xx or 429 (the server busy or restarting).
const TRIES: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// How long a connection may take to open; a server that is up answers at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a model is served and how to reach it: a `model` declaration's `server` properties.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerSettings {
    pub endpoint: Endpoint,
    /// The model name to ask for; `None` takes the first the server lists.
    pub model: Option<String>,
    /// The environment variable holding the API key, if the server wants one.
    pub api_key_env: String,
    /// Most time one sample may take, its answer streamed in full.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// The API's base URLs as the user wrote them (`http://host:8080` or `…/v1`): servers of
    /// the same model, each sent `parallel` requests at a time.
    Urls(Vec<String>),
    /// llama-server, this binary, started by seedflow on the model's file.
    Spawn(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("the server at {url} cannot be reached: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the server at {url} refused the request ({status}): {message}")]
    Refused { url: String, status: u16, message: String },
    #[error("the server at {url} answered with something other than the API's JSON: {reason}")]
    Malformed { url: String, reason: String },
    #[error("{0}")]
    Adapter(String),
}

/// One server's endpoints and the adapters it has been asked to serve.
pub struct Server {
    url: String,
    settings: ServerSettings,
    agent: ureq::Agent,
    /// The API's root (`…/v1`) and the server's (for llama-server's own endpoints).
    api: String,
    root: String,
    served: Mutex<Option<String>>,
    /// The names of the PEFT adapters loaded into vLLM.
    loaded: Mutex<HashSet<String>>,
}

/// How a request names the adapter to apply.
enum Adapter {
    None,
    /// llama-server: the id of a file it was started with, and its scale.
    Llama {
        id: u64,
        scale: f32,
    },
    /// vLLM: the model name it serves the adapter under.
    Named(String),
}

impl Server {
    /// A client of the server at `url`, as `settings` say.
    pub fn new(url: &str, settings: ServerSettings) -> Server {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(settings.timeout))
            .build();
        let base = url.trim_end_matches('/');
        let (api, root) = match base.strip_suffix("/v1") {
            Some(root) => (base.to_string(), root.to_string()),
            None => (format!("{base}/v1"), base.to_string()),
        };
        Server {
            agent: config.into(),
            api,
            root,
            url: url.to_string(),
            settings,
            served: Mutex::new(None),
            loaded: Mutex::new(HashSet::new()),
        }
    }

    /// Whether the server answers `GET /health` with 200 (llama-server, vLLM, SGLang have it).
    pub fn healthy(&self) -> bool {
        self.agent.get(format!("{}/health", self.root)).call().is_ok_and(|r| r.status().as_u16() == 200)
    }

    fn unreachable(&self, reason: impl ToString) -> ServerError {
        ServerError::Unreachable { url: self.url.clone(), reason: reason.to_string() }
    }

    fn malformed(&self, reason: impl ToString) -> ServerError {
        ServerError::Malformed { url: self.url.clone(), reason: reason.to_string() }
    }

    /// Sends `body` (a GET when `None`) to `url`, retrying what a busy or restarting server
    /// answers (no connection, 5xx, 429); returns the first other response, or the last failure.
    fn send(
        &self,
        url: &str,
        body: Option<&Value>,
        stop: &AtomicBool,
    ) -> Result<ureq::http::Response<ureq::Body>, ServerError> {
        let key = std::env::var(&self.settings.api_key_env).ok().filter(|k| !k.is_empty());
        let authorization = key.map(|key| format!("Bearer {key}"));
        let mut backoff = FIRST_BACKOFF;
        for tries in 1.. {
            let sent = match (body, &authorization) {
                (Some(body), Some(auth)) => self
                    .agent
                    .post(url)
                    .header("content-type", "application/json")
                    .header("authorization", auth)
                    .send(body.to_string()),
                (Some(body), None) => {
                    self.agent.post(url).header("content-type", "application/json").send(body.to_string())
                }
                (None, Some(auth)) => self.agent.get(url).header("authorization", auth).call(),
                (None, None) => self.agent.get(url).call(),
            };
            let failure = match sent {
                Ok(response) if !retried(response.status().as_u16()) => return Ok(response),
                Ok(response) => {
                    let status = response.status().as_u16();
                    ServerError::Refused { url: self.url.clone(), status, message: error_message(response) }
                }
                Err(error) => self.unreachable(error),
            };
            if tries >= TRIES || !wait(backoff, stop) {
                return Err(failure);
            }
            backoff *= 2;
        }
        unreachable!("the loop returns")
    }

    /// A response's JSON, or the server's reason for refusing.
    fn json(&self, response: ureq::http::Response<ureq::Body>) -> Result<Value, ServerError> {
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(ServerError::Refused { url: self.url.clone(), status, message: error_message(response) });
        }
        let text = response.into_body().read_to_string().map_err(|e| self.unreachable(e))?;
        serde_json::from_str(&text).map_err(|e| self.malformed(e))
    }

    /// The model name requests ask for: the declared one, else the first the server lists.
    fn served_model(&self, stop: &AtomicBool) -> Result<String, ServerError> {
        if let Some(model) = &self.settings.model {
            return Ok(model.clone());
        }
        let mut served = self.served.lock().map_err(|_| self.unreachable("poisoned"))?;
        if let Some(model) = served.as_ref() {
            return Ok(model.clone());
        }
        let listing = self.json(self.send(&format!("{}/models", self.api), None, stop)?)?;
        let model = listing["data"][0]["id"]
            .as_str()
            .ok_or_else(|| self.malformed("`GET /v1/models` lists no model; name one with `server-model`"))?
            .to_string();
        *served = Some(model.clone());
        Ok(model)
    }

    /// How requests name the adapter at `path` (a GGUF LoRA file, with its PEFT export in
    /// `peft/` beside it when seedflow trained it).
    fn adapter(&self, adapter: Option<(&Path, f32)>, stop: &AtomicBool) -> Result<Adapter, ServerError> {
        let Some((path, scale)) = adapter else { return Ok(Adapter::None) };
        let file = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let listing = self.send(&format!("{}/lora-adapters", self.root), None, stop)?;
        if listing.status().as_u16() != 404 {
            // llama-server: the file must be one it was started with.
            let listed = self.json(listing)?;
            let same = |entry: &&Value| {
                entry["path"].as_str().is_some_and(|p| Path::new(p).canonicalize().is_ok_and(|p| p == file))
            };
            return match listed.as_array().and_then(|all| all.iter().find(same)) {
                Some(entry) => Ok(Adapter::Llama { id: entry["id"].as_u64().unwrap_or(0), scale }),
                None => Err(ServerError::Adapter(format!(
                    "llama-server at {} was not started with the adapter `{}`; it serves only the LoRA files given \
                     at its start (`--lora FILE --lora-init-without-apply`)",
                    self.url,
                    path.display()
                ))),
            };
        }
        // vLLM: load the PEFT directory under a name of its own, once.
        let peft = if path.is_dir() { path.to_path_buf() } else { path.with_file_name("peft") };
        if !peft.join("adapter_config.json").exists() {
            return Err(ServerError::Adapter(format!(
                "the server at {} loads adapters as PEFT directories, and `{}` has none beside it",
                self.url,
                path.display()
            )));
        }
        let peft = peft.canonicalize().unwrap_or(peft);
        // Named by its weights: an adapter trained again in the same place is another adapter,
        // which a name by its path would leave vLLM serving the old one under.
        let weights = std::fs::read(peft.join("adapter_model.safetensors")).unwrap_or_default();
        let name = format!("seedflow-{}", &format!("{:x}", Sha256::digest(&weights))[..16]);
        let mut loaded = self.loaded.lock().map_err(|_| self.unreachable("poisoned"))?;
        if loaded.contains(&name) {
            return Ok(Adapter::Named(name));
        }
        let body = json!({"lora_name": name, "lora_path": peft.to_string_lossy()});
        let response = self.send(&format!("{}/load_lora_adapter", self.api), Some(&body), stop)?;
        let status = response.status().as_u16();
        let message = if (200..300).contains(&status) { String::new() } else { error_message(response) };
        if !(200..300).contains(&status) && !message.contains("already been loaded") {
            return Err(ServerError::Adapter(format!(
                "the server at {} could not load the adapter `{}` ({status}): {message}; vLLM loads adapters at run \
                 time when started with `--enable-lora` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, from a directory it \
                 can read",
                self.url,
                peft.display()
            )));
        }
        loaded.insert(name.clone());
        Ok(Adapter::Named(name))
    }

    /// The request body for one sample.
    fn body(&self, model: &str, adapter: &Adapter, request: &Request, seed: u64, sampling: &Sampling) -> Value {
        let mut messages = Vec::new();
        for (user, assistant) in &request.examples {
            messages.push(json!({"role": "user", "content": user}));
            messages.push(json!({"role": "assistant", "content": assistant}));
        }
        messages.push(json!({"role": "user", "content": request.message}));
        let mut body = json!({
            "model": model,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            // llama-server also drops tokens below 5% of the likeliest's probability unless told
            // not to; the local backend samples from top-k and top-p alone.
            "min_p": 0.0,
            "max_tokens": sampling.max_tokens,
            "seed": seed,
            "logprobs": true,
            // llama-server sends log-probabilities only with at least one alternative.
            "top_logprobs": 1,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if !sampling.stop.is_empty() {
            body["stop"] = json!(sampling.stop);
        }
        match adapter {
            Adapter::None => {}
            Adapter::Llama { id, scale } => body["lora"] = json!([{"id": id, "scale": scale}]),
            Adapter::Named(name) => body["model"] = json!(name),
        }
        body
    }

    /// One sample, streamed; the connection is dropped (and the server stops) once the sample
    /// is complete by seedflow's rules.
    fn sample(&self, body: &Value, sampling: &Sampling, stop: &AtomicBool) -> Result<(Generated, u64), ServerError> {
        let url = format!("{}/chat/completions", self.api);
        let mut tries = 0;
        loop {
            tries += 1;
            let response = self.send(&url, Some(body), stop)?;
            let status = response.status().as_u16();
            if !(200..300).contains(&status) {
                return Err(ServerError::Refused { url: self.url.clone(), status, message: error_message(response) });
            }
            match self.read_stream(response, sampling, stop) {
                // A stream cut short by the connection: the same request again (same seed).
                Err(StreamError::Cut(reason)) => {
                    if tries >= TRIES || !wait(FIRST_BACKOFF, stop) {
                        return Err(self.unreachable(reason));
                    }
                }
                Err(StreamError::Malformed(reason)) => return Err(self.malformed(reason)),
                Err(StreamError::Refused(message)) => {
                    return Err(ServerError::Refused { url: self.url.clone(), status, message });
                }
                Ok(sample) => return Ok(sample),
            }
        }
    }

    /// Reads a streamed completion: its text, token log-probabilities and usage. Stops reading
    /// (which ends the server's work on it) once the generation stops.
    fn read_stream(
        &self,
        response: ureq::http::Response<ureq::Body>,
        sampling: &Sampling,
        stop: &AtomicBool,
    ) -> Result<(Generated, u64), StreamError> {
        let reader = BufReader::new(response.into_body().into_reader());
        let (mut text, mut logprobs, mut usage) = (String::new(), Vec::<f64>::new(), None);
        let mut finished = false;
        for line in reader.lines() {
            if stop.load(Ordering::Relaxed) {
                return Err(StreamError::Cut("stopped".into()));
            }
            let line = line.map_err(|e| StreamError::Cut(e.to_string()))?;
            let Some(data) = line.strip_prefix("data:") else { continue };
            let data = data.trim();
            if data == "[DONE]" {
                finished = true;
                break;
            }
            let chunk: Value = serde_json::from_str(data).map_err(|e| StreamError::Malformed(e.to_string()))?;
            if let Some(error) = chunk.get("error") {
                return Err(StreamError::Refused(error["message"].as_str().unwrap_or(&error.to_string()).to_string()));
            }
            if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
                usage = Some((u["prompt_tokens"].as_u64().unwrap_or(0), u["completion_tokens"].as_u64()));
            }
            let Some(choice) = chunk["choices"].get(0) else { continue };
            if let Some(piece) = choice["delta"]["content"].as_str() {
                text.push_str(piece);
            }
            if let Some(tokens) = choice["logprobs"]["content"].as_array() {
                logprobs.extend(tokens.iter().filter_map(|t| t["logprob"].as_f64()));
            }
            if sampling.stop_after_code && extract::first_block_closed(&text) {
                // Dropping the stream closes the connection, which ends the server's work on it.
                finished = true;
                usage = usage.map(|(prompt, _)| (prompt, None));
                break;
            }
        }
        if !finished {
            return Err(StreamError::Cut("the answer's stream ended before `[DONE]`".into()));
        }
        let (prompt_tokens, completion) = usage.unwrap_or((0, None));
        let tokens = completion.map_or(logprobs.len() as u64, |c| c.max(logprobs.len() as u64));
        // An empty answer has no token to score; 0 ranks it with the most certain.
        let mean_logprob = if logprobs.is_empty() { 0.0 } else { logprobs.iter().sum::<f64>() / logprobs.len() as f64 };
        Ok((Generated { text, tokens: tokens as u32, mean_logprob }, prompt_tokens))
    }
}

enum StreamError {
    Cut(String),
    Malformed(String),
    Refused(String),
}

/// Whether an answer with `status` is worth sending again: the server busy or restarting.
fn retried(status: u16) -> bool {
    status >= 500 || status == 429
}

/// Waits `time` unless the generation stops first; whether it waited.
fn wait(time: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + time;
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// The server's reason for an error answer: its JSON `error.message` where it gives one.
fn error_message(response: ureq::http::Response<ureq::Body>) -> String {
    error_text(&response.into_body().read_to_string().unwrap_or_default())
}

/// What a refusal's body says: the API's error message, or the start of the text.
fn error_text(text: &str) -> String {
    // A web server's or a proxy's error page: its title, not its markup.
    if text.trim_start().starts_with('<') {
        let title = text.split_once("<title>").and_then(|(_, rest)| rest.split_once("</title>"));
        return match title {
            Some((title, _)) => format!("an HTML page, \"{}\" (not the API)", title.trim()),
            None => "an HTML page (not the API)".into(),
        };
    }
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| {
            let error = v.get("error").unwrap_or(&v);
            error.get("message").and_then(Value::as_str).map(str::to_string)
        })
        .unwrap_or_else(|| text.chars().take(500).collect())
}

impl Inference for Server {
    fn generate(&self, work: &Generation<'_>, cancelled: &Cancelled, progress: &mut Progress) -> Sampled {
        generate_on(std::slice::from_ref(self), work, cancelled, progress)
    }
}

/// Servers of the same model: requests are spread over them, `parallel` in flight on each.
pub struct Fleet {
    servers: Vec<Server>,
}

impl Fleet {
    pub fn new(urls: &[String], settings: &ServerSettings) -> Fleet {
        Fleet { servers: urls.iter().map(|url| Server::new(url, settings.clone())).collect() }
    }
}

impl Inference for Fleet {
    fn generate(&self, work: &Generation<'_>, cancelled: &Cancelled, progress: &mut Progress) -> Sampled {
        generate_on(&self.servers, work, cancelled, progress)
    }
}

/// Samples `work` on `servers`: every sample is a job, and each server has `parallel` workers
/// taking the next job, so a faster server takes more of them.
fn generate_on(servers: &[Server], work: &Generation<'_>, cancelled: &Cancelled, progress: &mut Progress) -> Sampled {
    let start = Instant::now();
    let stop = AtomicBool::new(false);
    // How each server names the model and the adapter, asked before any sample is sent.
    let mut named = Vec::with_capacity(servers.len());
    for server in servers {
        named.push((server, server.served_model(&stop)?, server.adapter(work.adapter, &stop)?));
    }
    let jobs = Mutex::new(Jobs::new(work.requests));
    let mut slots: Vec<Vec<Option<Generated>>> = work.requests.iter().map(|r| vec![None; r.seeds.len()]).collect();
    let mut done: Vec<Vec<Generated>> = Vec::with_capacity(work.requests.len());
    let mut prompt_tokens = 0;
    let mut failure = None;
    let samples = work.requests.iter().map(|r| r.seeds.len()).sum::<usize>();
    let per_server = (work.settings.parallel as usize).clamp(1, samples.max(1));
    std::thread::scope(|scope| {
        let (sender, results) = mpsc::channel();
        for (server, model, adapter) in &named {
            for _ in 0..per_server {
                let sender = sender.clone();
                let (jobs, stop) = (&jobs, &stop);
                scope.spawn(move || {
                    let mut previous = None;
                    while !stop.load(Ordering::Relaxed) {
                        let Some((r, s)) = jobs.lock().unwrap_or_else(|e| e.into_inner()).next(previous) else { break };
                        previous = Some(r);
                        let request = &work.requests[r];
                        let body = server.body(model, adapter, request, request.seeds[s], work.sampling);
                        if sender.send((r, s, server.sample(&body, work.sampling, stop))).is_err() {
                            break;
                        }
                    }
                });
            }
        }
        drop(sender);
        loop {
            if cancelled() {
                stop.store(true, Ordering::Relaxed);
            }
            let (r, s, sample) = match results.recv_timeout(Duration::from_millis(100)) {
                Ok(result) => result,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            match sample {
                Ok((generated, prompt)) => {
                    prompt_tokens += prompt;
                    slots[r][s] = Some(generated);
                }
                Err(error) => {
                    stop.store(true, Ordering::Relaxed);
                    failure.get_or_insert(error);
                }
            }
            // Requests finished in order are handed on, as the local backend does.
            let before = done.len();
            while done.len() < slots.len() && slots[done.len()].iter().all(Option::is_some) {
                let finished = std::mem::take(&mut slots[done.len()]).into_iter().flatten().collect();
                done.push(finished);
            }
            if done.len() > before {
                progress(done.len(), &done[before..]);
            }
        }
    });
    if cancelled() {
        return Err(LlmError::Interrupted);
    }
    if let Some(error) = failure {
        return Err(error.into());
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok((done, Timing { prompt_tokens, generation_seconds: seconds, decoding_seconds: seconds }))
}

/// The samples still to send, handed out so that each worker stays with one task while it has
/// samples left. A server that keeps a slot's last prompt (llama-server's prompt cache) then
/// decodes a task's prompt once per worker that samples it rather than once per sample (the
/// local backend decodes it once per task).
struct Jobs {
    samples: Vec<usize>,
    started: Vec<usize>,
}

impl Jobs {
    fn new(requests: &[Request]) -> Jobs {
        Jobs { samples: requests.iter().map(|r| r.seeds.len()).collect(), started: vec![0; requests.len()] }
    }

    /// The next (request, sample) for a worker whose last sample was of request `previous`:
    /// another of that request if any is left, else the first request nobody has started
    /// (so the workers already on a request finish it), else the first with samples left.
    fn next(&mut self, previous: Option<usize>) -> Option<(usize, usize)> {
        let open = |r: &usize| self.started[*r] < self.samples[*r];
        let r = previous
            .filter(open)
            .or_else(|| (0..self.samples.len()).find(|&r| self.started[r] == 0 && self.samples[r] > 0))
            .or_else(|| (0..self.samples.len()).find(open))?;
        self.started[r] += 1;
        Some((r, self.started[r] - 1))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::llm::ModelSettings;

    /// What the fake server was asked: each request's line ("POST /v1/…") and body.
    type Asked = Arc<Mutex<Vec<(String, String)>>>;

    /// A server on 127.0.0.1 that answers the n-th connection with `answers[n]` (raw HTTP; none
    /// left: it reads the request and never answers). Returns its URL and what it was asked.
    fn fake(answers: Vec<String>) -> (String, Asked) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let asked: Asked = Arc::default();
        let record = asked.clone();
        std::thread::spawn(move || {
            let mut answers = answers.into_iter();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let (mut line, mut length) = (String::new(), 0);
                reader.read_line(&mut line).unwrap();
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                record.lock().unwrap().push((line.trim().to_string(), String::from_utf8(body).unwrap()));
                match answers.next() {
                    Some(answer) => {
                        let _ = stream.write_all(answer.as_bytes());
                    }
                    // Holds the connection open without a word until the client gives up.
                    None => std::thread::sleep(Duration::from_secs(30)),
                }
            }
        });
        (url, asked)
    }

    fn answer(status: &str, content_type: &str, body: &str) -> String {
        format!("HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\nconnection: close\r\n\r\n{body}")
    }

    /// A streamed completion of `pieces`, each one token with its log-probability.
    fn stream(pieces: &[(&str, f64)], prompt_tokens: u64) -> String {
        let mut body = String::new();
        let chunk = |choices: Value, usage: Value| json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": choices, "usage": usage});
        body += &format!(
            "data: {}\n\n",
            chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                Value::Null
            )
        );
        for (text, logprob) in pieces {
            let logprobs =
                json!({"content": [{"token": text, "logprob": logprob, "bytes": text.as_bytes(), "top_logprobs": []}]});
            body += &format!(
                "data: {}\n\n",
                chunk(
                    json!([{"index": 0, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null}]),
                    Value::Null
                )
            );
        }
        body += &format!(
            "data: {}\n\n",
            chunk(json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]), Value::Null)
        );
        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": pieces.len(), "total_tokens": prompt_tokens + pieces.len() as u64});
        body += &format!("data: {}\n\ndata: [DONE]\n\n", chunk(json!([]), usage));
        answer("200 OK", "text/event-stream", &body)
    }

    fn settings(url: &str, model: Option<&str>, timeout: Duration) -> ModelSettings {
        ModelSettings {
            path: "unused.gguf".into(),
            context: 0,
            gpu_layers: 0,
            threads: 0,
            batch: 512,
            parallel: 1,
            server: Some(ServerSettings {
                endpoint: Endpoint::Urls(vec![url.to_string()]),
                model: model.map(str::to_string),
                api_key_env: "SEEDFLOW_TEST_NO_KEY".into(),
                timeout,
            }),
        }
    }

    fn sample(
        settings: &ModelSettings,
        adapter: Option<(&Path, f32)>,
        stop_after_code: bool,
        seeds: &[u64],
    ) -> Result<Vec<Generated>, LlmError> {
        let server = settings.server.clone().unwrap();
        let Endpoint::Urls(urls) = server.endpoint.clone() else { unreachable!() };
        let requests = [Request {
            examples: vec![("an example".into(), "its answer".into())],
            message: "the task".into(),
            seeds: seeds.to_vec(),
        }];
        let sampling = Sampling {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            max_tokens: 64,
            stop: vec!["<END>".into()],
            stop_after_code,
        };
        let work = Generation { settings, adapter, requests: &requests, sampling: &sampling };
        Fleet::new(&urls, &server).generate(&work, &|| false, &mut |_, _| {}).map(|(mut out, _)| out.remove(0))
    }

    #[test]
    fn a_streamed_answer_is_read_with_its_log_probability_and_the_request_says_everything() {
        let (url, asked) = fake(vec![
            answer("200 OK", "application/json", r#"{"object":"list","data":[{"id":"served","object":"model"}]}"#),
            stream(&[("def", -0.5), (" f", -1.5)], 30),
        ]);
        let generated = sample(&settings(&url, None, Duration::from_secs(5)), None, false, &[7]).unwrap();
        assert_eq!(generated, [Generated { text: "def f".into(), tokens: 2, mean_logprob: -1.0 }]);
        let asked = asked.lock().unwrap();
        assert_eq!(asked[0].0, "GET /v1/models HTTP/1.1");
        assert_eq!(asked[1].0, "POST /v1/chat/completions HTTP/1.1");
        let body: Value = serde_json::from_str(&asked[1].1).unwrap();
        assert_eq!(body["model"], "served");
        assert_eq!(body["seed"], 7);
        assert_eq!(body["top_k"], 40);
        assert_eq!(body["min_p"], 0.0);
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(body["stop"], json!(["<END>"]));
        assert_eq!(body["logprobs"], true);
        assert_eq!(body["stream"], true);
        let roles: Vec<&str> =
            body["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["user", "assistant", "user"]);
        assert_eq!(body["messages"][2]["content"], "the task");
    }

    #[test]
    fn an_answer_ends_where_its_first_code_block_closes() {
        let pieces =
            [("```python\n", -0.1), ("x = 1\n", -0.1), ("```", -0.1), ("\nThis sets x.", -0.1), (" More.", -0.1)];
        let (url, _) = fake(vec![stream(&pieces, 10)]);
        let generated = sample(&settings(&url, Some("m"), Duration::from_secs(5)), None, true, &[1]).unwrap();
        assert_eq!(generated[0].text, "```python\nx = 1\n```");
        assert_eq!(generated[0].tokens, 3);
    }

    #[test]
    fn samples_are_spread_over_several_servers_in_request_order() {
        let answers = || (0..4).map(|i| stream(&[("answer", -0.1 * f64::from(i + 1))], 5)).collect();
        let ((first, asked_first), (second, asked_second)) = (fake(answers()), fake(answers()));
        let mut settings = settings(&first, Some("m"), Duration::from_secs(5));
        let urls = vec![first, second];
        settings.server.as_mut().unwrap().endpoint = Endpoint::Urls(urls.clone());
        let requests: Vec<Request> = (0..2)
            .map(|r| Request { examples: vec![], message: format!("task {r}"), seeds: vec![2 * r, 2 * r + 1] })
            .collect();
        let sampling =
            Sampling { temperature: 0.8, top_p: 0.95, top_k: 40, max_tokens: 8, stop: vec![], stop_after_code: false };
        let work = Generation { settings: &settings, adapter: None, requests: &requests, sampling: &sampling };
        let fleet = Fleet::new(&urls, settings.server.as_ref().unwrap());
        let (mut heard, mut finished) = (vec![], 0);
        let (samples, _) = fleet
            .generate(&work, &|| false, &mut |done, group| {
                heard.extend(group.iter().map(Vec::len));
                finished = done;
            })
            .unwrap();
        assert_eq!(samples.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2]);
        assert_eq!((heard, finished), (vec![2, 2], 2));
        let (a, b) = (asked_first.lock().unwrap().len(), asked_second.lock().unwrap().len());
        assert!(a >= 1 && b >= 1 && a + b == 4, "{a} and {b} of the 4 samples");
        // Every sample drawn once, on one server or the other.
        let seeds: Vec<u64> = [&asked_first, &asked_second]
            .iter()
            .flat_map(|asked| {
                asked
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(_, b)| serde_json::from_str::<Value>(b).unwrap()["seed"].as_u64().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(seeds.iter().collect::<HashSet<_>>().len(), 4);
    }

    #[test]
    fn a_worker_stays_with_its_task_and_a_free_worker_starts_a_task_nobody_has() {
        let request = |n: u64| Request { examples: vec![], message: String::new(), seeds: (0..n).collect() };
        let mut jobs = Jobs::new(&[request(3), request(2), request(0), request(2)]);
        // Two workers start on two tasks.
        assert_eq!(jobs.next(None), Some((0, 0)));
        assert_eq!(jobs.next(None), Some((1, 0)));
        // Each goes on with its own task…
        assert_eq!(jobs.next(Some(0)), Some((0, 1)));
        assert_eq!(jobs.next(Some(1)), Some((1, 1)));
        // …and, its task handed out, starts one nobody has started (the empty one skipped).
        assert_eq!(jobs.next(Some(1)), Some((3, 0)));
        // With no task left unstarted, a worker joins the first that has samples left.
        assert_eq!(jobs.next(None), Some((0, 2)));
        assert_eq!(jobs.next(Some(0)), Some((3, 1)));
        assert_eq!(jobs.next(Some(3)), None);
    }

    #[test]
    fn a_refusal_names_the_server_and_its_reason_and_is_not_retried() {
        let refusal = r#"{"error":{"message":"max_tokens is too large","type":"invalid_request_error","code":400}}"#;
        let (url, asked) = fake(vec![answer("400 Bad Request", "application/json", refusal)]);
        let error =
            sample(&settings(&url, Some("m"), Duration::from_secs(5)), None, false, &[1]).unwrap_err().to_string();
        assert!(error.contains(&url) && error.contains("400") && error.contains("max_tokens is too large"), "{error}");
        assert_eq!(asked.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_busy_server_is_asked_again() {
        let (url, asked) =
            fake(vec![answer("503 Service Unavailable", "text/plain", "loading model"), stream(&[("ok", -0.2)], 5)]);
        let generated = sample(&settings(&url, Some("m"), Duration::from_secs(5)), None, false, &[1]).unwrap();
        assert_eq!(generated[0].text, "ok");
        assert_eq!(asked.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_server_that_never_answers_fails_the_step_with_its_address() {
        let (url, _) = fake(vec![]);
        // Four tries, 1, 2 and 4 s apart, each given up after the request timeout.
        let error =
            sample(&settings(&url, Some("m"), Duration::from_millis(300)), None, false, &[1]).unwrap_err().to_string();
        assert!(error.contains(&url) && error.contains("cannot be reached"), "{error}");
    }

    /// vLLM 0.34.0's own responses (tests/fixtures/vllm/README.md says how they were made).
    fn vllm(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vllm").join(name);
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn vllm_s_stream_models_and_adapter_loading_are_understood() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("peft")).unwrap();
        std::fs::write(dir.path().join("peft/adapter_config.json"), "{}").unwrap();
        let adapter = dir.path().join("adapter.gguf");
        std::fs::write(&adapter, "").unwrap();
        let not_found = answer("404 Not Found", "application/json", &vllm("not-found.json"));
        let streamed = answer("200 OK", "text/event-stream; charset=utf-8", &vllm("chat-stream-logprobs.txt"));
        let (url, asked) = fake(vec![
            answer("200 OK", "application/json", &vllm("models.json")),
            not_found.clone(),
            answer("200 OK", "text/plain", &vllm("load-lora-adapter-ok.txt")),
            streamed.clone(),
            not_found,
            streamed,
        ]);
        let settings = settings(&url, None, Duration::from_secs(5));
        let client = Server::new(&url, settings.server.clone().unwrap());
        let requests = [Request { examples: vec![], message: "m".into(), seeds: vec![1] }];
        let sampling =
            Sampling { temperature: 0.0, top_p: 1.0, top_k: 40, max_tokens: 8, stop: vec![], stop_after_code: false };
        let work = Generation {
            settings: &settings,
            adapter: Some((&adapter, 1.0)),
            requests: &requests,
            sampling: &sampling,
        };
        let (first, timing) = client.generate(&work, &|| false, &mut |_, _| {}).unwrap();
        // The end token's log-probability counts with the two the answer shows.
        let mean = (-0.0123 - 0.25 - 0.001) / 3.0;
        assert_eq!(first, [[Generated { text: "Hello!".into(), tokens: 3, mean_logprob: mean }]]);
        assert_eq!(timing.prompt_tokens, 20);
        // The adapter is loaded once; the second step asks for it by the same name.
        client.generate(&work, &|| false, &mut |_, _| {}).unwrap();
        let asked = asked.lock().unwrap();
        let lines: Vec<&str> = asked.iter().map(|(line, _)| line.as_str()).collect();
        assert_eq!(
            lines,
            [
                "GET /v1/models HTTP/1.1",
                "GET /lora-adapters HTTP/1.1",
                "POST /v1/load_lora_adapter HTTP/1.1",
                "POST /v1/chat/completions HTTP/1.1",
                "GET /lora-adapters HTTP/1.1",
                "POST /v1/chat/completions HTTP/1.1",
            ]
        );
        let load: Value = serde_json::from_str(&asked[2].1).unwrap();
        let peft = dir.path().join("peft").canonicalize().unwrap();
        assert_eq!(load["lora_path"], peft.to_string_lossy().as_ref());
        for (_, body) in [&asked[3], &asked[5]] {
            let request: Value = serde_json::from_str(body).unwrap();
            assert_eq!(request["model"], load["lora_name"], "the adapter's name, not the base model's");
        }
    }

    #[test]
    fn an_adapter_vllm_already_holds_is_used_as_loaded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("peft")).unwrap();
        std::fs::write(dir.path().join("peft/adapter_config.json"), "{}").unwrap();
        let (url, _) = fake(vec![
            answer("404 Not Found", "application/json", &vllm("not-found.json")),
            answer("400 Bad Request", "application/json", &vllm("load-lora-adapter-again.json")),
        ]);
        let client = Server::new(&url, settings(&url, Some("base"), Duration::from_secs(5)).server.unwrap());
        let adapter = client.adapter(Some((&dir.path().join("peft"), 1.0)), &AtomicBool::new(false)).unwrap();
        assert!(matches!(adapter, Adapter::Named(name) if name.starts_with("seedflow-")));
    }

    #[test]
    fn a_refusal_says_the_api_s_message_or_names_an_error_page() {
        assert_eq!(error_text(r#"{"error": {"message": "model not found"}}"#), "model not found");
        let page = "<!DOCTYPE HTML>\n<html><head><title>Error response</title></head><body>404</body></html>";
        assert_eq!(error_text(page), "an HTML page, \"Error response\" (not the API)");
        assert_eq!(error_text("busy"), "busy");
    }
}
