//! Worker processes, where the sandbox's instances run. A `Sandbox` keeps a pool of them, one for
//! each program that may run at once; it sends a worker a job and waits for the verdict until the
//! job's deadline, and kills a worker that misses it (another starts when one is next needed).
//! Killing the process is what ends a program that computes forever, so the compiled code needs
//! no deadline checks of its own (see mod.rs).
//!
//! The worker is this program again, `seedflow sandbox-worker KEY MEMORY`: it loads the
//! interpreter the parent compiled into the cache, says `ready`, then takes one JSON job a line on
//! stdin and answers each with one JSON verdict a line on stdout. The programs it runs write only
//! into the instance's own pipes, never to the worker's stdout.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::{Interpreter, Job, Limits, RunResult, SandboxError, compile, engine, timed_out};
use crate::data::Status;

/// How long a worker may take to load the compiled interpreter (tens of milliseconds, usually).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The sandbox: compiled CPython and the worker processes that run programs in it. Cheap to
/// share between threads; its `run` needs a tokio runtime with I/O and time enabled.
pub struct Sandbox {
    program: PathBuf,
    key: String,
    memory: u64,
    /// Bounds the programs running at once to `instances`.
    slots: tokio::sync::Semaphore,
    idle: std::sync::Mutex<Vec<Worker>>,
}

/// One job, as a worker reads it.
#[derive(Serialize, Deserialize)]
struct Request {
    /// The job as the harness reads it (JSON).
    input: String,
    nonce: String,
    limits: Limits,
}

impl Sandbox {
    /// Compiles `wasm` (a plain python.wasm or the sandbox component), or takes its compiled code
    /// from the cache, for `instances` programs at once with up to `memory` bytes each.
    pub fn new(wasm: &Path, instances: u32, memory: u64) -> Result<Sandbox, SandboxError> {
        let program = worker_program()?;
        let engine = engine(memory)?;
        let key = compile(&engine, wasm)?;
        // Linked here too, so that a file which is not a Python for WASI is named now, not by
        // a worker.
        Interpreter::link(engine, &key, wasm)?;
        Ok(Sandbox {
            program,
            key,
            memory,
            slots: tokio::sync::Semaphore::new(instances.max(1) as usize),
            idle: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Runs one job in a fresh instance. An error means no worker could be started; whatever the
    /// program does gives a verdict.
    pub async fn run(&self, job: &Job<'_>, limits: &Limits) -> Result<RunResult, SandboxError> {
        // The semaphore is never closed, so acquiring cannot fail.
        let _slot = self.slots.acquire().await.ok();
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut worker = match idle {
            Some(worker) => worker,
            None => Worker::start(&self.program, &self.key, self.memory).await?,
        };
        let request = Request {
            input: serde_json::to_string(job).unwrap_or_default(),
            nonce: job.nonce.clone(),
            limits: limits.clone(),
        };
        let started = Instant::now();
        // A worker not put back is dropped, which kills it.
        Ok(match tokio::time::timeout(limits.timeout, worker.exchange(&request)).await {
            Ok(Ok(result)) => {
                if let Ok(mut idle) = self.idle.lock() {
                    idle.push(worker);
                }
                result
            }
            Ok(Err(error)) => RunResult {
                status: Status::Error,
                feedback: format!("the interpreter stopped: {error}"),
                failed_test: None,
                exception: None,
                duration: started.elapsed(),
            },
            Err(_elapsed) => timed_out(limits, started.elapsed()),
        })
    }
}

/// A worker process, ready for a job.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    async fn start(program: &Path, key: &str, memory: u64) -> Result<Worker, SandboxError> {
        let failed = |message: String| SandboxError::Worker { program: program.to_path_buf(), message };
        let mut command = tokio::process::Command::new(program);
        command
            .arg("sandbox-worker")
            .arg(key)
            .arg(memory.to_string())
            // Nothing of seedflow's environment (a server's API key, say) for the process that
            // runs untrusted code: only where the compiled interpreter is.
            .env_clear()
            .env("SEEDFLOW_CACHE", crate::assets::cache_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // Out of the terminal's process group, so that Ctrl-C reaches seedflow alone (which then
        // stops its workers) rather than ending a worker mid-program, which would read as the
        // program's crash.
        #[cfg(unix)]
        command.process_group(0);
        // And killed with the thread that started it, should seedflow itself be killed.
        #[cfg(target_os = "linux")]
        // SAFETY: between fork and exec only `prctl`, which is async-signal-safe, runs.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| failed(e.to_string()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(failed("its pipes are missing".into()));
        };
        let mut worker = Worker { child, stdin, stdout: BufReader::new(stdout) };
        let mut line = String::new();
        match tokio::time::timeout(START_TIMEOUT, worker.stdout.read_line(&mut line)).await {
            Ok(Ok(_)) if line == "ready\n" => Ok(worker),
            Ok(Ok(_)) => Err(failed(format!("it did not start ({})", worker.exit_status().await))),
            Ok(Err(error)) => Err(failed(error.to_string())),
            Err(_) => Err(failed(format!("it was not ready after {}", humantime::format_duration(START_TIMEOUT)))),
        }
    }

    /// Sends one job and reads its verdict.
    async fn exchange(&mut self, request: &Request) -> Result<RunResult, String> {
        let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let mut reply = String::new();
        let sent = async {
            self.stdin.write_all(&line).await?;
            self.stdin.flush().await?;
            self.stdout.read_line(&mut reply).await
        };
        match sent.await {
            Ok(0) | Err(_) => Err(format!("its process ended ({})", self.exit_status().await)),
            Ok(_) => serde_json::from_str(&reply).map_err(|e| format!("unreadable verdict from its process: {e}")),
        }
    }

    /// How the worker's process ended, in words, once it has (or "still running").
    async fn exit_status(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(error)) => error.to_string(),
            Err(_) => "still running".into(),
        }
    }
}

/// The program workers are started from, when it is this one: see `run_workers_from_this_program`.
static WORKER_PROGRAM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes the sandbox start its workers from this process's own program, which must then run
/// `serve_worker` for `sandbox-worker KEY MEMORY`: the command line does both.
pub fn run_workers_from_this_program() {
    if let Ok(exe) = std::env::current_exe() {
        let _ = WORKER_PROGRAM.set(exe);
    }
}

/// The `seedflow` program to start workers from: this one when it is the command line, else (in
/// a program that links seedflow's library: its tests) the `seedflow` cargo built beside it.
fn worker_program() -> Result<PathBuf, SandboxError> {
    if let Some(program) = WORKER_PROGRAM.get() {
        return Ok(program.clone());
    }
    let exe = std::env::current_exe().map_err(|_| SandboxError::NoWorkerProgram(PathBuf::from("seedflow")))?;
    let name = format!("seedflow{}", std::env::consts::EXE_SUFFIX);
    // Cargo puts test programs in target/<profile>/deps and `seedflow` in target/<profile>.
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(&name))
        .find(|candidate| candidate.is_file())
        .ok_or(SandboxError::NoWorkerProgram(exe))
}

/// The worker's side (`seedflow sandbox-worker KEY MEMORY`): runs the jobs on stdin in the
/// interpreter cached under `key`, with up to `memory` bytes each, until stdin ends.
pub fn serve_worker(key: &str, memory: u64) -> Result<(), SandboxError> {
    let interpreter = Interpreter::link(engine(memory)?, key, Path::new(key))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SandboxError::Serve(format!("cannot start its runtime: {e}")))?;
    let io = |e: std::io::Error| SandboxError::Serve(format!("its pipe to seedflow: {e}"));
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready").and_then(|()| stdout.flush()).map_err(io)?;
    for line in std::io::stdin().lock().lines() {
        let request: Request = serde_json::from_str(&line.map_err(io)?)
            .map_err(|e| SandboxError::Serve(format!("unreadable job: {e}")))?;
        let result = runtime.block_on(interpreter.run(&request.input, &request.nonce, &request.limits));
        let mut reply = serde_json::to_vec(&result).map_err(|e| SandboxError::Serve(e.to_string()))?;
        reply.push(b'\n');
        stdout.write_all(&reply).and_then(|()| stdout.flush()).map_err(io)?;
    }
    Ok(())
}
