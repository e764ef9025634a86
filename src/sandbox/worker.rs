//! Worker processes, where the sandbox's instances run. A `Sandbox` keeps a pool of them, one for
//! each program that may run at once; it sends a worker a job and waits for the verdict until the
//! job's deadline, and kills a worker that misses it (another starts when one is next needed).
//! Killing the process is what ends a program that computes forever, so the compiled code needs
//! no deadline checks of its own (see mod.rs).
//!
//! The worker is this program again, `seedflow sandbox-worker KEY MEMORY PARENT`: it loads the
//! interpreter the parent compiled into the cache, says `ready`, then takes one JSON job a line on
//! stdin (a socket, so that writing to a worker that has died is an error, not a SIGPIPE that
//! ends seedflow) and answers each with one JSON verdict a line on stdout. The programs it runs
//! write only into the instance's own pipes, never to the worker's stdout. It dies with the
//! thread that started it (`PR_SET_PDEATHSIG`), and ends itself should a job outlast its deadline
//! and seedflow not have killed it.

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader, Interest};
use tokio::net::UnixStream;
use tokio::process::{Child, ChildStdout};

use super::{Interpreter, Job, Limits, RunResult, SandboxError, compile, engine, timed_out};
use crate::data::Status;

/// How long a worker may take to load the compiled interpreter (tens of milliseconds, usually).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The sandbox: compiled CPython and the worker processes that run programs in it. Cheap to
/// share between threads; its `run` needs a tokio runtime with I/O and time enabled. A worker
/// dies with the thread that started it: one found dead is replaced, but a runtime whose threads
/// outlive the sandbox (as a run's does) keeps its workers.
pub struct Sandbox {
    program: PathBuf,
    key: String,
    memory: u64,
    /// Bounds the programs running at once to `instances`.
    slots: tokio::sync::Semaphore,
    idle: Mutex<Vec<Worker>>,
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
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Runs one job in a fresh instance. An error means no worker could be started; whatever the
    /// program does gives a verdict.
    pub async fn run(&self, job: &Job<'_>, limits: &Limits) -> Result<RunResult, SandboxError> {
        // The semaphore is never closed, so acquiring cannot fail.
        let _slot = self.slots.acquire().await.ok();
        let request = Request {
            input: serde_json::to_string(job).unwrap_or_default(),
            nonce: job.nonce.clone(),
            limits: limits.clone(),
        };
        // Strings and numbers: serializing cannot fail.
        let mut line = serde_json::to_vec(&request).unwrap_or_default();
        line.push(b'\n');
        // A worker that dies under a program is almost never the program's doing (it cannot
        // reach outside its instance), so the program gets a second worker before a verdict
        // blames it.
        let first_started = Instant::now();
        let mut deaths = vec![];
        for _ in 0..3 {
            let mut worker = self.worker().await?;
            let started = Instant::now();
            // A worker not put back is dropped, which kills it.
            match tokio::time::timeout(limits.timeout, worker.exchange(&line)).await {
                Ok(Ok(result)) => {
                    if let Ok(mut idle) = self.idle.lock() {
                        idle.push(worker);
                    }
                    return Ok(result);
                }
                // It died before the job reached it: no one's verdict.
                Ok(Err(Died::BeforeTheJob)) => {}
                Ok(Err(Died::UnderTheJob(how))) => {
                    deaths.push(how);
                    if deaths.len() == 2 {
                        return Ok(RunResult {
                            status: Status::Error,
                            feedback: format!(
                                "the interpreter stopped: its process ended twice under this program ({})",
                                deaths.join("; ")
                            ),
                            failed_test: None,
                            exception: None,
                            duration: first_started.elapsed(),
                        });
                    }
                }
                Err(_elapsed) => return Ok(timed_out(limits, started.elapsed())),
            }
        }
        Err(SandboxError::Worker {
            program: self.program.clone(),
            message: "its processes kept ending before a program reached them".into(),
        })
    }

    /// An idle worker that is still alive, or a new one.
    async fn worker(&self) -> Result<Worker, SandboxError> {
        while let Some(mut worker) = self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            if matches!(worker.child.try_wait(), Ok(None)) {
                return Ok(worker);
            }
        }
        Worker::start(&self.program, &self.key, self.memory).await
    }
}

/// How a worker failed a job.
enum Died {
    /// Its process had ended before it was sent the job.
    BeforeTheJob,
    /// Its process ended while it had the job (how, in words), or answered nonsense.
    UnderTheJob(String),
}

/// A worker process, ready for a job.
struct Worker {
    child: Child,
    /// The socket that is its stdin, where jobs go.
    jobs: UnixStream,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    async fn start(program: &Path, key: &str, memory: u64) -> Result<Worker, SandboxError> {
        let failed = |message: String| SandboxError::Worker { program: program.to_path_buf(), message };
        let (jobs, stdin) = std::os::unix::net::UnixStream::pair().map_err(|e| failed(e.to_string()))?;
        jobs.set_nonblocking(true).map_err(|e| failed(e.to_string()))?;
        let jobs = UnixStream::from_std(jobs).map_err(|e| failed(e.to_string()))?;
        let mut command = tokio::process::Command::new(program);
        command
            .arg("sandbox-worker")
            .arg(key)
            .arg(memory.to_string())
            .arg(std::process::id().to_string())
            // Nothing of seedflow's environment (a server's API key, say) for the process that
            // runs untrusted code: where the compiled interpreter is, and where its libraries are.
            .env_clear()
            .env("SEEDFLOW_CACHE", crate::assets::cache_dir())
            .envs(std::env::var_os("LD_LIBRARY_PATH").map(|path| ("LD_LIBRARY_PATH", path)))
            .stdin(Stdio::from(OwnedFd::from(stdin)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            // Out of the terminal's process group, so that Ctrl-C reaches seedflow alone (which
            // then stops its workers) rather than ending a worker mid-program.
            .process_group(0);
        let mut child = command.spawn().map_err(|e| failed(e.to_string()))?;
        let Some(stdout) = child.stdout.take() else {
            return Err(failed("its stdout is missing".into()));
        };
        let mut worker = Worker { child, jobs, stdout: BufReader::new(stdout) };
        let mut line = String::new();
        match tokio::time::timeout(START_TIMEOUT, worker.stdout.read_line(&mut line)).await {
            Ok(Ok(_)) if line == "ready\n" => Ok(worker),
            Ok(Ok(_)) => Err(failed(format!("it did not start ({})", worker.exit_status().await))),
            Ok(Err(error)) => Err(failed(error.to_string())),
            Err(_) => Err(failed(format!("it was not ready after {}", humantime::format_duration(START_TIMEOUT)))),
        }
    }

    /// Sends one job (its request's line) and reads its verdict.
    async fn exchange(&mut self, line: &[u8]) -> Result<RunResult, Died> {
        if send_all(&self.jobs, line).await.is_err() {
            return Err(Died::BeforeTheJob);
        }
        let mut reply = String::new();
        match self.stdout.read_line(&mut reply).await {
            Ok(0) | Err(_) => Err(Died::UnderTheJob(format!("its process ended: {}", self.exit_status().await))),
            Ok(_) => serde_json::from_str(&reply)
                .map_err(|e| Died::UnderTheJob(format!("unreadable verdict from its process: {e}"))),
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

/// Writes all of `bytes` to `socket` with `MSG_NOSIGNAL`: when the worker at the other end has
/// died this is an error (EPIPE), where a plain write would raise SIGPIPE, whose default action
/// (seedflow's, so that printing into a closed pipe ends it quietly) ends the process.
async fn send_all(socket: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        socket.writable().await?;
        let sent = socket.try_io(Interest::WRITABLE, || {
            // SAFETY: `bytes` is valid for its length, and the socket is open while borrowed.
            let sent =
                unsafe { libc::send(socket.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
            usize::try_from(sent).map_err(|_| std::io::Error::last_os_error())
        });
        match sent {
            Ok(sent) => bytes = &bytes[sent..],
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// The program workers are started from, when it is this one: see `run_workers_from_this_program`.
static WORKER_PROGRAM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes the sandbox start its workers from this process's own program, which must then run
/// `serve_worker` for `sandbox-worker KEY MEMORY PARENT`: the command line does both.
pub fn run_workers_from_this_program() {
    // On Linux, this program even if its file has since been replaced (a rebuild during a run).
    let exe = if cfg!(target_os = "linux") { Ok(PathBuf::from("/proc/self/exe")) } else { std::env::current_exe() };
    if let Ok(exe) = exe {
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

/// The worker's side (`seedflow sandbox-worker KEY MEMORY PARENT`): runs the jobs on stdin in
/// the interpreter cached under `key`, with up to `memory` bytes each, until stdin ends; `parent`
/// is the process id of the seedflow that started it.
pub fn serve_worker(key: &str, memory: u64, parent: u32) -> Result<(), SandboxError> {
    // Die with the thread that started this process; unless it is gone already.
    #[cfg(target_os = "linux")]
    // SAFETY: `prctl` with these arguments only sets this process's parent-death signal.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    if std::os::unix::process::parent_id() != parent {
        return Err(SandboxError::Serve("the seedflow that started it has ended".into()));
    }
    let interpreter = Interpreter::link(engine(memory)?, key, Path::new(key))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SandboxError::Serve(format!("cannot start its runtime: {e}")))?;
    let deadline = watchdog()?;
    let set_deadline = |at: Option<Instant>| {
        *deadline.lock().map_err(|_| SandboxError::Serve("its watchdog failed".into()))? = at;
        Ok::<(), SandboxError>(())
    };
    let io = |e: std::io::Error| SandboxError::Serve(format!("its pipe to seedflow: {e}"));
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready").and_then(|()| stdout.flush()).map_err(io)?;
    for line in std::io::stdin().lock().lines() {
        let request: Request = serde_json::from_str(&line.map_err(io)?)
            .map_err(|e| SandboxError::Serve(format!("unreadable job: {e}")))?;
        // Seedflow kills this process at the job's deadline; this is for when it cannot.
        set_deadline(Some(Instant::now() + request.limits.timeout + WATCHDOG_GRACE))?;
        let result = runtime.block_on(interpreter.run(&request.input, &request.nonce, &request.limits));
        set_deadline(None)?;
        let mut reply = serde_json::to_vec(&result).map_err(|e| SandboxError::Serve(e.to_string()))?;
        reply.push(b'\n');
        stdout.write_all(&reply).and_then(|()| stdout.flush()).map_err(io)?;
    }
    Ok(())
}

/// How long past a job's deadline a worker waits to be killed before it ends itself.
const WATCHDOG_GRACE: Duration = Duration::from_secs(5);

/// A thread that ends the process once the deadline it is given has passed.
fn watchdog() -> Result<Arc<Mutex<Option<Instant>>>, SandboxError> {
    let deadline: Arc<Mutex<Option<Instant>>> = Arc::default();
    let watched = deadline.clone();
    std::thread::Builder::new()
        .name("sandbox-watchdog".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(100));
                let passed = watched.lock().map_or(true, |deadline| deadline.is_some_and(|d| Instant::now() > d));
                if passed {
                    std::process::exit(EXIT_PAST_DEADLINE);
                }
            }
        })
        .map_err(|e| SandboxError::Serve(format!("cannot start its watchdog: {e}")))?;
    Ok(deadline)
}

/// A worker's exit code when its watchdog ended it.
const EXIT_PAST_DEADLINE: i32 = 124;

#[cfg(test)]
mod tests {
    use super::*;

    /// With SIGPIPE at its default action, as in seedflow, a job sent to a worker that has died
    /// is an error and the process lives on; a large one arrives whole at a live worker.
    #[test]
    fn a_job_sent_to_a_dead_worker_is_an_error_not_a_signal() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let job = vec![b'x'; 1 << 20];
            let reader = tokio::spawn(async move {
                let mut received = vec![];
                tokio::io::AsyncReadExt::read_to_end(&mut { theirs }, &mut received).await.unwrap();
                received.len()
            });
            send_all(&ours, &job).await.unwrap();
            drop(ours);
            assert_eq!(reader.await.unwrap(), job.len());

            let (ours, theirs) = UnixStream::pair().unwrap();
            drop(theirs);
            // SAFETY: restores the default action of one signal; no other test writes to a
            // closed pipe or socket.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            let error = send_all(&ours, b"job\n").await.unwrap_err();
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
            assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe);
        });
    }
}
