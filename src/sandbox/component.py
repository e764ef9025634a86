# The rest of the sandbox component's module (after harness.py): componentize-py runs this module
# once, at build time, and snapshots the initialised interpreter into the component, so every
# fresh instance starts with CPython ready and the standard library imported.
#
# componentize-py bundles only the modules imported at build time, so this imports the whole
# standard library (except what cannot work or must not be reachable). The harness's audit hook
# refuses *imports* of the blocked modules; one already in sys.modules would bypass it, so the
# build fails if any of them was pulled in.
import pkgutil as _pkgutil
import types as _types


def _exit_handlers_that_never_run():
    # This interpreter never exits: an instance is dropped after its one run, so no exit handler
    # could run (natively they run after the tests, and change no verdict). In place of the
    # built-in `atexit`, whose handlers a plain interpreter would run after the verdict, a module
    # that takes handlers and keeps none lets the standard library that registers one (`logging`,
    # `asyncio`, `concurrent.futures`, `doctest`) load here as natively.
    if "atexit" in _sys.modules:
        raise RuntimeError("the built-in atexit was loaded before the sandbox's")
    module = _types.ModuleType("atexit", "Exit handlers, which the sandbox never runs.")
    # Defined by `exec` in the module's own namespace: functions defined here would carry this
    # module's globals (the harness's) as their `__globals__`, for any program to read.
    exec(
        "def register(func, *args, **kwargs):\n    return func\n"
        "def unregister(func):\n    pass\n"
        "def _run_exitfuncs():\n    pass\n"
        "def _clear():\n    pass\n"
        "def _ncallbacks():\n    return 0\n",
        module.__dict__,
    )
    _sys.modules["atexit"] = module


_exit_handlers_that_never_run()
del _exit_handlers_that_never_run

_NOT_BUNDLED = _BLOCKED_MODULES | {
    # They pull in `gc`.
    "timeit", "trace",
    # Side effects on import, user interfaces, the test suite.
    "antigravity", "this", "__hello__", "__phello__", "__main__", "idlelib", "tkinter", "turtle", "turtledemo",
    "curses", "pydoc", "ensurepip", "venv", "webbrowser", "test", "tests",
}


def _bundle_standard_library():
    def wanted(name):
        return not ((set(name.split(".")) | {name}) & _NOT_BUNDLED or name.startswith(_TEST_MODULE_PREFIXES))

    for name in sorted(_sys.stdlib_module_names):
        if not wanted(name):
            continue
        try:
            module = __import__(name)
        except BaseException:  # Not built for WASI (ssl, readline, ...).
            continue
        for info in _pkgutil.walk_packages(getattr(module, "__path__", []), name + ".", onerror=lambda _: None):
            if wanted(info.name):
                try:
                    __import__(info.name)
                except BaseException:
                    pass
    reachable = {name for name in _sys.modules if name in _BLOCKED_MODULES or name.startswith(_TEST_MODULE_PREFIXES)}
    if reachable:
        raise RuntimeError("the sandbox must not preload " + ", ".join(sorted(reachable)))
    # A built-in module that is not CPython's own came with componentize-py; the harness must know
    # what it can do (its runtime module's functions call raw function pointers).
    unknown = set(_sys.builtin_module_names) - set(_sys.stdlib_module_names) - _REPLACED_MODULES
    if unknown:
        raise RuntimeError("the sandbox does not know the built-in modules " + ", ".join(sorted(unknown)))


_bundle_standard_library()
del _bundle_standard_library, _pkgutil
# A log call looks up its caller's frame (`sys._getframe`, which the harness refuses) for the
# record's file and line; without `_srcfile` it does not, and records say "(unknown file)".
_sys.modules["logging"]._srcfile = None


class WitWorld:
    def run(self, job: str) -> None:
        _harness(job)
