//! The optimizer, and the checkpoint an interrupted training resumes from: the LoRA matrices,
//! AdamW's moments and the loss curve so far, in one safetensors file written atomically.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Result, Tensor, Var};

use super::{StepRecord, bad};
use crate::store::write_atomic;

/// AdamW without weight decay, as candle_nn's `AdamW` computes it (same operations in the same
/// order, so the results are bit for bit the same), with its moments open to checkpoints:
/// candle_nn keeps them private.
pub(super) struct AdamW {
    vars: Vec<Var>,
    first_moments: Vec<Var>,
    second_moments: Vec<Var>,
    steps: usize,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPSILON: f64 = 1e-8;

impl AdamW {
    pub(super) fn new(vars: Vec<Var>) -> Result<AdamW> {
        let zeros = |v: &Var| Var::zeros(v.shape(), v.dtype(), v.device());
        let first_moments = vars.iter().map(zeros).collect::<Result<_>>()?;
        let second_moments = vars.iter().map(zeros).collect::<Result<_>>()?;
        Ok(AdamW { vars, first_moments, second_moments, steps: 0 })
    }

    pub(super) fn vars(&self) -> &[Var] {
        &self.vars
    }

    pub(super) fn step(&mut self, grads: &candle_core::backprop::GradStore, learning_rate: f64) -> Result<()> {
        self.steps += 1;
        let scale_m = 1.0 / (1.0 - BETA1.powi(self.steps as i32));
        let scale_v = 1.0 / (1.0 - BETA2.powi(self.steps as i32));
        for ((theta, m), v) in self.vars.iter().zip(&self.first_moments).zip(&self.second_moments) {
            let Some(g) = grads.get(theta) else { continue };
            let next_m = ((m.as_tensor() * BETA1)? + (g * (1.0 - BETA1))?)?;
            let next_v = ((v.as_tensor() * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let adjusted = (m_hat / (v_hat.sqrt()? + EPSILON)?)?;
            let next_theta = (theta.as_tensor() - (adjusted * learning_rate)?)?;
            m.set(&next_m)?;
            v.set(&next_v)?;
            theta.set(&next_theta)?;
        }
        Ok(())
    }

    /// Writes the matrices, the moments and `records` (one per step taken) to `path`.
    pub(super) fn save(&self, path: &Path, records: &[StepRecord]) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (i, ((var, m), v)) in self.vars.iter().zip(&self.first_moments).zip(&self.second_moments).enumerate() {
            tensors.insert(format!("var.{i}"), var.as_tensor().clone());
            tensors.insert(format!("m.{i}"), m.as_tensor().clone());
            tensors.insert(format!("v.{i}"), v.as_tensor().clone());
        }
        let records = serde_json::to_string(records).map_err(|e| bad(e.to_string()))?;
        let metadata = HashMap::from([("records".to_string(), records)]);
        let bytes = safetensors::serialize(&tensors, Some(metadata)).map_err(|e| bad(e.to_string()))?;
        write_atomic(path, &bytes).map_err(|e| bad(format!("cannot write `{}`: {e}", path.display())))
    }

    /// Restores what [`AdamW::save`] wrote into these matrices and moments; returns the records.
    pub(super) fn load(&mut self, path: &Path) -> Result<Vec<StepRecord>> {
        let unreadable = |e: String| {
            bad(format!(
                "the training checkpoint `{}` is unreadable ({e}); delete it to train from the beginning",
                path.display()
            ))
        };
        let bytes = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| unreadable(e.to_string()))?;
        let records =
            header.metadata().as_ref().and_then(|m| m.get("records")).ok_or_else(|| unreadable("no records".into()))?;
        let records: Vec<StepRecord> = serde_json::from_str(records).map_err(|e| unreadable(e.to_string()))?;
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)?;
        for (i, ((var, m), v)) in self.vars.iter().zip(&self.first_moments).zip(&self.second_moments).enumerate() {
            for (name, target) in [(format!("var.{i}"), var), (format!("m.{i}"), m), (format!("v.{i}"), v)] {
                let tensor = tensors.remove(&name).ok_or_else(|| unreadable(format!("no `{name}`")))?;
                if tensor.shape() != target.shape() {
                    return Err(unreadable(format!("`{name}` does not fit this adapter")));
                }
                target.set(&tensor)?;
            }
        }
        if !tensors.is_empty() {
            return Err(unreadable("it holds more matrices than this adapter".into()));
        }
        self.steps = records.len();
        Ok(records)
    }
}
