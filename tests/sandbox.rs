//! The sandbox's statuses and feedback for honest programs.

mod common;

use std::sync::Arc;

use common::{limits, plain_sandbox, run_all_in, sandbox, task};
use seedflow::data::Status;
use seedflow::sandbox::{Job, Sandbox};

#[test]
fn honest_programs_get_each_status_with_useful_feedback() {
    honest_programs_in(sandbox());
}

/// The plain python.wasm (CPython 3.12, started per program) runs the same harness.
#[test]
fn a_plain_python_wasm_gives_the_same_verdicts() {
    honest_programs_in(plain_sandbox());
}

fn honest_programs_in(sandbox: Arc<Sandbox>) {
    let cases = [
        ("def f(x):\n    return x\n", Status::Passed),
        ("def f(x):\n    return x + 1\n", Status::Failed),
        ("def f(x):\n    return x / 0\n", Status::Error),
        ("def f(x)\n    return x\n", Status::Syntax),
        ("def f(x):\n    while True:\n        pass\n", Status::Timeout),
        ("def f(x):\n    return [0] * (10 ** 8)\n", Status::Memory),
    ];
    let results = run_all_in(sandbox, &cases);
    for ((_, expected), result) in cases.iter().zip(&results) {
        assert_eq!(result.status, *expected, "{result:?}");
    }
    assert_eq!(results[1].failed_test.as_deref(), Some("assert f(1) == 1"));
    assert_eq!(results[1].feedback, "Test failed: assert f(1) == 1\nf(1) returned 2, but the test expects 1");
    assert!(results[2].feedback.contains("ZeroDivisionError: division by zero"), "{}", results[2].feedback);
    assert!(results[2].feedback.contains("File \"<program>\", line 2, in f"), "{}", results[2].feedback);
    assert!(!results[2].feedback.contains("_harness"), "the harness's frames are hidden: {}", results[2].feedback);
    assert!(results[3].feedback.contains("SyntaxError"), "{}", results[3].feedback);
    assert!(results[4].feedback.starts_with("Timed out"), "{}", results[4].feedback);
}

/// When the returned value is right and the test expects it passed to a helper (a house
/// envelope, `ok(value)`) or to a builtin (`set([...])`), the feedback says so.
#[test]
fn a_right_value_in_the_wrong_form_is_named() {
    let sandbox = sandbox();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let limits = limits();
    let mut envelope = task(&["assert f(2) == ok(2)"]);
    envelope.test_setup = "class Ok:\n    def __init__(self, v):\n        self.v = v\n    def __eq__(self, o):\n        return isinstance(o, Ok) and o.v == self.v\n\ndef ok(v):\n    return Ok(v)\n".into();
    let bare =
        runtime.block_on(sandbox.run(&Job::new("def f(x):\n    return x\n", &envelope, &limits), &limits)).unwrap();
    assert_eq!(bare.status, Status::Failed, "{bare:?}");
    assert!(
        bare.feedback.ends_with(
            "The value is right, but the test expects it passed to `ok`: return ok(...) of it. `ok` is defined where your code runs; do not define it."
        ),
        "{}",
        bare.feedback
    );
    let wrong =
        runtime.block_on(sandbox.run(&Job::new("def f(x):\n    return x + 1\n", &envelope, &limits), &limits)).unwrap();
    assert!(!wrong.feedback.contains("The value is right"), "{}", wrong.feedback);

    let builtin = task(&["assert f([1, 1]) == set([1])"]);
    let list =
        runtime.block_on(sandbox.run(&Job::new("def f(x):\n    return [1]\n", &builtin, &limits), &limits)).unwrap();
    assert!(list.feedback.ends_with("passed to `set`: return set(...) of it."), "{}", list.feedback);
}

#[test]
fn humaneval_style_tests_run_check() {
    let mut task = task(&[]);
    task.test_program = Some("def check(candidate):\n    assert candidate(3) == 3\n".into());
    task.entry_point = Some("f".into());
    let sandbox = sandbox();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let limits = limits();
    let good = runtime.block_on(sandbox.run(&Job::new("def f(x):\n    return x\n", &task, &limits), &limits)).unwrap();
    assert_eq!(good.status, Status::Passed, "{good:?}");
    let bad = runtime.block_on(sandbox.run(&Job::new("def f(x):\n    return 0\n", &task, &limits), &limits)).unwrap();
    assert_eq!(bad.status, Status::Failed, "{bad:?}");
}

/// A worker process that dies under a program (killed from outside here; a crash of wasmtime
/// would look the same) gives that program an `error` verdict at once, not a wait for its
/// deadline, and the next program gets a new worker.
#[test]
#[cfg(target_os = "linux")]
fn a_worker_that_dies_gives_an_error_and_is_replaced() {
    // A memory cap no other test's sandbox has, so that its worker is told apart from theirs
    // (`sandbox-worker KEY MEMORY`).
    const MEMORY: &str = "1610612736";
    let wasm = seedflow::sandbox::interpreter(&|_| {}).unwrap();
    let sandbox = Sandbox::new(&wasm, 1, MEMORY.parse().unwrap()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut limits = limits();
    limits.timeout = std::time::Duration::from_secs(60);
    let task = task(&["assert f(1) == 1"]);
    let passing = "def f(x):\n    return x\n";
    let first = runtime.block_on(sandbox.run(&Job::new(passing, &task, &limits), &limits)).unwrap();
    assert_eq!(first.status, Status::Passed, "{first:?}");
    // The worker that ran it, now idle: this process's child running `sandbox-worker … MEMORY`.
    let worker = common::child_processes()
        .into_iter()
        .find(|child| child.args.last().map(String::as_str) == Some(MEMORY))
        .expect("the worker process")
        .pid;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert_eq!(unsafe { libc::kill(worker, libc::SIGKILL) }, 0);
    });
    let looping = "def f(x):\n    while True:\n        pass\n";
    let started = std::time::Instant::now();
    let died = runtime.block_on(sandbox.run(&Job::new(looping, &task, &limits), &limits)).unwrap();
    killer.join().unwrap();
    assert_eq!(died.status, Status::Error, "{died:?}");
    assert!(died.feedback.contains("the interpreter stopped: its process ended (signal: 9"), "{}", died.feedback);
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "waited for the deadline");
    let next = runtime.block_on(sandbox.run(&Job::new(passing, &task, &limits), &limits)).unwrap();
    assert_eq!(next.status, Status::Passed, "{next:?}");
}
