//! The sandbox's statuses and feedback for honest programs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{limits, plain_sandbox, run_all_in, sandbox, task};
use seedflow::data::Status;
use seedflow::sandbox::{Job, Sandbox};

#[test]
fn honest_programs_get_each_status_with_useful_feedback() {
    let sandbox = sandbox();
    let results = honest_programs_in(sandbox.clone());
    // The component's interpreter lives on after the write it refused, and names the test.
    assert_eq!(results[6].failed_test.as_deref(), Some("assert f(1) == 1"));
    // Recursion through C code within the default recursion limit: each level takes wasm stack
    // as well as CPython's. (The plain CPython 3.12 overflows its own stack first.)
    let deep = "from functools import lru_cache\n@lru_cache(None)\ndef f(x, n=900):\n    return x if n == 0 else f(x, n - 1)\n";
    // The standard library that registers exit handlers loads (handlers are taken, never run),
    // and a log call does not read its caller's frame.
    let logs = "import logging\nlogging.basicConfig(level=logging.INFO)\ndef f(x):\n    logging.info('f(%s)', x)\n    return x\n";
    let handler =
        "import atexit, doctest, concurrent.futures\natexit.register(print, 'passed')\ndef f(x):\n    return -x\n";
    // An error handler that logs or formats its traceback, as natively (`traceback` gets
    // stand-ins for the frames).
    let logged = "import logging, traceback\ndef f(x):\n    try:\n        return x / (x - x)\n    except ZeroDivisionError:\n        logging.exception('f(%s)', x)\n        assert 'line 4, in f' in traceback.format_exc()\n        return x\n";
    // Past the parser's nesting limit (lower in WASI's CPython than natively): an error that says
    // so, not the interpreter's crash.
    let nested = format!("x = {}1{}\ndef f(x):\n    return x\n", "(".repeat(150), ")".repeat(150));
    let cases = [
        (deep, Status::Passed),
        (logs, Status::Passed),
        (handler, Status::Failed),
        (&nested, Status::Error),
        (logged, Status::Passed),
    ];
    let results = run_all_in(sandbox, &cases);
    for ((_, expected), result) in cases.iter().zip(&results) {
        assert_eq!(result.status, *expected, "{result:?}");
    }
    assert!(results[3].feedback.starts_with("While compiling the program: "), "{}", results[3].feedback);
    assert!(results[3].feedback.contains("too complex"), "{}", results[3].feedback);
}

/// The plain python.wasm (CPython 3.12, started per program) runs the same harness.
#[test]
fn a_plain_python_wasm_gives_the_same_verdicts() {
    honest_programs_in(plain_sandbox());
}

fn honest_programs_in(sandbox: Arc<Sandbox>) -> Vec<seedflow::sandbox::RunResult> {
    let cases = [
        ("def f(x):\n    return x\n", Status::Passed),
        ("def f(x):\n    return x + 1\n", Status::Failed),
        ("def f(x):\n    return x / 0\n", Status::Error),
        ("def f(x)\n    return x\n", Status::Syntax),
        ("def f(x):\n    while True:\n        pass\n", Status::Timeout),
        ("def f(x):\n    return [0] * (10 ** 8)\n", Status::Memory),
        ("def f(x):\n    while True:\n        print('x' * 1000)\n", Status::Error),
        // A line the program did not end, before the harness's verdict line.
        ("import sys\nsys.stderr.write('working...')\ndef f(x):\n    return x\n", Status::Passed),
        // What a finaliser writes after the verdict, and output just under the limit, leave the
        // program's own error as its feedback.
        (
            "import sys\nclass D:\n    def __del__(self):\n        sys.stderr.write('closed\\n')\ndef f(x):\n    d = D()\n    raise ValueError('v')\n",
            Status::Error,
        ),
        ("import sys\nsys.stderr.write('e' * 16000)\ndef f(x):\n    raise ValueError('x' * 3000)\n", Status::Error),
        // What a failed test's call returned is the value it gave, not a second call's: a
        // function with state, and one whose second call would pass the 2 s deadline.
        ("calls = []\ndef f(x):\n    calls.append(x)\n    return len(calls) + 1\n", Status::Failed),
        ("import time\ndef f(x):\n    time.sleep(1.2)\n    return x + 1\n", Status::Failed),
        // A chained exception: its cause's traceback is not the harness's to read.
        ("def f(x):\n    try:\n        {}[x]\n    except KeyError:\n        return 1 / 0\n", Status::Error),
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
    // Not the BrokenPipeError the write past the limit raised: why it was raised.
    assert!(results[6].feedback.starts_with("the program wrote more than 16.0 KiB"), "{}", results[6].feedback);
    assert!(results[8].feedback.ends_with("ValueError: v"), "{}", results[8].feedback);
    assert!(results[9].feedback.contains("ValueError: xxx"), "{}", results[9].feedback);
    assert_eq!(results[10].feedback, "Test failed: assert f(1) == 1\nf(1) returned 2, but the test expects 1");
    assert!(results[12].feedback.ends_with("ZeroDivisionError: division by zero"), "{}", results[12].feedback);
    assert_eq!(results[12].failed_test.as_deref(), Some("assert f(1) == 1"));
    results
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

/// The least memory `execute` accepts runs a program.
#[test]
fn a_program_runs_in_the_least_memory() {
    let wasm = seedflow::sandbox::interpreter(&|m| eprintln!("{m}")).expect("the sandbox");
    let least = seedflow::sandbox::LEAST_MEMORY;
    let sandbox = Sandbox::new(&wasm, 1, least).unwrap();
    let limits = seedflow::sandbox::Limits { memory: least, ..limits() };
    let task = task(&["assert f(1) == 1"]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let result =
        runtime.block_on(sandbox.run(&Job::new("def f(x):\n    return x\n", &task, &limits), &limits)).unwrap();
    assert_eq!(result.status, Status::Passed, "{result:?}");
}

#[test]
fn humaneval_style_tests_run_check() {
    let mut task = task(&[]);
    task.test_program = Some(
        "def check(candidate):\n    assert candidate(0) == 0\n    for x in [1, 2]:\n        assert candidate(x) == x, 'x'\n    assert candidate(3) > 2\n".into(),
    );
    task.entry_point = Some("f".into());
    let sandbox = sandbox();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let limits = limits();
    let run_on = |program: &str, task: &seedflow::data::Task| {
        runtime.block_on(sandbox.run(&Job::new(program, task, &limits), &limits)).unwrap()
    };
    let run = |program: &str| run_on(program, &task);
    let good = run("def f(x):\n    return x\n");
    assert_eq!(good.status, Status::Passed, "{good:?}");
    // The feedback names the assert inside `check` that failed, with the function's own name and
    // what it returned there, as for a plain test.
    for (program, test, value) in [
        ("def f(x):\n    return 0\n", "assert f(x) == x, 'x'", "\nf(x) returned 0, but the test expects x\nx"),
        ("def f(x):\n    return min(x, 2)\n", "assert f(3) > 2", "\nf(3) returned 2"),
        // An assert of the program's own fails: the test that ran is named, with no value.
        ("def f(x):\n    assert x != 0\n    return x\n", "check(f)", ""),
    ] {
        let bad = run(program);
        assert_eq!(bad.status, Status::Failed, "{bad:?}");
        assert_eq!(bad.failed_test.as_deref(), Some(test), "{bad:?}");
        assert_eq!(bad.feedback, format!("Test failed: {test}{value}"), "{bad:?}");
    }
    // `check` keeps its recorder, which the function under test replaces in vain; the test
    // program's helpers, its `global` names and its `:=` work as at a module's top level.
    let mut helpers = task.clone();
    helpers.test_program = Some(
        "import math\nn = 0\ndef twice(x):\n    return 2 * x\ndef check(candidate):\n    global n\n    n += 1\n    assert candidate(n) == twice(n) / 2\n    assert (got := candidate(4)) == math.sqrt(16)\n    assert got == 4\n".into(),
    );
    assert_eq!(run_on("def f(x):\n    return x\n", &helpers).status, Status::Passed);
    let forged =
        run_on("def f(x):\n    globals()['__seedflow_record__'] = lambda value, line: 4.0\n    return 0\n", &helpers);
    assert_eq!(forged.status, Status::Failed, "{forged:?}");
    // Nor can the program reach the harness's `check` or its recorder: through the test
    // program's `check` in the namespace (here when a finaliser of the value it replaces runs),
    // through a closure `check` hands the candidate, or by an annotation's code run in its place.
    let forges = [
        (
            "def check(candidate):\n    assert candidate(1) is True\n",
            "class D:\n    def __del__(self):\n        check.__kwdefaults__ = {'__seedflow_record__': lambda value, line: True}\ncheck = D()\ndef f(x):\n    return None\n",
        ),
        (
            "def check(candidate):\n    def double(x):\n        assert x is not None\n        return 2 * x\n    assert candidate(double, 3) == 6\n    assert candidate(double, 4) == 8\n",
            "class A:\n    def __eq__(self, other):\n        return True\ndef f(fn, x):\n    for cell in fn.__closure__ or ():\n        if getattr(cell.cell_contents, '__name__', '') == 'record':\n            cell.cell_contents = lambda value, line: A()\n    return 0\n",
        ),
        (
            "def check(candidate) -> None:\n    assert candidate(1) == 2\n",
            "class F:\n    def __call__(self, x):\n        return 3 * x\n    def __gt__(self, other):\n        return False\nf = F()\n",
        ),
    ];
    for (test_program, program) in forges {
        let mut variant = task.clone();
        variant.test_program = Some(test_program.into());
        let result = run_on(program, &variant);
        assert_eq!(result.status, Status::Failed, "{test_program}: {result:?}");
    }
    // The test program runs at the top level as natively (its `check` alone made apart): a
    // `__future__` import, a class body reading a top-level name, an import the program relies
    // on, a star import inside `try`; an assert outside `check` is named when it fails.
    let identity = "def f(x):\n    return x\n";
    for (test_program, program, status, failed) in [
        ("from __future__ import annotations\ndef check(c):\n    assert c(1) == 1\n", identity, Status::Passed, None),
        ("x = 1\nclass A:\n    x = x + 1\ndef check(c):\n    assert c(A.x) == 2\n", identity, Status::Passed, None),
        (
            "import math\ndef check(c):\n    assert c(4) == 2\n",
            "def f(x):\n    return math.sqrt(x)\n",
            Status::Passed,
            None,
        ),
        (
            "try:\n    from math import *\nexcept ImportError:\n    pass\ndef check(c):\n    assert c(4) == sqrt(16)\n",
            identity,
            Status::Passed,
            None,
        ),
        ("def check(c):\n    pass\nassert f(2) == 3\n", identity, Status::Failed, Some("assert f(2) == 3")),
    ] {
        let mut variant = task.clone();
        variant.test_program = Some(test_program.into());
        let result = run_on(program, &variant);
        assert_eq!(result.status, status, "{test_program}: {result:?}");
        assert_eq!(result.failed_test.as_deref(), failed, "{test_program}: {result:?}");
    }
    // A `yield` in a plain test is refused where it stands, as at a module's top level, not run
    // as a generator that never asserts.
    let generator = run_on(identity, &common::task(&["assert (yield f(1)) == 2"]));
    assert!(
        generator.status == Status::Error && generator.feedback.contains("'yield' outside function"),
        "{generator:?}"
    );
    assert_eq!(
        forged.feedback,
        "Test failed: assert f(n) == twice(n) / 2\nf(n) returned 0, but the test expects twice(n) / 2"
    );
}

/// The sandbox's worker processes: this process's children `sandbox-worker KEY MEMORY PARENT`
/// that have not ended, for a memory cap no other test's sandbox has (tests run side by side).
fn live_workers(memory: &str) -> Vec<i32> {
    common::child_processes()
        .into_iter()
        .filter(|child| child.state != "Z" && child.args.get(3).map(String::as_str) == Some(memory))
        .map(|child| child.pid)
        .collect()
}

/// CPU time a process has used, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    // utime and stime, the 14th and 15th fields of the line (11th and 12th after the name).
    fields.get(11..13).map_or(0, |times| times.iter().filter_map(|t| t.parse::<u64>().ok()).sum())
}

/// Waits until `pid` has computed for a while (a program is running in it), then kills it.
fn kill_once_busy(pid: i32) {
    let start = cpu_ticks(pid);
    for _ in 0..1000 {
        if cpu_ticks(pid) >= start + 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
}

fn sandbox_with(memory: &str) -> Sandbox {
    let wasm = seedflow::sandbox::interpreter(&|_| {}).unwrap();
    Sandbox::new(&wasm, 1, memory.parse().unwrap()).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

const PASSING: &str = "def f(x):\n    return x\n";
const LOOPING: &str = "def f(x):\n    while True:\n        pass\n";

/// A worker that dies while idle (killed from outside here) is nobody's verdict: the next program
/// gets a new one.
#[test]
#[cfg(target_os = "linux")]
fn a_worker_that_died_idle_is_replaced() {
    const MEMORY: &str = "1610612736";
    let (sandbox, runtime, limits, task) = (sandbox_with(MEMORY), runtime(), limits(), task(&["assert f(1) == 1"]));
    let first = runtime.block_on(sandbox.run(&Job::new(PASSING, &task, &limits), &limits)).unwrap();
    assert_eq!(first.status, Status::Passed, "{first:?}");
    let [idle] = live_workers(MEMORY)[..] else { panic!("one worker: {:?}", live_workers(MEMORY)) };
    assert_eq!(unsafe { libc::kill(idle, libc::SIGKILL) }, 0);
    while live_workers(MEMORY).contains(&idle) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let next = runtime.block_on(sandbox.run(&Job::new(PASSING, &task, &limits), &limits)).unwrap();
    assert_eq!(next.status, Status::Passed, "{next:?}");
}

/// A worker that dies under a program gets the program a second worker; a second death is the
/// program's `error` verdict, at once rather than at its deadline.
#[test]
#[cfg(target_os = "linux")]
fn a_program_whose_workers_die_twice_gets_an_error() {
    const MEMORY: &str = "1610678272";
    let (sandbox, runtime, task) = (sandbox_with(MEMORY), runtime(), task(&["assert f(1) == 1"]));
    let mut limits = limits();
    limits.timeout = Duration::from_secs(60);
    let killer = std::thread::spawn(|| {
        let mut killed = vec![];
        while killed.len() < 2 {
            if let Some(&worker) = live_workers(MEMORY).iter().find(|pid| !killed.contains(*pid)) {
                kill_once_busy(worker);
                killed.push(worker);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let started = std::time::Instant::now();
    let died = runtime.block_on(sandbox.run(&Job::new(LOOPING, &task, &limits), &limits)).unwrap();
    killer.join().unwrap();
    assert_eq!(died.status, Status::Error, "{died:?}");
    assert!(died.feedback.contains("its process ended twice under this program"), "{}", died.feedback);
    assert!(died.feedback.contains("signal: 9"), "{}", died.feedback);
    assert!(started.elapsed() < Duration::from_secs(30), "waited for the deadline");
    let next = runtime.block_on(sandbox.run(&Job::new(PASSING, &task, &limits), &limits)).unwrap();
    assert_eq!(next.status, Status::Passed, "{next:?}");
}

/// A program past its deadline ends with its worker, and so does one whose run is dropped (a
/// stop): no process goes on computing.
#[test]
#[cfg(target_os = "linux")]
fn programs_past_their_deadline_or_stopped_take_their_workers_with_them() {
    const MEMORY: &str = "1610743808";
    let (sandbox, runtime, task) = (sandbox_with(MEMORY), runtime(), task(&["assert f(1) == 1"]));
    let gone = |pid: i32| {
        (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            !live_workers(MEMORY).contains(&pid)
        })
    };
    let mut limits = limits();
    limits.timeout = Duration::from_millis(500);
    let warm = runtime.block_on(sandbox.run(&Job::new(PASSING, &task, &limits), &limits)).unwrap();
    assert_eq!(warm.status, Status::Passed, "{warm:?}");
    let [worker] = live_workers(MEMORY)[..] else { panic!("one worker: {:?}", live_workers(MEMORY)) };
    let late = runtime.block_on(sandbox.run(&Job::new(LOOPING, &task, &limits), &limits)).unwrap();
    assert_eq!(late.status, Status::Timeout, "{late:?}");
    assert!(gone(worker), "the worker of a program past its deadline is still running");

    limits.timeout = Duration::from_secs(60);
    let warm = runtime.block_on(sandbox.run(&Job::new(PASSING, &task, &limits), &limits)).unwrap();
    assert_eq!(warm.status, Status::Passed, "{warm:?}");
    let [worker] = live_workers(MEMORY)[..] else { panic!("one worker: {:?}", live_workers(MEMORY)) };
    let stopped = runtime.block_on(async {
        tokio::time::timeout(Duration::from_millis(500), sandbox.run(&Job::new(LOOPING, &task, &limits), &limits)).await
    });
    assert!(stopped.is_err(), "{stopped:?}");
    assert!(gone(worker), "the worker of a stopped program is still running");
}
