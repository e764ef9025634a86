//! The sandbox: CPython compiled to WASI, run by wasmtime, one fresh instance per program.
//!
//! An instance sees no files, no network, no environment and no processes: the only things it
//! is given are its job and two bounded output pipes. Each run has a memory cap (a store
//! limiter) and a wall-clock deadline. Instances run in worker processes (`worker.rs`), and the
//! deadline is kept by killing the worker: a check inside the compiled code that lets wasmtime
//! end a program that computes forever (epoch interruption) made compute-bound programs ~20%
//! slower, and fuel metering ~15% more (bench/sandbox_compute.py).
//!
//! By default the interpreter is the sandbox component (`build.rs`): CPython snapshotted after
//! it started and imported the harness and the standard library, so a fresh instance is ready
//! at once. A plain python.wasm also works, started afresh for every program with the job on
//! stdin. Either is compiled once and cached on disk; instances come from wasmtime's pooling
//! allocator with copy-on-write memory images, so starting one maps the initial memory rather
//! than copying it.

mod build;
mod worker;

pub use build::interpreter;
pub use worker::{Sandbox, run_workers_from_this_program, serve_worker};

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wasmtime::component::{self, Component, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module, PoolingAllocationConfig, Precompiled,
    ResourceLimiter, Store, Trap,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::data::{Status, Task};

const HARNESS: &str = include_str!("harness.py");
/// What a plain python.wasm runs with `-c`: the harness, on the job its stdin holds.
const COMMAND_HARNESS: &str =
    concat!(include_str!("harness.py"), "\n_harness(_sys.stdin.read(), modules_preloaded=False)\n");

/// The smallest `memory` a program may be given: the interpreter's own memory at start (the
/// pre-initialised CPython's heap, 34 MiB) takes most of it.
pub const LEAST_MEMORY: u64 = 64 << 20;
/// The largest: all that 32-bit WebAssembly can address (and wasmtime reserves per memory).
pub const MOST_MEMORY: u64 = 4 << 30;

/// Limits of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limits {
    pub timeout: Duration,
    pub memory: u64,
    /// Bytes a program may write to stdout, and to stderr.
    pub output: usize,
    /// Characters of feedback kept.
    pub feedback_chars: usize,
}

/// What to run: a program and the tests of its task.
#[derive(Debug, Serialize)]
pub struct Job<'a> {
    pub program: &'a str,
    pub setup: &'a str,
    pub tests: &'a [String],
    pub test_program: Option<&'a str>,
    pub entry_point: Option<&'a str>,
    pub feedback_chars: usize,
    pub nonce: String,
}

impl<'a> Job<'a> {
    pub fn new(program: &'a str, task: &'a Task, limits: &Limits) -> Self {
        Job {
            program,
            setup: &task.test_setup,
            tests: &task.tests,
            test_program: task.test_program.as_deref(),
            entry_point: task.entry_point.as_deref(),
            feedback_chars: limits.feedback_chars,
            nonce: nonce(),
        }
    }
}

/// A fresh unguessable tag for a verdict line.
fn nonce() -> String {
    // rand's thread generator, seeded from the OS (a failed read of /dev/urandom had left the
    // tag all zeros, and guessable).
    format!("{:032x}", rand::random::<u128>())
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub status: Status,
    pub feedback: String,
    pub failed_test: Option<String>,
    pub exception: Option<String>,
    pub duration: Duration,
}

/// A store's data: WASI for a plain python.wasm (`WasiP1Ctx`) or for the component (`Wasi`).
struct State<W> {
    wasi: W,
    memory_limit: usize,
    /// Set when the program asked for more memory than its limit.
    memory_denied: bool,
}

struct Wasi {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl WasiView for State<Wasi> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi.ctx, table: &mut self.wasi.table }
    }
}

impl<W: Send> ResourceLimiter for State<W> {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// A compiled CPython linked to WASI, ready to instantiate: what a worker process runs jobs in.
struct Interpreter {
    engine: Engine,
    kind: Kind,
}

enum Kind {
    /// A plain python.wasm: a WASI command that runs the harness with `-c`.
    Command(InstancePre<State<WasiP1Ctx>>),
    /// The pre-initialised sandbox component, exporting `run(job)`.
    Component(component::InstancePre<State<Wasi>>),
}

/// Core instances, memories and tables one component instance may hold: the sandbox component
/// links CPython, libc and WASI adapters as separate core modules.
const CORE_INSTANCES_PER_COMPONENT: u32 = 32;
const MEMORIES_PER_COMPONENT: u32 = 4;
const TABLES_PER_COMPONENT: u32 = 8;

/// The engine the sandbox compiles and runs with: a worker's, with room for the instance it
/// runs (and one being freed) of up to `memory` bytes.
fn engine(memory: u64) -> Result<Engine, SandboxError> {
    let mut pool = PoolingAllocationConfig::default();
    let slots = 2;
    let page = 64 << 10;
    pool.total_component_instances(slots)
        .total_core_instances(slots * CORE_INSTANCES_PER_COMPONENT)
        .total_memories(slots * MEMORIES_PER_COMPONENT)
        .total_tables(slots * TABLES_PER_COMPONENT)
        .total_stacks(slots)
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .max_memory_size(memory.div_ceil(page) as usize * page as usize)
        .table_elements(1 << 16);
    let mut config = Config::new();
    config
        .memory_init_cow(true)
        // CPython calls through function pointers everywhere, and a lazily filled table
        // checks each such call for an entry not yet filled. Filling it at instantiation
        // costs microseconds per instance (verdicts/s unchanged) and made MBPP 123 ~3% faster.
        .table_lazy_init(false)
        // Recursion through C code (`functools.lru_cache`, freeing a long linked list) takes
        // wasm stack at every level: at wasmtime's default 512 KiB, 500 levels of a cached
        // function overflowed it where native CPython passes. At 8 MiB CPython's own guard
        // (on its 1 MiB stack in linear memory: a RecursionError) comes first; the fiber the
        // program runs on keeps wasmtime's default 1.5 MiB for host calls on top.
        .max_wasm_stack(8 << 20)
        .async_stack_size((8 << 20) + (3 << 19))
        // Cranelift's inlining stays off (wasmtime's default): compute-bound programs 4% faster
        // for 31 s instead of 7 to compile the interpreter on first use (README, Sandbox).
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config).map_err(|e| SandboxError::Wasmtime(format!("{e:#}")))
}

/// Where the compiled interpreter named `key` (see `compile`) is cached.
fn compiled_path(key: &str) -> PathBuf {
    crate::assets::cache_dir().join("compiled").join(format!("python-{key}.cwasm"))
}

/// `engine`'s part of a compiled interpreter's key: code compiled by another engine cannot run.
fn engine_key(engine: &Engine) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// Compiles `wasm` (a plain python.wasm or the sandbox component) into the cache unless it is
/// there already, and returns its key there.
fn compile(engine: &Engine, wasm: &Path) -> Result<String, SandboxError> {
    let bytes = std::fs::read(wasm).map_err(|e| SandboxError::Read { path: wasm.to_path_buf(), source: e })?;
    let key = format!("{}-{}", &crate::store::sha256_hex(&bytes)[..16], engine_key(engine));
    let cached = compiled_path(&key);
    if !cached.exists() {
        let compiled = if wasmparser::Parser::is_component(&bytes) {
            engine.precompile_component(&bytes)
        } else {
            engine.precompile_module(&bytes)
        }
        .map_err(|e| SandboxError::Compile { path: wasm.to_path_buf(), message: format!("{e:#}") })?;
        crate::store::write_atomic(&cached, &compiled).map_err(|e| SandboxError::Cache {
            path: wasm.to_path_buf(),
            cache: cached.clone(),
            source: e,
        })?;
    }
    Ok(key)
}

impl Interpreter {
    /// Takes the interpreter `compile` cached under `key` and links it to WASI; `wasm` names it
    /// in errors.
    fn link(engine: Engine, key: &str, wasm: &Path) -> Result<Interpreter, SandboxError> {
        // Only a key of `engine`'s own making names a file to load: the code in it runs as is.
        let well_formed = key.len() == 33 && key.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        let cached = compiled_path(key);
        if !well_formed || !key.ends_with(&engine_key(&engine)) || !cached.exists() {
            return Err(SandboxError::NotCompiled { key: key.to_string() });
        }
        let not_wasi =
            |e: wasmtime::Error| SandboxError::NotWasi { path: wasm.to_path_buf(), message: format!("{e:#}") };
        let is_component = matches!(Engine::detect_precompiled_file(&cached), Ok(Some(Precompiled::Component)));
        let kind = if is_component {
            // SAFETY: the file was written by `precompile_component` of an engine with the same
            // compatibility hash (it is in the file's name), into the user's own cache directory.
            let component = unsafe { Component::deserialize_file(&engine, &cached) }.map_err(not_wasi)?;
            let mut linker = component::Linker::new(&engine);
            wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(not_wasi)?;
            Kind::Component(linker.instantiate_pre(&component).map_err(not_wasi)?)
        } else {
            // SAFETY: as above, from `precompile_module`.
            let module = unsafe { Module::deserialize_file(&engine, &cached) }.map_err(not_wasi)?;
            let mut linker = Linker::new(&engine);
            wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut State<WasiP1Ctx>| &mut s.wasi)
                .map_err(not_wasi)?;
            Kind::Command(linker.instantiate_pre(&module).map_err(not_wasi)?)
        };
        Ok(Interpreter { engine, kind })
    }

    /// Runs one job (`input`, its JSON) in a fresh instance, to its end: the deadline is kept
    /// by the process this runs in being killed.
    async fn run(&self, input: &str, nonce: &str, limits: &Limits) -> RunResult {
        let started = Instant::now();
        // One byte over the limit: a pipe that is full reports itself closed, so writing exactly
        // the limit would fail the program's next write.
        let stdout = MemoryOutputPipe::new(limits.output + 1);
        // The verdict line comes on top of what the program may write: its feedback (up to 4
        // UTF-8 bytes a character) and its failed test (from the job) are hex-encoded.
        let stderr = MemoryOutputPipe::new(limits.output + limits.feedback_chars * 8 + input.len() * 2 + 4096);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone())
            .stderr(stderr.clone())
            // A fixed seed: the same program gets the same hash seed, so verdicts repeat.
            .secure_random(wasmtime_wasi::Deterministic::new(vec![7; 32]))
            .insecure_random_seed(7)
            .allow_tcp(false)
            .allow_udp(false);
        let (outcome, memory_denied) = match &self.kind {
            Kind::Command(pre) => {
                let wasi = wasi
                    .stdin(MemoryInputPipe::new(input.to_string()))
                    .args(&["python", "-I", "-S", "-B", "-c", COMMAND_HARNESS])
                    .build_p1();
                let mut store = self.store(wasi, limits);
                let run = async {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                    start.call_async(&mut store, ()).await
                };
                (run.await, store.data().memory_denied)
            }
            Kind::Component(pre) => {
                let mut store = self.store(Wasi { ctx: wasi.build(), table: ResourceTable::new() }, limits);
                let run = async {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let run = instance.get_typed_func::<(&str,), ()>(&mut store, "run")?;
                    run.call_async(&mut store, (input,)).await
                };
                (run.await, store.data().memory_denied)
            }
        };
        let duration = started.elapsed();
        let stdout_full = stdout.contents().len() > limits.output;
        // The component's harness returns from `run`: an exit there is the program's own
        // (`os._exit(0)`), whatever line it left. A plain python.wasm ends every run with one.
        let exit_ends_the_harness = matches!(self.kind, Kind::Command(_));
        let run = Run { nonce, stderr: &stderr.contents(), memory_denied, stdout_full, exit_ends_the_harness };
        classify(outcome, &run, limits, duration)
    }

    fn store<W: Send>(&self, wasi: W, limits: &Limits) -> Store<State<W>> {
        let state = State { wasi, memory_limit: limits.memory as usize, memory_denied: false };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s);
        store
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot start wasmtime: {0}")]
    Wasmtime(String),
    #[error("cannot find the `seedflow` program the sandbox's worker processes run (looked beside `{}`); build it with `cargo build`", .0.display())]
    NoWorkerProgram(PathBuf),
    #[error("cannot start a sandbox worker process (`{} sandbox-worker`): {message}", program.display())]
    Worker { program: PathBuf, message: String },
    #[error(
        "no compiled interpreter `{key}` in seedflow's cache (`seedflow sandbox-worker` is started by `seedflow run`)"
    )]
    NotCompiled { key: String },
    #[error("sandbox worker: {0}")]
    Serve(String),
    #[error("cannot read `{}`: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot compile `{}`: {message}", path.display())]
    Compile { path: PathBuf, message: String },
    #[error("cannot cache the compiled `{}` in `{}`: {source}; set SEEDFLOW_CACHE to a writable directory", path.display(), cache.display())]
    Cache { path: PathBuf, cache: PathBuf, source: std::io::Error },
    #[error("`{}` is not a Python for WASI that seedflow can run: {message}", path.display())]
    NotWasi { path: PathBuf, message: String },
}

/// `status feedback failed-test exception`, the last three hex-encoded UTF-8 (`-` for none).
fn parse_verdict(line: &str) -> Option<(Status, String, Option<String>, Option<String>)> {
    let fields: Vec<&str> = line.split(' ').collect();
    let [status, feedback, failed_test, exception] = fields[..] else { return None };
    let text = |hex: &str| -> Option<Option<String>> {
        if hex == "-" {
            return Some(None);
        }
        let bytes: Option<Vec<u8>> =
            (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect();
        Some(Some(String::from_utf8_lossy(&bytes?).into_owned()))
    };
    Some((Status::parse(status)?, text(feedback)?.unwrap_or_default(), text(failed_test)?, text(exception)?))
}

/// The verdict on a program that ran past its deadline.
fn timed_out(limits: &Limits, duration: Duration) -> RunResult {
    RunResult {
        status: Status::Timeout,
        feedback: format!(
            "Timed out: the program ran longer than {} (an endless loop?)",
            humantime::format_duration(limits.timeout)
        ),
        failed_test: None,
        exception: None,
        duration,
    }
}

/// How an instance ended, besides its outcome.
struct Run<'a> {
    nonce: &'a str,
    stderr: &'a [u8],
    memory_denied: bool,
    stdout_full: bool,
    /// Whether exiting with 0 is how the harness ends (a plain python.wasm), or the program's
    /// doing (the component, whose `run` returns).
    exit_ends_the_harness: bool,
}

fn classify(outcome: wasmtime::Result<()>, run: &Run, limits: &Limits, duration: Duration) -> RunResult {
    let Run { nonce, stderr, memory_denied, stdout_full, exit_ends_the_harness } = *run;
    // The harness's line, wherever the program's output left it: after a line the program did
    // not end, or before what a finaliser wrote once the harness had returned.
    let tag = format!("\x1eseedflow-verdict {nonce} ");
    let text = String::from_utf8_lossy(stderr);
    let (verdict, program_stderr) = match text.rfind(&tag) {
        Some(at) => {
            let line = text[at + tag.len()..].split('\n').next().unwrap_or_default();
            (parse_verdict(line), stderr.len().saturating_sub(tag.len() + line.len() + 1))
        }
        None => (None, stderr.len()),
    };
    let out_of_output = stdout_full || program_stderr > limits.output;
    let result =
        |status, feedback: String| RunResult { status, feedback, failed_test: None, exception: None, duration };
    let too_much_output = || {
        result(
            Status::Error,
            format!("the program wrote more than {} of output", bytesize::ByteSize(limits.output as u64)),
        )
    };
    let memory = || {
        result(
            Status::Memory,
            format!("MemoryError: the program needed more than {} of memory", bytesize::ByteSize(limits.memory)),
        )
    };
    let exited_normally = match outcome {
        Ok(()) => true,
        Err(error) => {
            if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
                exit.0 == 0 && exit_ends_the_harness
            } else {
                return match error.downcast_ref::<Trap>() {
                    _ if memory_denied => memory(),
                    // A CPython without a guard on its stack in linear memory (the plain 3.12)
                    // runs past it: the stack lies first, so that wraps to out of bounds.
                    Some(Trap::StackOverflow | Trap::MemoryOutOfBounds) => {
                        result(Status::Error, "RecursionError: the call stack overflowed".into())
                    }
                    _ if out_of_output => too_much_output(),
                    _ => result(Status::Error, format!("the interpreter stopped: {error:#}")),
                };
            }
        }
    };
    match verdict {
        // A write past the limit raised in the program (BrokenPipeError, usually uncaught): say
        // why, which is what a revision needs to know.
        Some((Status::Error, _, failed_test, exception)) if exited_normally && out_of_output => {
            RunResult { failed_test, exception, ..too_much_output() }
        }
        Some((status, feedback, failed_test, exception)) if exited_normally => {
            RunResult { status, feedback, failed_test, exception, duration }
        }
        _ if memory_denied => memory(),
        _ if out_of_output => too_much_output(),
        _ => {
            let tail: String =
                text.chars().rev().take(limits.feedback_chars).collect::<Vec<_>>().into_iter().rev().collect();
            result(Status::Error, format!("the program ended before its tests finished\n{}", tail.trim()))
        }
    }
}
