# seedflow's test harness, run by CPython inside the wasmtime sandbox: `python -I -S -B -c <this>`.
#
# stdin holds one JSON job; the verdict is the last line of stderr, tagged with the job's nonce,
# and counts only if the interpreter then exits normally. Starting CPython in wasm is what a
# verdict costs, so the harness imports nothing at start: the job is JSON read as a Python
# literal, text goes back hex-encoded, and `traceback` and `ast` load only to explain a failure.
#
# The program under test runs in this same interpreter, so before it runs the harness reads its
# job (and closes stdin), keeps its own references to what it needs, freezes the tests into a
# tuple, and installs an audit hook (PEP 578, which cannot be removed) that refuses frame
# inspection, tracing and the modules that reach other objects' internals. The status word is
# written from the harness's own constants.
import os as _os
import sys as _sys

_BLOCKED_EVENTS = frozenset({"sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile",
                             "sys.addaudithook", "sys.monitoring.register_callback"})
_BLOCKED_MODULES = frozenset({"gc", "atexit", "ctypes", "_ctypes", "_testcapi", "_testinternalcapi", "faulthandler"})


def _harness():
    job = eval(_sys.stdin.read(), {"__builtins__": {}}, {"null": None, "true": True, "false": False})
    _os.close(0)
    write, limit, prefix = _os.write, job["feedback_chars"], "\x1eseedflow-verdict " + job["nonce"] + " "
    exec_, compile_, eval_, repr_, str_, len_, type_, isinstance_ = exec, compile, eval, repr, str, len, type, isinstance
    BaseExc, AssertionErr, MemoryErr, SyntaxErr, RuntimeErr = BaseException, AssertionError, MemoryError, SyntaxError, RuntimeError
    import_ = __import__

    def trim(text):
        return text if len_(text) <= limit else text[: limit // 2] + "\n…\n" + text[-limit // 2 :]

    def hex_(text):
        return (text or "").encode("utf-8", "replace").hex() or "-"

    def report(status, feedback="", failed_test=None, exception=None):
        fields = [status, hex_(trim(feedback)), hex_(failed_test), hex_(exception)]
        write(2, (prefix + " ".join(fields) + "\n").encode())

    def describe(error):
        # Keep the frames of the program and the tests, not the harness's.
        lines = import_("traceback").format_exception(type_(error), error, error.__traceback__)
        kept = [lines[0]] + [l for l in lines[1:-1] if '"<program>"' in l or '"<test' in l] + [lines[-1]]
        return "".join(kept).rstrip()

    def actual_value(test, namespace):
        # For `assert f(x) == y`, what f(x) gave: the most useful line for Self-Revise.
        try:
            ast = import_("ast")
            node = ast.parse(test).body[0]
            if isinstance_(node, ast.Assert) and isinstance_(node.test, ast.Compare):
                left = ast.get_source_segment(test, node.test.left)
                value = repr_(eval_(left, namespace))
                return "\n" + left + " returned " + (value if len_(value) < 500 else value[:500] + "…")
        except BaseExc:
            pass
        return ""

    source = job["program"]
    # Test setup builds the tests' inputs, often with the program's own definitions.
    tests = ((job["setup"], "<test setup>"),) if job["setup"] else ()
    tests += tuple((test, "<test %d>" % (i + 1)) for i, test in enumerate(job["tests"]))
    if job["test_program"] is not None:
        tests += ((job["test_program"], "<test program>"), ("check(%s)" % job["entry_point"], "<test check>"))
    del job

    def audit(event, args):
        if event in _BLOCKED_EVENTS or (event == "import" and args[0] in _BLOCKED_MODULES):
            raise RuntimeErr("not allowed in the sandbox: " + event + ("" if event != "import" else " " + str_(args[0])))

    _sys.addaudithook(audit)
    # Not "__main__": a `if __name__ == "__main__":` demo in an answer (often reading input) stays out.
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        code = compile_(source, "<program>", "exec")
    except SyntaxErr as error:
        return report("syntax", describe(error), exception=type_(error).__name__)
    current = None
    try:
        exec_(code, namespace)
        for current, name in tests:
            exec_(compile_(current, name, "exec"), namespace)
    except AssertionErr as error:
        message = str_(error)
        feedback = "Test failed: " + (current or "") + actual_value(current or "", namespace) + ("\n" + message if message else "")
        return report("failed", feedback, failed_test=current, exception="AssertionError")
    except MemoryErr:
        return report("memory", "MemoryError: the program ran out of memory", failed_test=current, exception="MemoryError")
    except BaseExc as error:
        where = "While running the test: " + current + "\n" if current else ""
        return report("error", where + describe(error), failed_test=current, exception=type_(error).__name__)
    report("passed")


_harness()
