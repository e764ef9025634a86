//! Models and adapters: llama.cpp started once per process, each model loaded once per run (on
//! first use, freed when the run is done with them), LoRA adapters loaded into the model that
//! serves them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};

use super::{LlmError, MOST_THREADS, ModelSettings};

pub(super) struct Loaded {
    pub model: LlamaModel,
    pub adapters: HashMap<PathBuf, LlamaLoraAdapter>,
}

/// llama.cpp's backend, started once per process (it may be started only once).
pub(super) fn backend() -> Result<&'static LlamaBackend, LlmError> {
    static BACKEND: OnceLock<Result<LlamaBackend, llama_cpp_2::LlamaCppError>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
            LlamaBackend::init()
        })
        .as_ref()
        .map_err(|e| LlmError::Start(e.to_string()))
}

/// A loaded model's file and GPU layers.
type ModelKey = (PathBuf, i32);

/// In-process inference with llama.cpp: the models a run loaded, by file and GPU layers, each
/// loaded on first use and freed when unloaded or when the run drops this. A model serves one
/// step at a time (the executor gives each model one decode stream), which is also what lets
/// adapters be added to it while it is shared.
#[derive(Default)]
pub struct Llama {
    models: Mutex<HashMap<ModelKey, Arc<Mutex<Loaded>>>>,
}

impl Llama {
    /// Frees a loaded model (once the step that may still hold it lets go).
    pub fn unload(&self, path: &Path, gpu_layers: i32) {
        if let Ok(mut models) = self.models.lock() {
            models.remove(&(path.to_path_buf(), gpu_layers));
        }
    }

    pub(super) fn load(&self, settings: &ModelSettings) -> Result<Arc<Mutex<Loaded>>, LlmError> {
        let backend = backend()?;
        let key = (settings.path.clone(), settings.gpu_layers);
        let mut models = self.models.lock().map_err(|_| LlmError::Poisoned("model registry"))?;
        if let Some(loaded) = models.get(&key) {
            return Ok(loaded.clone());
        }
        if !settings.path.exists() {
            return Err(LlmError::NoModelFile(settings.path.clone()));
        }
        // llama.cpp runs every layer on the CPU when it has no GPU to offload to, silently and
        // many times slower: a run that asked for the GPU stops instead.
        if settings.gpu_layers != 0 && !backend.supports_gpu_offload() {
            let why = match cfg!(feature = "cuda") {
                true => "no CUDA device was found",
                false => "this seedflow was built without GPU support (`cargo build --release --features cuda`)",
            };
            return Err(LlmError::NoGpu { layers: settings.gpu_layers, why });
        }
        let layers = if settings.gpu_layers < 0 { u32::MAX } else { settings.gpu_layers as u32 };
        if settings.path.is_dir() {
            return Err(LlmError::NotGguf(settings.path.clone()));
        }
        let params = LlamaModelParams::default().with_n_gpu_layers(layers);
        let model = LlamaModel::load_from_file(backend, &settings.path, &params)
            .map_err(|e| LlmError::Load { path: settings.path.clone(), message: e.to_string() })?;
        let loaded = Arc::new(Mutex::new(Loaded { model, adapters: HashMap::new() }));
        models.insert(key, loaded.clone());
        Ok(loaded)
    }
}

pub(super) fn threads(settings: &ModelSettings) -> i32 {
    if settings.threads > 0 {
        settings.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(MOST_THREADS as usize) as i32)
    }
}

/// Loads `adapter`'s file into the model's adapters, once per loaded model.
pub(super) fn load_adapter(
    model: &mut LlamaModel,
    adapters: &mut HashMap<PathBuf, LlamaLoraAdapter>,
    adapter: Option<(&Path, f32)>,
) -> Result<(), LlmError> {
    if let Some((path, _)) = adapter
        && !adapters.contains_key(path)
    {
        let lora = model
            .lora_adapter_init(path)
            .map_err(|e| LlmError::Adapter { path: path.to_path_buf(), message: e.to_string() })?;
        adapters.insert(path.to_path_buf(), lora);
    }
    Ok(())
}

pub(super) fn attach_adapter(
    context: &mut LlamaContext<'_>,
    adapters: &mut HashMap<PathBuf, LlamaLoraAdapter>,
    adapter: Option<(&Path, f32)>,
) -> Result<(), LlmError> {
    if let Some((path, scale)) = adapter
        && let Some(lora) = adapters.get_mut(path)
    {
        context.lora_adapter_set(lora, scale).map_err(|e| LlmError::Attach(e.to_string()))?;
    }
    Ok(())
}
