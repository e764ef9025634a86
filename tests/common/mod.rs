//! Helpers for the integration tests. The sandbox's run real CPython in wasmtime and need
//! python.wasm, which the first run fetches with pip (`seedflow fetch python`).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use seedflow::data::{Status, Task, TaskStyle};
use seedflow::sandbox::{Job, Limits, Sandbox};

pub fn task(tests: &[&str]) -> Task {
    Task {
        task_id: "t".into(),
        prompt: "Return x.".into(),
        reference: None,
        test_setup: String::new(),
        tests: tests.iter().map(|t| t.to_string()).collect(),
        test_program: None,
        entry_point: None,
        style: TaskStyle::Mbpp,
    }
}

pub fn limits() -> Limits {
    Limits { timeout: Duration::from_secs(2), memory: 128 << 20, output: 16 << 10, feedback_chars: 2000 }
}

pub fn sandbox() -> Arc<Sandbox> {
    let wasm = seedflow::sandbox::interpreter(&|m| eprintln!("{m}")).expect("the sandbox");
    Arc::new(Sandbox::new(&wasm, 2, limits().memory).expect("sandbox"))
}

/// A sandbox on the plain python.wasm, which starts CPython for every program.
pub fn plain_sandbox() -> Arc<Sandbox> {
    let wasm = seedflow::assets::ensure(&seedflow::assets::PYTHON_WASM, &|m| eprintln!("{m}")).expect("python.wasm");
    Arc::new(Sandbox::new(&wasm, 2, limits().memory).expect("sandbox"))
}

/// Runs every program against `f(1) == 1`, two at a time.
pub fn run_all(cases: &[(&str, Status)]) -> Vec<seedflow::sandbox::RunResult> {
    run_all_in(sandbox(), cases)
}

pub fn run_all_in(sandbox: Arc<Sandbox>, cases: &[(&str, Status)]) -> Vec<seedflow::sandbox::RunResult> {
    let task = Arc::new(task(&["assert f(1) == 1", "assert f(2) == 2"]));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let results = runtime.block_on(async {
        let mut handles = vec![];
        for (program, _) in cases {
            let (sandbox, task, program) = (sandbox.clone(), task.clone(), program.to_string());
            handles.push(tokio::spawn(async move {
                let limits = limits();
                sandbox.run(&Job::new(&program, &task, &limits), &limits).await.expect("a sandbox worker")
            }));
        }
        let mut results = vec![];
        for handle in handles {
            results.push(handle.await.unwrap());
        }
        results
    });
    drop(runtime);
    results
}

pub fn check(cases: &[(&str, Status)]) {
    let results = run_all(cases);
    let mut wrong = vec![];
    for ((program, expected), result) in cases.iter().zip(&results) {
        if result.status != *expected {
            wrong.push(format!("{program:?}: expected {expected:?}, got {:?}: {}", result.status, result.feedback));
        }
        // Every run ends within its deadline (plus scheduling slack).
        assert!(result.duration < Duration::from_secs(6), "{program:?} took {:?}", result.duration);
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

/// MBPP's prompt-split tasks with these ids, in this order.
pub fn mbpp(ids: &[&str]) -> Vec<Task> {
    let text = std::fs::read_to_string("examples/data/mbpp/prompt.jsonl").unwrap();
    let tasks: Vec<Task> = text
        .lines()
        .map(|l| seedflow::data::formats::parse_line(seedflow::data::formats::Format::Mbpp, l).unwrap())
        .collect();
    ids.iter().map(|id| tasks.iter().find(|t| t.task_id == *id).unwrap().clone()).collect()
}

/// A random rank-4 LoRA on the query projections of a Qwen2 model `width` wide with 24 layers
/// (the default model's shape at 896), written by the trainer's exporter; its values (±0.5) are
/// large enough to move the model's output.
pub fn random_adapter(path: &std::path::Path, width: usize) -> seedflow::train::Lora {
    use candle_core::{Device, Tensor, Var};
    use seedflow::train::{Architecture, Lora, Pair, Target};
    let random = |rows: usize, cols: usize| {
        Var::from_tensor(&(Tensor::rand(-0.5f32, 0.5, (rows, cols), &Device::Cpu).unwrap())).unwrap()
    };
    let mut lora = Lora { rank: 4, alpha: 4.0, pairs: Default::default() };
    for layer in 0..24 {
        lora.pairs.insert((layer, Target::Q), Pair { a: random(4, width), b: random(width, 4) });
    }
    lora.save_gguf(path, Architecture::Qwen2).unwrap();
    lora
}

/// A child process of this one, as /proc has it.
pub struct ChildProcess {
    pub pid: i32,
    /// `R`, `S`, ..., `Z` for one that ended and is not yet reaped.
    pub state: String,
    /// Its command line's arguments.
    pub args: Vec<String>,
}

pub fn child_processes() -> Vec<ChildProcess> {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
    entries
        .flatten()
        .filter_map(|entry| {
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // `pid (name) state ppid ...`: the name may hold spaces, so read after its `)`.
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
            let (state, parent) = (fields.next()?.to_string(), fields.next()?);
            (parent == me).then_some(())?;
            let args = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args = String::from_utf8_lossy(&args).split_terminator('\0').map(String::from).collect();
            Some(ChildProcess { pid: entry.file_name().to_str()?.parse().ok()?, state, args })
        })
        .collect()
}
