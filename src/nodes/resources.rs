//! What a run holds for its steps: the models it loaded (each freed once no step left to run
//! names it), the sandbox (its compiled component and worker processes) and the runtime that
//! drives them (freed when the run ends). The engine makes one per run and hands it to
//! every step.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::llm::{Endpoint, Fleet, Inference, Llama, ModelSettings, Spawned};
use crate::sandbox::Sandbox;

#[derive(Default)]
pub struct Resources {
    llama: Arc<Llama>,
    /// The server backend of each `model` declaration served by one (a spawned llama-server
    /// stops when its declaration is released).
    servers: Mutex<HashMap<String, Arc<dyn Inference>>>,
    /// The file (and GPU layers) each `model` declaration that a step used is loaded from.
    models: Mutex<HashMap<String, (PathBuf, i32)>>,
    /// One sandbox per memory cap (a `memory` property sizes its workers' instances), shared by
    /// every `execute` step of the run.
    sandboxes: Mutex<HashMap<u64, Arc<Sandbox>>>,
    runtime: Mutex<Option<Arc<tokio::runtime::Runtime>>>,
}

impl Resources {
    /// The backend that serves the `model` declaration named `model`, read as `settings`: its
    /// server, or llama.cpp in this process.
    pub fn inference(&self, model: &str, settings: &ModelSettings) -> Arc<dyn Inference> {
        if let Some(server) = &settings.server {
            let mut servers = self.servers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let backend = servers.entry(model.to_string()).or_insert_with(|| match &server.endpoint {
                Endpoint::Urls(urls) => Arc::new(Fleet::new(urls, server)),
                Endpoint::Spawn(binary) => Arc::new(Spawned::new(binary.clone(), settings.clone(), server.clone())),
            });
            return backend.clone();
        }
        if let Ok(mut models) = self.models.lock() {
            models.insert(model.to_string(), (settings.path.clone(), settings.gpu_layers));
        }
        self.llama.clone()
    }

    /// Frees what the `model` declaration named `model` holds, once no step left in the run
    /// names it (unless another declaration left to run loads the same file).
    pub fn release(&self, model: &str) {
        if let Ok(mut servers) = self.servers.lock() {
            servers.remove(model);
        }
        let Ok(mut models) = self.models.lock() else { return };
        if let Some(key) = models.remove(model)
            && !models.values().any(|other| *other == key)
        {
            self.llama.unload(&key.0, key.1);
        }
    }

    /// The run's sandbox for programs capped at `memory` bytes, with `workers` instances.
    pub fn sandbox(&self, wasm: &Path, workers: u32, memory: u64) -> Result<Arc<Sandbox>, String> {
        let mut sandboxes = self.sandboxes.lock().map_err(|_| "the sandboxes are poisoned".to_string())?;
        if let Some(sandbox) = sandboxes.get(&memory) {
            return Ok(sandbox.clone());
        }
        let sandbox = Arc::new(Sandbox::new(wasm, workers, memory).map_err(|e| e.to_string())?);
        sandboxes.insert(memory, sandbox.clone());
        Ok(sandbox)
    }

    /// The runtime `execute` waits for the sandbox's worker processes on, with `workers` threads,
    /// apart from the engine's: a step blocks on it from its own thread.
    pub fn runtime(&self, workers: usize) -> Result<Arc<tokio::runtime::Runtime>, String> {
        let mut runtime = self.runtime.lock().map_err(|_| "the runtime is poisoned".to_string())?;
        if let Some(runtime) = runtime.as_ref() {
            return Ok(runtime.clone());
        }
        let built = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers.max(1))
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the sandbox's runtime: {e}"))?,
        );
        *runtime = Some(built.clone());
        Ok(built)
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        // The run ends inside the engine's async code, where dropping a runtime would block.
        if let Some(runtime) = self.runtime.get_mut().ok().and_then(Option::take)
            && let Ok(runtime) = Arc::try_unwrap(runtime)
        {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(path: &str) -> ModelSettings {
        ModelSettings {
            path: path.into(),
            context: 0,
            gpu_layers: 0,
            threads: 1,
            batch: 512,
            parallel: 1,
            server: None,
        }
    }

    #[test]
    fn a_model_is_released_once_no_declaration_left_loads_its_file() {
        let resources = Resources::default();
        resources.inference("coder", &settings("a.gguf"));
        resources.inference("same-file", &settings("a.gguf"));
        resources.inference("other", &settings("b.gguf"));
        let held = |r: &Resources| {
            let mut names: Vec<String> = r.models.lock().unwrap().keys().cloned().collect();
            names.sort();
            names
        };
        resources.release("coder");
        assert_eq!(held(&resources), ["other", "same-file"]);
        resources.release("never-loaded");
        resources.release("other");
        assert_eq!(held(&resources), ["same-file"]);
    }
}
