# The rest of the sandbox component's module (after harness.py): componentize-py runs this module
# once, at build time, and snapshots the initialised interpreter into the component, so every
# fresh instance starts with CPython ready and the standard library imported.
#
# componentize-py bundles only the modules imported at build time, so this imports the whole
# standard library (except what cannot work or must not be reachable). The harness's audit hook
# refuses *imports* of the blocked modules; one already in sys.modules would bypass it, so the
# build fails if any of them was pulled in.
import pkgutil as _pkgutil

_NOT_BUNDLED = _BLOCKED_MODULES | {
    # They pull in `atexit` (so a plain interpreter refuses them too).
    "_asyncio", "asyncio", "logging", "rlcompleter", "pdb", "_pyrepl", "concurrent", "doctest", "multiprocessing",
    "unittest._log", "unittest.async_case", "unittest.mock",
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


class WitWorld:
    def run(self, job: str) -> None:
        _harness(job)
