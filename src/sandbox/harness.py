# seedflow's test harness, run by CPython inside the wasmtime sandbox. `_harness(job)` takes one
# JSON job: in the pre-initialised sandbox component it is the argument of the exported `run`
# (component.py); a plain python.wasm runs `python -I -S -B -c <this + _harness(stdin)>`.
#
# The verdict is a line of stderr tagged with the job's nonce (the last such line), and counts
# only if `run` then returns (in the component; a plain interpreter must exit with 0). A plain
# interpreter starts for every verdict, so the harness imports only `types` and the built-in `gc`
# and `_ast` at start: the job is JSON read as a Python literal, text goes back hex-encoded, and
# `traceback` loads only to explain a failure.
#
# The program under test runs in this same interpreter, so before it runs the harness parses its
# job and drops the text, keeps its own references to what it needs, freezes the tests into a
# tuple, and installs an audit hook (PEP 578, which cannot be removed) that refuses frame
# inspection, tracing and the modules that reach other objects' internals. The status word is
# written from the harness's own constants.
import os as _os
import sys as _sys

# `gc`'s object walks, which reach every object (the harness's closures included), are refused by
# their events as well as `gc` by import (both ways to import it, below): belt and braces.
# A code object built by hand (`code.replace`, `types.CodeType`, `marshal`) runs unchecked bytecode,
# which can read any slot of a frame, the audit hook's own included.
_BLOCKED_EVENTS = frozenset({"sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile",
                             "sys.addaudithook", "sys.monitoring.register_callback",
                             "gc.get_objects", "gc.get_referrers", "gc.get_referents", "code.__new__"})
# CPython's test-only C modules (`_testcapi`, `_testbuffer`, `xxsubtype`, ...) are refused by prefix.
_BLOCKED_MODULES = frozenset({"gc", "ctypes", "_ctypes", "faulthandler"})
_TEST_MODULE_PREFIXES = ("_test", "_xx", "xx")
# Loaded, and made harmless: `_signal` (the standard library imports `signal` throughout) loses
# what sets a handler in `_harness`; in the component only, componentize-py's runtime module is
# emptied there, and `atexit` is a module of component.py's that runs no exit handler. A fresh
# copy (a reload, or the built-in `atexit` in a plain interpreter) is refused like the blocked
# modules.
_REPLACED_MODULES = frozenset({"_signal", "componentize_py_runtime", "atexit"})
# Attributes that hand out frames (audited as `object.__getattr__`): since Python 3.13 a frame's
# f_locals writes through to the harness's own variables.
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})


def _harness(text, modules_preloaded=True):
    job = eval(text, {"__builtins__": {}}, {"null": None, "true": True, "false": False})
    del text
    write, limit, prefix = _os.write, job["feedback_chars"], "\x1eseedflow-verdict " + job["nonce"] + " "
    exec_, compile_, eval_, repr_, str_, len_, type_, isinstance_ = exec, compile, eval, repr, str, len, type, isinstance
    plain_str = str.__str__
    get_traceback = BaseException.__dict__["__traceback__"].__get__
    BaseExc, AssertionErr, MemoryErr, SyntaxErr, RuntimeErr = BaseException, AssertionError, MemoryError, SyntaxError, RuntimeError
    import_ = __import__
    # `types` reads a traceback's frame when imported, so it must load before the audit hook.
    types = import_("types")
    TracebackType, FunctionType, CodeType = types.TracebackType, types.FunctionType, types.CodeType
    del types

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
    blocked_events, frame_attributes = _BLOCKED_EVENTS, _FRAME_ATTRIBUTES
    blocked_modules, test_modules = _BLOCKED_MODULES | _REPLACED_MODULES, _TEST_MODULE_PREFIXES

    def refused(module_name):
        return module_name in blocked_modules or module_name.startswith(test_modules)
    harness_reads_frames = [False]
    collector = import_("gc")
    pause_collector, resume_collector = collector.disable, collector.enable
    del _sys.modules["gc"], collector

    def entries(tb):
        # (code, line, instruction offset) of each entry of a traceback, innermost last. No program
        # code may run while frames can be read: only a real traceback is followed (a program's
        # object could define `tb_frame`), each one visited is held until the reading ends, so
        # nothing is freed (no finaliser of the program's runs) meanwhile, nor is the cyclic
        # collector let run.
        read, held = [], []
        pause_collector()
        harness_reads_frames[0] = True
        try:
            while type_(tb) is TracebackType:
                held.append(tb)
                read.append((tb.tb_frame.f_code, tb.tb_lineno, tb.tb_lasti))
                tb = tb.tb_next
        finally:
            harness_reads_frames[0] = False
            resume_collector()
        return read

    def places(error):
        # (file, line, function) of the program's and the tests' frames in the error's traceback,
        # innermost last; not the harness's. The traceback is read through BaseException's own
        # descriptor (a program's class may define a `__traceback__` property); a code object's
        # name and file name can be str subclasses of the program's (`code.replace`), so only
        # their plain str copies are compared.
        where = []
        for code, line, _ in entries(get_traceback(error)):
            filename, name = plain_str(code.co_filename), plain_str(code.co_name)
            if filename == "<program>" or filename.startswith("<test"):
                where.append((filename, line, name))
        return where

    def describe(error):
        where = "".join('  File "%s", line %s, in %s\n' % place for place in places(error))
        # `format_exception_only` also walks the tracebacks of a chained exception's cause and
        # context (and of a group's members), which a plain interpreter's audit hook refuses (its
        # `traceback` has no stand-ins), and calls the program's `__str__`: it must not raise.
        try:
            last = "".join(import_("traceback").format_exception_only(type_(error), error))
        except BaseExc:
            try:
                last = "%s: %s" % (type_(error).__name__, str_(error))
            except BaseExc:
                last = "an exception whose message cannot be shown"
        return ("Traceback (most recent call last):\n" + where + last).rstrip()

    def actual_value(shape, namespace):
        # For `assert f(x) == y`, what f(x) gave against what was expected: the most useful line
        # for Self-Revise (a small model overlooks the difference when it only sees the assert).
        # The value is the one the failing assert's own run gave (`record`), not a second call.
        if shape is None or not left_value or left_value[-1][0] != shape[0]:
            return ""
        _, left, expected, wrap, _ = shape
        actual = left_value[-1][1]
        try:
            value = repr_(actual)
            line = "\n" + left + " returned " + (value if len_(value) < 500 else value[:500] + "…")
            if expected is not None:
                line += ", but the test expects " + (expected if len_(expected) < 500 else expected[:500] + "…")
        except BaseExc:
            return ""
        # `assert f(x) == wrap(y)` where wrap(what f returned) passes: the logic is right and only
        # the form is not (a house envelope, a set for a list). A small model does not see that
        # from the two values; say it. (`expected` may name a test's local variable: no hint then.)
        try:
            if wrap is not None and eval_(wrap, namespace)(actual) == eval_(expected, namespace):
                line += "\nThe value is right, but the test expects it passed to `%s`: return %s(...) of it." % (wrap, wrap)
                if wrap in namespace:  # the tests' own helper, not a builtin
                    line += " `%s` is defined where your code runs; do not define it." % wrap
        except BaseExc:
            pass
        return line

    # The tests are compiled before the program runs (it may replace modules, or `compile`). A
    # test `assert left op right` is compiled with `left` passed through `record` (as
    # `__seedflow_record__`, with the assert's line), which keeps its value for `actual_value`; a
    # shape, by the assert's line, holds the sources that feedback quotes. A HumanEval test
    # program's `check` has its asserts instrumented so (in its loops too), its parameter shown as
    # the function under test. The syntax tree is `_ast`'s (built in): importing `ast`
    # would cost a plain interpreter a third of its start.
    #
    # `record` reaches a test as a function's parameter, never through the namespace: the program
    # owns that dict, and could replace a name in it while a test runs, or catch its lookup with a
    # key of its own that hashes and compares equal to it. A plain test's one assert is the body of
    # a function of `record` (`as_function`). A HumanEval test program runs at the top level as
    # natively, and the harness calls a `check` of its own, made apart with `record` for a
    # keyword-only parameter, held by the harness alone.
    ast = import_("_ast")
    left_value = []
    RECORDER = "__seedflow_record__"
    # How a compiled test runs: in the namespace; as a function of `record`; as a HumanEval test
    # program whose `check` is made apart; as `check(entry point)`, a function of that `check`.
    IN_NAMESPACE, WITH_RECORD, DEFINES_CHECK, CALLS_CHECK = 0, 1, 2, 3

    def record(value, line):
        left_value.append((line, value))
        return value

    def segment(source, node):
        # The node's source text (its offsets count UTF-8 bytes).
        lines = source.encode().splitlines(True)
        first, last = node.lineno - 1, node.end_lineno - 1
        if first == last:
            text = lines[first][node.col_offset : node.end_col_offset]
        else:
            text = lines[first][node.col_offset :] + b"".join(lines[first + 1 : last]) + lines[last][: node.end_col_offset]
        return text.decode()

    def at(new, old):
        new.lineno, new.col_offset, new.end_lineno, new.end_col_offset = old.lineno, old.col_offset, old.end_lineno, old.end_col_offset
        return new

    def instrumented(node):
        # (A constant on the left, `assert 0 < f(x) < 2`, says nothing of what f returned.)
        return (isinstance_(node, ast.Assert) and isinstance_(node.test, ast.Compare)
                and not isinstance_(node.test.left, ast.Constant))

    def walk(tree, own_scope=False):
        # Every node of `tree`, or with `own_scope` those of its own scope: not of the functions,
        # lambdas or classes in it (whose closures, which a program may be handed, would carry
        # what they read).
        found, stack = [], [tree]
        while stack:
            node = stack.pop()
            found.append(node)
            if own_scope and node is not tree and isinstance_(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            for field in node._fields:
                value = getattr(node, field, None)
                stack.extend(v for v in (value if isinstance_(value, list) else [value]) if isinstance_(v, ast.AST))
        return found

    def shape_of(node, source, show):
        compare = node.test
        right = compare.comparators[0]
        single_eq = len_(compare.ops) == 1 and isinstance_(compare.ops[0], ast.Eq)
        helper = (isinstance_(right, ast.Call) and isinstance_(right.func, ast.Name)
                  and len_(right.args) == 1 and not right.keywords)
        return (node.lineno, show(segment(source, compare.left)), show(segment(source, right)) if single_eq else None,
                right.func.id if single_eq and helper else None, show(segment(source, node)))

    def instrument(node):
        compare = node.test
        recorder = at(ast.Name(id=RECORDER, ctx=ast.Load()), compare.left)
        line = at(ast.Constant(value=node.lineno), compare.left)
        compare.left = at(ast.Call(func=recorder, args=[compare.left, line], keywords=[]), compare.left)

    def function_code(node, name):
        # The code of the function `node` defines (one without defaults, decorators, annotations
        # or type parameters, which the enclosing code would evaluate), compiled alone.
        module = compile_(ast.Module(body=[node], type_ignores=[]), name, "exec")
        return [c for c in module.co_consts if type_(c) is CodeType and c.co_name == node.name][0]

    def as_function(tree, name, parameter):
        # The code of a function of `parameter` whose body is `tree`'s one statement, a `:=` target
        # in it staying the namespace's; None where the body would make a generator (a `yield`,
        # which the top level refuses), so that the statement runs where its error is raised.
        statement = tree.body[0]
        targets = []
        for node in walk(statement):
            if isinstance_(node, ast.NamedExpr) and isinstance_(node.target, ast.Name) and node.target.id not in targets:
                targets.append(node.target.id)
        body = ([at(ast.Global(names=targets), statement)] if targets else []) + [statement]
        arguments = ast.arguments(posonlyargs=[], args=[at(ast.arg(arg=parameter), statement)], kwonlyargs=[],
                                  kw_defaults=[], defaults=[])
        function = ast.FunctionDef(name="<module>", args=arguments, body=body, decorator_list=[], type_params=[])
        code = function_code(at(function, statement), name)
        return None if code.co_flags & 0x20 else code

    def prepare(test, name, entry_point=None):
        # The compiled test, how it runs, and its asserts' shapes by line. A test that does not
        # compile is raised in its turn, as compiling it then would have.
        try:
            tree = compile_(test, name, "exec", ast.PyCF_ONLY_AST)
            if entry_point is None:
                if len_(tree.body) == 1 and instrumented(tree.body[0]):
                    shapes = {tree.body[0].lineno: shape_of(tree.body[0], test, str_)}
                    instrument(tree.body[0])
                    code = as_function(tree, name, RECORDER)
                    if code is not None:
                        return (code, WITH_RECORD), shapes
                return (compile_(test, name, "exec"), IN_NAMESPACE), {}
            # The test program runs as written. The harness calls a `check` of its own, made from
            # a second parse of the one the module ends with (if its definition evaluates nothing):
            # the asserts of its own scope record their values, `record` a keyword-only parameter.
            checks = [i for i, n in enumerate(tree.body) if isinstance_(n, ast.FunctionDef) and n.name == "check"
                      and n.args.args and not n.decorator_list and not n.args.defaults and not n.args.kw_defaults
                      and not getattr(n, "type_params", None)]
            if not checks:
                return (compile_(tree, name, "exec"), IN_NAMESPACE), {}
            check = compile_(test, name, "exec", ast.PyCF_ONLY_AST).body[checks[-1]]
            parameter = check.args.args[0].arg + "("
            show = lambda text: text.replace(parameter, entry_point + "(")
            # Every assert is named when it fails, its value recorded where it is of `check`'s scope.
            shapes = {}
            for node in walk(tree):
                if instrumented(node):
                    shapes[node.lineno] = shape_of(node, test, show)
            for node in walk(check, own_scope=True):
                if instrumented(node):
                    instrument(node)
            for argument in check.args.args + check.args.posonlyargs + check.args.kwonlyargs:
                argument.annotation = None
            check.returns = None
            check.args.kwonlyargs.append(at(ast.arg(arg=RECORDER), check))
            check.args.kw_defaults.append(None)
            return ((compile_(tree, name, "exec"), function_code(check, name)), DEFINES_CHECK), shapes
        except BaseExc as error:
            return error, {}

    def prepare_check(entry_point, name):
        # `check(entry_point)`, as a function of the `check` the test program's run made.
        try:
            return (as_function(compile_("check(%s)" % entry_point, name, "exec", ast.PyCF_ONLY_AST), name, "check"),
                    CALLS_CHECK)
        except BaseExc as error:
            return error

    source = job["program"]
    # Test setup builds the tests' inputs, often with the program's own definitions. Each test:
    # its text, compiled, its asserts' shapes and the file they are in.
    tests = ((job["setup"], "<test setup>"),) if job["setup"] else ()
    tests = tuple((test,) + prepare(test, name) + (name,)
                  for test, name in tests + tuple((test, "<test %d>" % (i + 1)) for i, test in enumerate(job["tests"])))
    if job["test_program"] is not None:
        program, shapes = prepare(job["test_program"], "<test program>", job["entry_point"])
        check = "check(%s)" % job["entry_point"]
        defines_check = not isinstance_(program, BaseExc) and program[1] == DEFINES_CHECK
        called = prepare_check(job["entry_point"], "<test check>") if defines_check else prepare(check, "<test check>")[0]
        tests += ((job["test_program"], program, shapes, "<test program>"), (check, called, shapes, "<test program>"))
    del job, ast

    # importlib creates a builtin module without the `import` event: `gc` so (whose DEBUG_SAVEALL
    # puts cyclic garbage, frames included, in gc.garbage), and `atexit` and `faulthandler`. Every
    # creation goes through the audit hook, the only holder of the real `_imp.create_builtin`
    # (a wrapper's closure could be read), with a spec of the hook's own making.
    imp = import_("_imp")
    create_builtin, audit_, Spec = imp.create_builtin, _sys.audit, import_("types").SimpleNamespace

    def create_builtin_checked(spec):
        box = [spec]
        audit_("seedflow.create_builtin", box)
        return box[1]

    # `traceback` takes a traceback's frames to read their code. Its two walks over a traceback
    # (and so `traceback.print_exc`, `format_exc`, `logging.exception`, `exc_info=True`) get
    # stand-ins instead, holding the code and line and no globals or locals: a program's error
    # handler prints, formats and logs its traceback as natively, and no frame leaves the
    # harness. The audit hook reads the frames (no program reaches its closure); these functions,
    # which a program can reach, hold nothing that could.
    class Frame:
        __slots__ = ("f_code", "f_lineno", "f_globals", "f_locals")

    def stand_ins(tb):
        box = [tb]
        audit_("seedflow.read_traceback", box)
        for code, line, offset in box[1]:
            frame = Frame()
            frame.f_code, frame.f_lineno, frame.f_globals, frame.f_locals = code, line, {}, {}
            yield frame, line, offset

    def walk_tb(tb):
        for frame, line, _ in stand_ins(tb):
            yield frame, line

    def walk_tb_with_full_positions(tb):
        for frame, line, offset in stand_ins(tb):
            positions = position_of(frame.f_code, offset)
            yield frame, ((line,) + positions[1:] if positions[0] is None else positions)

    def audit(event, args):
        if event == "seedflow.read_traceback":
            box = args[0]
            if type_(box) is not list or len_(box) != 1:
                raise RuntimeErr("not allowed in the sandbox: " + event)
            box.append(entries(box[0]))
            return
        if event == "seedflow.create_builtin":
            box = args[0]
            if type_(box) is not list or len_(box) != 1:
                raise RuntimeErr("not allowed in the sandbox: " + event)
            name = plain_str(box[0].name)
            if refused(name) or name == "_imp":
                raise RuntimeErr("not allowed in the sandbox: import " + name)
            box.append(create_builtin(Spec(name=name)))
            return
        # A name may be a str subclass of the program's, with an `__eq__` that lies: compared as
        # its plain str copy.
        if event == "object.__getattr__":
            if plain_str(args[1]) in frame_attributes and not harness_reads_frames[0]:
                raise RuntimeErr("not allowed in the sandbox: reading " + plain_str(args[1]))
        elif event in blocked_events or (event == "import" and refused(plain_str(args[0]))):
            raise RuntimeErr("not allowed in the sandbox: " + event + ("" if event != "import" else " " + plain_str(args[0])))

    # A Python signal handler is called with the program's running frame, whose `f_back` leads
    # to the harness's: no handler may be set, nor a signal raised (WASI emulates them in-process).
    def no_signals(*args):
        raise RuntimeErr("not allowed in the sandbox: signal handlers")

    signals = import_("_signal")
    signals.signal = signals.raise_signal = no_signals
    if "signal" in _sys.modules:
        _sys.modules["signal"].raise_signal = no_signals
    del signals
    # componentize-py's runtime module calls whatever function pointer it is handed
    # (`drop_resource(index, handle)`): with it a program reads and writes all of the interpreter's
    # memory. The running component never calls it from Python.
    runtime = _sys.modules.pop("componentize_py_runtime", None)
    if runtime is not None:
        for name in [name for name in runtime.__dict__ if not name.startswith("__")]:
            delattr(runtime, name)
    del runtime
    # Reading bytecode from bytes (`marshal.loads`) builds code objects too. The component has
    # every module it can import loaded already; a plain interpreter reads the standard library's
    # `.pyc` files with it, so there it stays open.
    if modules_preloaded:
        blocked_events = blocked_events | {"marshal.loads", "marshal.load"}
    _sys.addaudithook(audit)
    imp.create_builtin = create_builtin_checked
    # Loaded already in the component; a plain interpreter loads it when asked, unchanged.
    traceback = _sys.modules.get("traceback")
    if traceback is not None:
        position_of = traceback._get_code_position
        traceback.walk_tb, traceback._walk_tb_with_full_positions = walk_tb, walk_tb_with_full_positions
    del traceback
    del imp
    # Not "__main__": a `if __name__ == "__main__":` demo in an answer (often reading input) stays out.
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        code = compile_(source, "<program>", "exec")
    except SyntaxErr as error:
        return report("syntax", describe(error), exception=type_(error).__name__)
    except BaseExc as error:
        # The parser's own limits (`MemoryError: Parser stack overflowed`, nesting too deep).
        return report("error", "While compiling the program: " + describe(error), exception=type_(error).__name__)
    current, shapes, file, checker = None, {}, None, None
    try:
        exec_(code, namespace)
        for current, compiled, shapes, file in tests:
            if isinstance_(compiled, BaseExc):
                raise compiled
            del left_value[:]
            code, runs = compiled
            if runs == IN_NAMESPACE:
                exec_(code, namespace)
            elif runs == WITH_RECORD:
                FunctionType(code, namespace)(record)
            elif runs == DEFINES_CHECK:
                module, check_code = code
                exec_(module, namespace)
                checker = FunctionType(check_code, namespace)
            else:
                FunctionType(code, namespace)(lambda candidate: checker(candidate, **{RECORDER: record}))
    except AssertionErr as error:
        # The assert that failed: the innermost frame's, if it is one of the test's (not an
        # assert of the program's own). A HumanEval test names it rather than `check(f)`.
        shape, where = None, places(error) if shapes else []
        if where and where[-1][0] == file:
            shape = shapes.get(where[-1][1])
        failed = shape[4] if shape is not None and file == "<test program>" else current
        try:
            message = str_(error)
        except BaseExc:
            message = "(an AssertionError whose message cannot be shown)"
        feedback = "Test failed: " + (failed or "") + actual_value(shape, namespace) + ("\n" + message if message else "")
        return report("failed", feedback, failed_test=failed, exception="AssertionError")
    except MemoryErr:
        return report("memory", "MemoryError: the program ran out of memory", failed_test=current, exception="MemoryError")
    except BaseExc as error:
        where = "While running the test: " + current + "\n" if current else ""
        return report("error", where + describe(error), failed_test=current, exception=type_(error).__name__)
    report("passed")

