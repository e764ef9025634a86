import sys, time
from wasmtime import Engine, Store, Module, Linker, WasiConfig, Config
wasm, root, pypath = sys.argv[1], sys.argv[2], sys.argv[3]
code0 = ("import time\nsrc=open('/mbpp123.py').read()\nt=time.perf_counter()\n"
        "exec(compile(src,'p','exec'),{'__name__':'__main__'})\nprint('seconds', time.perf_counter()-t)\n")
code = sys.argv[4] if len(sys.argv) > 4 else code0
engine = Engine(Config())
t = time.time(); module = Module.from_file(engine, wasm); print("compile", round(time.time()-t, 1), "s", flush=True)
linker = Linker(engine); linker.define_wasi()
for _ in range(1):
    wasi = WasiConfig()
    wasi.argv = ["python", "-c", code]
    wasi.preopen_dir(root, "/")
    if pypath: wasi.env = [("PYTHONPATH", pypath)]
    wasi.inherit_stdout(); wasi.inherit_stderr()
    store = Store(engine); store.set_wasi(wasi)
    instance = linker.instantiate(store, module)
    try:
        instance.exports(store)["_start"](store)
    except Exception as e:
        if "exit status 0" not in str(e): print("error", e)
