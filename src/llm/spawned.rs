//! llama-server started by seedflow (`model … server="spawn"`): the model's own file served on
//! 127.0.0.1 by llama.cpp's server, with the LoRA adapter a step asks for. llama-server serves
//! only the adapters it was started with, so a step whose adapter it was not started with
//! (the next iteration's, once `finetune-lora` wrote it) restarts it with that one.

use std::io::{ErrorKind, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::server::{Server, ServerSettings};
use super::{Cancelled, Generation, Inference, LlmError, ModelSettings, Progress, Sampled};

/// How long llama-server may take to load the model and answer `/health`.
const START_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Spawned {
    binary: PathBuf,
    settings: ModelSettings,
    server: ServerSettings,
    running: Mutex<Option<Running>>,
}

struct Running {
    child: Child,
    adapter: Option<PathBuf>,
    server: Server,
    /// What the server printed, read when it fails to start.
    log: tempfile::NamedTempFile,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Spawned {
    /// `binary` serves `settings.path`, as `server` says, when a step first needs it.
    pub fn new(binary: PathBuf, settings: ModelSettings, server: ServerSettings) -> Spawned {
        Spawned { binary, settings, server, running: Mutex::new(None) }
    }

    fn start(&self, adapter: Option<&Path>) -> Result<Running, LlmError> {
        let failed = |why: String| LlmError::Start(format!("llama-server (`{}`): {why}", self.binary.display()));
        // A port the system has free now; llama-server binds it a moment later.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|e| failed(e.to_string()))?
            .port();
        let s = &self.settings;
        if s.path.is_dir() {
            return Err(LlmError::NotGguf(s.path.clone()));
        }
        let mut command = Command::new(&self.binary);
        command.arg("--model").arg(&s.path).args(["--host", "127.0.0.1", "--port", &port.to_string(), "--no-webui"]);
        // llama.cpp's built-in chat templates, which render the turns as seedflow's trainer and
        // in-process backend do (the model's Jinja template may add a default system turn).
        command.arg("--no-jinja");
        let parallel = s.parallel.max(1);
        // `context` is per sequence here as in-process; llama-server splits its context over its slots.
        command.args([
            "--parallel",
            &parallel.to_string(),
            "--ctx-size",
            &s.context.saturating_mul(parallel).to_string(),
        ]);
        command.args(["--batch-size", &s.batch.to_string(), "--gpu-layers", &gpu_layers(s.gpu_layers)]);
        if s.threads > 0 {
            command.args(["--threads", &s.threads.to_string()]);
        }
        if let Some(adapter) = adapter {
            command.arg("--lora").arg(adapter).arg("--lora-init-without-apply");
        }
        let log = tempfile::NamedTempFile::new().map_err(|e| failed(e.to_string()))?;
        let output = log.reopen().map_err(|e| failed(e.to_string()))?;
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(output);
        // A start that failed for a reason other than the program (seen once: "Bad address"
        // while the run's training threads were busy, and fine at once after) is tried again.
        let child = match command.spawn() {
            Err(e) if !matches!(e.kind(), ErrorKind::NotFound | ErrorKind::PermissionDenied) => {
                std::thread::sleep(Duration::from_millis(200));
                command.spawn()
            }
            result => result,
        }
        .map_err(|e| failed(e.to_string()))?;
        let server = Server::new(&format!("http://127.0.0.1:{port}"), self.server.clone());
        let mut running = Running { child, adapter: adapter.map(Path::to_path_buf), server, log };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = running.child.try_wait() {
                return Err(failed(format!("it exited ({status}) before serving:\n{}", running.last_lines())));
            }
            if running.server.healthy() {
                return Ok(running);
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(failed(format!("it did not answer within {START_TIMEOUT:?}:\n{}", running.last_lines())));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Running {
    fn last_lines(&mut self) -> String {
        let mut text = Vec::new();
        let _ = self.log.as_file_mut().read_to_end(&mut text);
        crate::assets::last_lines(&text, 12)
    }
}

/// llama-server's `--gpu-layers` for seedflow's (-1: all).
fn gpu_layers(layers: i32) -> String {
    if layers < 0 { "999".to_string() } else { layers.to_string() }
}

impl Inference for Spawned {
    fn generate(&self, work: &Generation<'_>, cancelled: &Cancelled, progress: &mut Progress) -> Sampled {
        let adapter = work.adapter.map(|(path, _)| path);
        let mut running = self.running.lock().map_err(|_| LlmError::Poisoned("llama-server"))?;
        // A server that exited (killed, out of memory) is started again.
        let serves = |r: &mut Running| {
            matches!(r.child.try_wait(), Ok(None)) && adapter.is_none_or(|a| r.adapter.as_deref() == Some(a))
        };
        if !running.as_mut().is_some_and(serves) {
            // The old server goes first: two would hold the model twice.
            *running = None;
            *running = Some(self.start(adapter)?);
        }
        let server = &running.as_ref().expect("started above").server;
        server.generate(work, cancelled, progress)
    }
}
