//! The sandbox component: seedflow's harness and the whole standard library, built into a
//! pre-initialised CPython component by componentize-py and cached. Starting a fresh instance of
//! it takes a few milliseconds, where a plain python.wasm spends ~100 ms starting CPython.

use std::path::PathBuf;
use std::process::Command;

use crate::assets::{self, AssetError, COMPONENTIZE_PY, PYTHON_WASM, cache_dir, last_lines};
use crate::store::sha256_hex;

use super::HARNESS;

const WIT: &str = include_str!("harness.wit");
const COMPONENT_MODULE: &str = include_str!("component.py");

/// What runs programs: `SEEDFLOW_PYTHON_WASM` if set (a plain python.wasm or a component of the
/// same interface), else the sandbox component, built on first use.
pub fn interpreter(progress: &dyn Fn(&str)) -> Result<PathBuf, AssetError> {
    if std::env::var_os(PYTHON_WASM.override_env).is_some() {
        return assets::ensure(&PYTHON_WASM, progress);
    }
    let module = format!("{HARNESS}\n{COMPONENT_MODULE}");
    let key = sha256_hex(format!("{}\n{WIT}\n{module}", COMPONENTIZE_PY.sha256).as_bytes());
    let target = cache_dir().join("sandbox").join(format!("python-sandbox-{}.wasm", &key[..16]));
    // Only ever renamed into place once built, so its presence is proof.
    if target.exists() {
        return Ok(target);
    }
    let tool = assets::ensure(&COMPONENTIZE_PY, progress)?;
    progress("building the sandbox component (CPython with seedflow's harness, pre-initialised)");
    let dir = target.parent().unwrap_or(&target).to_path_buf();
    let cache_error = |source| AssetError::Cache { dir: dir.clone(), source };
    std::fs::create_dir_all(&dir).map_err(cache_error)?;
    let work = tempfile::tempdir_in(&dir).map_err(cache_error)?;
    std::fs::write(work.path().join("harness.wit"), WIT).map_err(cache_error)?;
    std::fs::write(work.path().join("seedflow_sandbox.py"), module).map_err(cache_error)?;
    let built = work.path().join("sandbox.wasm");
    // The extension module is componentize-py's whole tool; its `script()` is the command line.
    let run_tool = "import sys; sys.path.insert(0, sys.argv.pop(1)); import componentize_py; componentize_py.script()";
    let output = Command::new("python3")
        .args(["-I", "-c", run_tool])
        .arg(tool.parent().unwrap_or(&dir))
        .args(["-d", "harness.wit", "-w", "harness", "componentize", "-p", ".", "seedflow_sandbox", "-o"])
        .arg(&built)
        .current_dir(work.path())
        .output()
        .map_err(|source| AssetError::NoPip { asset: "python", env: PYTHON_WASM.override_env, source })?;
    if !output.status.success() || !built.exists() {
        return Err(AssetError::SandboxBuild { stderr: last_lines(&[output.stdout, output.stderr].concat(), 12) });
    }
    std::fs::rename(&built, &target).map_err(cache_error)?;
    progress(&format!("sandbox component cached at {}", target.display()));
    Ok(target)
}
