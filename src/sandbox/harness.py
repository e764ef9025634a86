# seedflow's test harness, run by CPython inside the wasmtime sandbox. `_harness(job)` takes one
# JSON job: in the pre-initialised sandbox component it is the argument of the exported `run`
# (component.py); a plain python.wasm runs `python -I -S -B -c <this + _harness(stdin)>`.
#
# The verdict is the last line of stderr, tagged with the job's nonce, and counts only if the
# interpreter then returns or exits normally. A plain interpreter starts for every verdict, so the
# harness imports only `types` and `gc` at start: the job is JSON read as a Python literal, text goes back
# hex-encoded, and `traceback` and `ast` load only to explain a failure.
#
# The program under test runs in this same interpreter, so before it runs the harness parses its
# job and drops the text, keeps its own references to what it needs, freezes the tests into a
# tuple, and installs an audit hook (PEP 578, which cannot be removed) that refuses frame
# inspection, tracing and the modules that reach other objects' internals. The status word is
# written from the harness's own constants.
import os as _os
import sys as _sys

# `gc`'s object walks are refused by event as well as by import: importlib loads a module without
# the interpreter's `import` event, and they reach every object, the harness's closures included.
_BLOCKED_EVENTS = frozenset({"sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile",
                             "sys.addaudithook", "sys.monitoring.register_callback",
                             "gc.get_objects", "gc.get_referrers", "gc.get_referents"})
_BLOCKED_MODULES = frozenset({"gc", "atexit", "ctypes", "_ctypes", "_testcapi", "_testinternalcapi", "faulthandler"})
# Attributes that hand out frames (audited as `object.__getattr__`): since Python 3.13 a frame's
# f_locals writes through to the harness's own variables.
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})


def _harness(text):
    job = eval(text, {"__builtins__": {}}, {"null": None, "true": True, "false": False})
    del text
    write, limit, prefix = _os.write, job["feedback_chars"], "\x1eseedflow-verdict " + job["nonce"] + " "
    exec_, compile_, eval_, repr_, str_, len_, type_, isinstance_ = exec, compile, eval, repr, str, len, type, isinstance
    plain_str = str.__str__
    BaseExc, AssertionErr, MemoryErr, SyntaxErr, RuntimeErr = BaseException, AssertionError, MemoryError, SyntaxError, RuntimeError
    import_ = __import__
    # `types` reads a traceback's frame when imported, so it must load before the audit hook.
    TracebackType = import_("types").TracebackType

    def trim(text):
        return text if len_(text) <= limit else text[: limit // 2] + "\n…\n" + text[-limit // 2 :]

    def hex_(text):
        return (text or "").encode("utf-8", "replace").hex() or "-"

    def report(status, feedback="", failed_test=None, exception=None):
        fields = [status, hex_(trim(feedback)), hex_(failed_test), hex_(exception)]
        write(2, (prefix + " ".join(fields) + "\n").encode())

    # The audit hook reads these through its closure: the module's globals are the program's to
    # change. `harness_reads_frames` lets `describe` walk a traceback, running no program code
    # (with the cyclic collector paused, so no finaliser of the program's runs meanwhile); `gc`
    # leaves sys.modules again, so the program's own `import gc` still meets the hook.
    blocked_events, blocked_modules, frame_attributes = _BLOCKED_EVENTS, _BLOCKED_MODULES, _FRAME_ATTRIBUTES
    harness_reads_frames = [False]
    collector = import_("gc")
    pause_collector, resume_collector = collector.disable, collector.enable
    del _sys.modules["gc"], collector

    def describe(error):
        # Keep the frames of the program and the tests, not the harness's. No program code may
        # run while frames can be read: a code object's name and file name can be str subclasses
        # of the program's (`code.replace`), so only their plain str copies are compared.
        where, tb = [], error.__traceback__
        pause_collector()
        harness_reads_frames[0] = True
        try:
            while type_(tb) is TracebackType:
                code = tb.tb_frame.f_code
                filename, name = plain_str(code.co_filename), plain_str(code.co_name)
                if filename == "<program>" or filename.startswith("<test"):
                    where.append('  File "%s", line %s, in %s\n' % (filename, tb.tb_lineno, name))
                tb = tb.tb_next
        finally:
            harness_reads_frames[0] = False
            resume_collector()
        last = import_("traceback").format_exception_only(type_(error), error)
        return ("Traceback (most recent call last):\n" + "".join(where) + "".join(last)).rstrip()

    def actual_value(test, namespace):
        # For `assert f(x) == y`, what f(x) gave against what was expected: the most useful line
        # for Self-Revise (a small model overlooks the difference when it only sees the assert).
        try:
            ast = import_("ast")
            node = ast.parse(test).body[0]
            if isinstance_(node, ast.Assert) and isinstance_(node.test, ast.Compare):
                compare = node.test
                left = ast.get_source_segment(test, compare.left)
                actual = eval_(left, namespace)
                value = repr_(actual)
                line = "\n" + left + " returned " + (value if len_(value) < 500 else value[:500] + "…")
                if len_(compare.ops) == 1 and isinstance_(compare.ops[0], ast.Eq):
                    right = compare.comparators[0]
                    expected = ast.get_source_segment(test, right)
                    line += ", but the test expects " + (expected if len_(expected) < 500 else expected[:500] + "…")
                    # `assert f(x) == wrap(y)` where wrap(what f returned) passes: the logic is right
                    # and only the form is not (a house envelope, a set for a list). A small model
                    # does not see that from the two values; say it.
                    if (isinstance_(right, ast.Call) and isinstance_(right.func, ast.Name)
                            and len_(right.args) == 1 and not right.keywords
                            and eval_(right.func.id, namespace)(actual) == eval_(expected, namespace)):
                        name = right.func.id
                        line += "\nThe value is right, but the test expects it passed to `%s`: return %s(...) of it." % (name, name)
                        if name in namespace:  # the tests' own helper, not a builtin
                            line += " `%s` is defined where your code runs; do not define it." % name
                return line
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
        if event == "object.__getattr__":
            if args[1] in frame_attributes and not harness_reads_frames[0]:
                raise RuntimeErr("not allowed in the sandbox: reading " + str_(args[1]))
        elif event in blocked_events or (event == "import" and args[0] in blocked_modules):
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

