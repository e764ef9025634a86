//! What a run holds for its steps and frees when it ends: the models it loaded, the sandbox
//! (its compiled component and instance pool) and the runtime its programs run on. The engine
//! makes one per run and hands it to every step.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::llm::{Inference, Llama, ModelSettings};
use crate::sandbox::Sandbox;

#[derive(Default)]
pub struct Resources {
    llama: Llama,
    /// One sandbox per memory cap (a `memory` property sizes the instance pool), shared by every
    /// `execute` step of the run.
    sandboxes: Mutex<HashMap<u64, Arc<Sandbox>>>,
    runtime: Mutex<Option<Arc<tokio::runtime::Runtime>>>,
}

impl Resources {
    /// The backend that serves `settings`' model.
    pub fn inference(&self, _settings: &ModelSettings) -> &dyn Inference {
        &self.llama
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

    /// The runtime sandboxed programs run on, with `workers` threads: apart from the engine's,
    /// so programs that compute do not hold up its scheduling and signals.
    pub fn runtime(&self, workers: usize) -> Result<Arc<tokio::runtime::Runtime>, String> {
        let mut runtime = self.runtime.lock().map_err(|_| "the runtime is poisoned".to_string())?;
        if let Some(runtime) = runtime.as_ref() {
            return Ok(runtime.clone());
        }
        let built = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers.max(1))
                .enable_time()
                .build()
                .map_err(|e| format!("cannot start the sandbox workers: {e}"))?,
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
