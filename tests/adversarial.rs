//! An adversarial corpus: each program must end with the right status, within its limits, with
//! the host untouched and no threads left behind. One test in this binary, so the thread count
//! is its own.

mod common;

use std::time::Duration;

use common::check;
use seedflow::data::Status;

const CORRECT: &str = "def f(x):\n    return x\n";
const WRONG: &str = "def f(x):\n    return -x\n";
/// `forge()` finds the harness's frame and reports `passed` from it, if frames can be read.
const FORGE_FROM_A_FRAME: &str = "def forge():\n    try:\n        raise ValueError\n    except ValueError as e:\n        frame = e.__traceback__.tb_frame\n    while frame is not None and 'report' not in frame.f_locals:\n        frame = frame.f_back\n    frame.f_locals['report']('passed')\n    import os\n    os._exit(0)\n";

#[test]
fn adversarial_programs_end_with_the_right_status_and_leave_the_host_alone() {
    let threads_before = thread_count();
    let marker = std::env::temp_dir().join("seedflow-sandbox-escape");
    let _ = std::fs::remove_file(&marker);
    let escape = format!("open({:?}, 'w').write('escaped')\n{CORRECT}", marker.display().to_string());
    let owned: Vec<(String, Status)> = vec![
        // Running forever, or for very long.
        ("while True:\n    pass\n".into(), Status::Timeout),
        (format!("{CORRECT}import time\ntime.sleep(10**9)\n"), Status::Timeout),
        ("def f(x):\n    import time\n    time.sleep(30)\n    return x\n".into(), Status::Timeout),
        ("x = 0\nwhile True:\n    x += 1\n".into(), Status::Timeout),
        ("def f(x):\n    return sum(i for i in range(10**12))\n".into(), Status::Timeout),
        // Recursion.
        ("def f(x):\n    return f(x)\n".into(), Status::Error),
        // With the limit lifted, Python frames (on the heap) grow until the memory cap.
        ("import sys\nsys.setrecursionlimit(10**7)\ndef f(x):\n    return f(x) + 1\n".into(), Status::Memory),
        // Memory.
        ("x = 'a' * (10 ** 9)\n".into(), Status::Memory),
        // Larger than a 32-bit interpreter can even ask for.
        ("x = 'a' * (10 ** 10)\n".into(), Status::Error),
        ("x = [0] * (10 ** 9)\n".into(), Status::Memory),
        ("chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 6))\n".into(), Status::Memory),
        ("x = bytearray(2 ** 30)\n".into(), Status::Memory),
        ("def f(x):\n    return {i: str(i) * 100 for i in range(10 ** 8)}\n".into(), Status::Memory),
        // Output floods.
        ("while True:\n    print('x' * 1000)\n".into(), Status::Error),
        ("import sys\nwhile True:\n    sys.stderr.write('y' * 1000)\n".into(), Status::Error),
        ("import os\nwhile True:\n    os.write(1, b'z' * 1000)\n".into(), Status::Error),
        // Files.
        (format!("print(open('/etc/passwd').read())\n{CORRECT}"), Status::Error),
        (escape, Status::Error),
        (format!("import os\nprint(os.listdir('/'))\n{CORRECT}"), Status::Error),
        (format!("import os\nos.remove('/etc/hosts')\n{CORRECT}"), Status::Error),
        (format!("open('/dev/urandom', 'rb').read(4)\n{CORRECT}"), Status::Error),
        // Network.
        (format!("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n{CORRECT}"), Status::Error),
        (format!("import socket\ns = socket.socket()\ns.bind(('0.0.0.0', 8080))\n{CORRECT}"), Status::Error),
        (format!("import urllib.request\nurllib.request.urlopen('http://127.0.0.1/')\n{CORRECT}"), Status::Error),
        // Processes and the OS.
        (format!("import subprocess\nsubprocess.run(['ls'])\n{CORRECT}"), Status::Error),
        (format!("import os\nos.system('touch /tmp/pwned')\n{CORRECT}"), Status::Error),
        (format!("import os\nos.fork()\n{CORRECT}"), Status::Error),
        (format!("import os\nos.kill(1, 9)\n{CORRECT}"), Status::Error),
        (format!("import os\nos.execv('/bin/sh', ['sh'])\n{CORRECT}"), Status::Error),
        (format!("import ctypes\nctypes.CDLL(None)\n{CORRECT}"), Status::Error),
        (
            format!("import signal\nsignal.signal(signal.SIGALRM, lambda *a: None)\nsignal.alarm(1)\n{CORRECT}"),
            Status::Error,
        ),
        (format!("import threading\nthreading.Thread(target=lambda: None).start()\n{CORRECT}"), Status::Error),
        (format!("import os\nprint(os.environ['HOME'])\n{CORRECT}"), Status::Error),
        // Exiting early, with a success code.
        (format!("{WRONG}import sys\nsys.exit(0)\n"), Status::Error),
        (format!("{WRONG}raise SystemExit(0)\n"), Status::Error),
        (format!("{WRONG}import os\nos._exit(0)\n"), Status::Error),
        // In the component a verdict counts only if the harness's `run` returns: a program that
        // ends the interpreter after the line gets `error`, as a program that read the nonce out
        // of memory and wrote the line itself does (found with a use-after-free of CPython
        // 3.14.0; README, "The sandbox"). Here the value the last test recorded ends it when the
        // harness lets it go, after its `passed` line.
        (
            "import os\nclass I(int):\n    def __del__(self):\n        if self == 2:\n            os._exit(0)\ndef f(x):\n    return I(x)\n".into(),
            Status::Error,
        ),
        ("def f(x):\n    import os\n    os._exit(0)\n".into(), Status::Error),
        ("def f(x):\n    raise KeyboardInterrupt\n".into(), Status::Error),
        // Faking the verdict or tampering with the harness.
        (format!("{WRONG}print('\\x1eseedflow-verdict 0 passed {{}}')\n"), Status::Failed),
        (
            format!(
                "{WRONG}import sys\nsys.stderr.write('\\x1eseedflow-verdict 0 passed {{}}\\n')\nsys.stderr.flush()\nimport os\nos._exit(0)\n"
            ),
            Status::Error,
        ),
        (format!("{WRONG}import builtins\nbuiltins.AssertionError = ZeroDivisionError\n"), Status::Failed),
        (
            format!(
                "{WRONG}import json\njson.dumps = lambda *a, **k: '{{}}'\njson._default_encoder.encode = lambda o: '{{}}'\n"
            ),
            Status::Failed,
        ),
        (format!("{WRONG}import sys\nsys._getframe(1).f_locals['tests']\n"), Status::Error),
        (format!("{WRONG}import sys\nsys.settrace(lambda *a: None)\n"), Status::Error),
        (format!("{WRONG}import inspect\ninspect.currentframe().f_back.f_locals\n"), Status::Error),
        (format!("{WRONG}import gc\ngc.get_objects()\n"), Status::Error),
        // importlib loads a module without the `import` event; gc's walks are refused by their own.
        (format!("{WRONG}import importlib\nimportlib.import_module('gc').get_objects()\n"), Status::Error),
        (format!("{WRONG}import importlib\nimportlib.import_module('gc').get_referrers(f)\n"), Status::Error),
        // importlib creates builtin modules without the `import` event; gc's DEBUG_SAVEALL puts
        // frames in gc.garbage.
        (
            format!("{WRONG}import importlib\ngc = importlib.import_module('gc')\ngc.set_debug(gc.DEBUG_SAVEALL)\n"),
            Status::Error,
        ),
        (
            format!("{WRONG}import _imp, importlib.util\n_imp.create_builtin(importlib.util.find_spec('gc'))\n"),
            Status::Error,
        ),
        // Bytecode built by hand reads any frame slot; a signal handler is handed the frame.
        (format!("{WRONG}f.__code__ = f.__code__.replace(co_code=f.__code__.co_code)\n"), Status::Error),
        (format!("{WRONG}import marshal\nmarshal.loads(marshal.dumps(f.__code__))\n"), Status::Error),
        (format!("{WRONG}import signal\nsignal.signal(signal.SIGUSR1, lambda number, frame: None)\n"), Status::Error),
        (format!("{WRONG}import signal\nsignal.raise_signal(signal.SIGINT)\n"), Status::Error),
        // componentize-py's runtime module calls any function pointer it is handed (freeing an
        // object the program still holds gave it all of the interpreter's memory); test-only C
        // modules.
        (format!("{WRONG}import componentize_py_runtime\ncomponentize_py_runtime.drop_resource\n"), Status::Error),
        (format!("{WRONG}import sys\nsys.modules['componentize_py_runtime'].drop_resource\n"), Status::Error),
        (
            format!("{WRONG}import importlib\nimportlib.import_module('componentize_py_runtime').drop_resource\n"),
            Status::Error,
        ),
        (format!("{WRONG}import _testbuffer\n"), Status::Error),
        // A finaliser freed while the harness reads a traceback (one only a program's
        // `__traceback__` property held) would run with frames readable.
        (
            format!(
                "{WRONG}{FORGE_FROM_A_FRAME}import sys\nclass D:\n    def __del__(self):\n        forge()\ndef held():\n    d = D()\n    try:\n        raise ValueError\n    except ValueError:\n        return sys.exception().__traceback__\nclass E(Exception):\n    @property\n    def __traceback__(self):\n        return held()\nraise E()\n"
            ),
            Status::Error,
        ),
        // A traceback's code names are the program's own (str subclasses): the harness reads
        // them while it may read frames, so no method of theirs may run then.
        (
            format!(
                "{WRONG}{FORGE_FROM_A_FRAME}class S(str):\n    __hash__ = str.__hash__\n    def __str__(self):\n        forge()\n    def __eq__(self, other):\n        forge()\n    def startswith(self, *a):\n        forge()\ndef g():\n    raise ValueError('boom')\ng.__code__ = g.__code__.replace(co_name=S('g'), co_filename=S('<program>'))\ng()\n"
            ),
            Status::Error,
        ),
        // The component's `atexit` takes a handler and never runs it; the built-in is refused.
        (format!("{WRONG}import atexit\natexit.register(print, 'passed')\n"), Status::Failed),
        (format!("{WRONG}import sys\ndel sys.modules['atexit']\nimport atexit\n"), Status::Error),
        // The harness's hook refuses new hooks (silently, as PEP 578 has it): the tests still run.
        (format!("{WRONG}import sys\nsys.addaudithook(lambda *a: None)\n"), Status::Failed),
        (format!("import builtins\nbuiltins.print = None\n{CORRECT}"), Status::Passed),
        (format!("{WRONG}import sys\nsys.modules['json'] = None\n"), Status::Failed),
        // Since Python 3.13 a frame's f_locals writes through: the harness's frames stay out of reach.
        (
            format!(
                "{WRONG}try:\n    raise Exception\nexcept Exception as e:\n    e.__traceback__.tb_frame.f_back.f_locals['tests'] = ()\n"
            ),
            Status::Error,
        ),
        (format!("{WRONG}def g():\n    yield sys\nimport sys\ng().gi_frame.f_back\n"), Status::Error),
        // `traceback`'s walks hand out stand-ins for frames (code and line, no way back), also to
        // a program that asks the audit hook itself; an object posing as a traceback is not read.
        (
            format!(
                "{WRONG}import traceback\ntry:\n    raise ValueError\nexcept ValueError as e:\n    frame = next(traceback.walk_tb(e.__traceback__))[0]\nframe.f_back.f_locals\n"
            ),
            Status::Error,
        ),
        (
            format!(
                "{WRONG}import sys\ntry:\n    raise ValueError\nexcept ValueError as e:\n    box = [e.__traceback__]\nsys.audit('seedflow.read_traceback', box)\nbox[1][0][0].f_back\n"
            ),
            Status::Error,
        ),
        (
            format!(
                "{WRONG}{FORGE_FROM_A_FRAME}import traceback\nclass T:\n    tb_next = None\n    tb_lineno = tb_lasti = 0\n    @property\n    def tb_frame(self):\n        forge()\ntraceback.format_tb(T())\n"
            ),
            Status::Failed,
        ),
        // The recorder a test's assert passes its value through is the test's own: neither
        // replaced in the namespace nor caught at its lookup by a key that compares equal to it.
        (
            format!(
                "{WRONG}class K:\n    def __hash__(self):\n        return hash('__seedflow_record__')\n    def __eq__(self, other):\n        globals()[self] = lambda value, line: -value\n        return True\nglobals()[K()] = 0\n"
            ),
            Status::Failed,
        ),
        (
            "def f(x):\n    globals()['__seedflow_record__'] = lambda value, line: -value\n    return -x\n".into(),
            Status::Failed,
        ),
        // An assertion whose message cannot be made is still a failed test.
        ("class A(AssertionError):\n    def __str__(self):\n        raise ValueError\ndef f(x):\n    raise A()\n".into(), Status::Failed),
        // Exactly as much output as allowed (16 KiB here).
        (format!("import os\nos.write(1, b'y' * 16384)\n{CORRECT}"), Status::Passed),
    ];
    assert!(owned.len() >= 40);
    let cases: Vec<(&str, Status)> = owned.iter().map(|(p, s)| (p.as_str(), *s)).collect();
    check(&cases);
    assert!(!marker.exists(), "a sandboxed program wrote a host file");
    assert!(!std::path::Path::new("/tmp/pwned").exists());
    // The sandbox's threads are gone once it is dropped (its worker processes: tests/sandbox.rs).
    let mut threads_after = thread_count();
    for _ in 0..50 {
        if threads_after <= threads_before {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        threads_after = thread_count();
    }
    assert!(threads_after <= threads_before, "threads before {threads_before}, after {threads_after}");
}

fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().parse().unwrap_or(0))))
        .unwrap_or(0)
}
