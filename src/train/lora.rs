//! LoRA matrices with PEFT's semantics (A random, B zero, update scaled by alpha / rank), and
//! the two formats they are written in: llama.cpp's GGUF LoRA adapter and a PEFT directory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::model::{Architecture, Base};
use crate::store::write_atomic;

crate::choice! {
    /// A projection that can carry LoRA matrices, by the name workflows use (`targets="q,v"`).
    #[derive(PartialOrd, Ord, Hash)]
    pub enum Target {
        Q = "q",
        K = "k",
        V = "v",
        O = "o",
        Gate = "gate",
        Up = "up",
        Down = "down",
    }
}

impl Target {
    /// The weight's name in a GGUF block: `blk.N.<this>.weight`.
    pub fn gguf(self) -> &'static str {
        ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"][self as usize]
    }

    /// The module's path in a Hugging Face layer: `model.layers.N.<this>`.
    fn peft(self) -> &'static str {
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ][self as usize]
    }
}

/// The trainable matrices of one projection: `a` (rank, n_in) and `b` (n_out, rank).
pub struct Pair {
    pub a: Var,
    pub b: Var,
}

pub struct Lora {
    pub rank: usize,
    pub alpha: f32,
    pub pairs: BTreeMap<(usize, Target), Pair>,
}

fn bad(message: String) -> candle_core::Error {
    candle_core::Error::Msg(message)
}

impl Lora {
    /// Fresh matrices for `targets` of every layer: A uniform in ±1/√n_in (PEFT's Kaiming
    /// initialisation), B zero, so the adapted model starts as the base model.
    pub fn new(base: &Base, rank: usize, alpha: f32, targets: &[Target], seed: u64) -> Result<Lora> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for (layer, weights) in base.layers.iter().enumerate() {
            for &target in targets {
                let (n_out, n_in) = weights.projection(target).weight.dims2()?;
                // Past the smaller side a rank adds parameters but no directions; past both it is
                // a mistake (and the matrices might not fit in memory).
                if rank > n_in.max(n_out) {
                    return Err(bad(format!(
                        "rank={rank} is larger than either side of the model's `{}` projection ({n_out}×{n_in}): use a rank of at most {} (past {} a rank adds no directions)",
                        target.gguf(),
                        n_in.max(n_out),
                        n_in.min(n_out)
                    )));
                }
                let bound = 1.0 / (n_in as f32).sqrt();
                let a: Vec<f32> = (0..rank * n_in).map(|_| rng.random_range(-bound..bound)).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (rank, n_in), &Device::Cpu)?)?;
                let b = Var::zeros((n_out, rank), candle_core::DType::F32, &Device::Cpu)?;
                pairs.insert((layer, target), Pair { a, b });
            }
        }
        Ok(Lora { rank, alpha, pairs })
    }

    pub fn scale(&self) -> f64 {
        f64::from(self.alpha) / self.rank as f64
    }

    pub fn pair(&self, layer: usize, target: Target) -> Option<&Pair> {
        self.pairs.get(&(layer, target))
    }

    pub fn vars(&self) -> Vec<Var> {
        self.pairs.values().flat_map(|p| [p.a.clone(), p.b.clone()]).collect()
    }

    pub fn targets(&self) -> Vec<Target> {
        let mut targets: Vec<Target> = self.pairs.keys().map(|(_, t)| *t).collect();
        targets.sort();
        targets.dedup();
        targets
    }

    /// Checks that `path` is a GGUF LoRA adapter and, given the model it is for, that it was made
    /// for that model: the same architecture, and every matrix pair the shape of the projection
    /// it adapts. Reads the files' headers only.
    pub fn check_file(path: &Path, model: Option<&Path>) -> std::result::Result<(), String> {
        let header = |path: &Path, what: &str| {
            let mut file = File::open(path).map_err(|e| format!("cannot open `{}`: {e}", path.display()))?;
            gguf_file::Content::read(&mut file).map_err(|e| format!("`{}` is not a GGUF {what}: {e}", path.display()))
        };
        let text = |content: &gguf_file::Content, key: &str| {
            content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned().unwrap_or_default()
        };
        let adapter = header(path, "adapter")?;
        if text(&adapter, "general.type") != "adapter" || text(&adapter, "adapter.type") != "lora" {
            return Err(format!("`{}` is a GGUF file but not a LoRA adapter", path.display()));
        }
        let Some(model_path) = model else { return Ok(()) };
        let model = header(model_path, "model")?;
        let (made_for, architecture) = (text(&adapter, "general.architecture"), text(&model, "general.architecture"));
        if made_for != architecture {
            return Err(format!(
                "the adapter was made for a `{made_for}` model, and `{}` is a `{architecture}` one",
                model_path.display()
            ));
        }
        for (name, a) in adapter.tensor_infos.iter().filter_map(|(n, i)| Some((n.strip_suffix(".lora_a")?, i))) {
            let b = adapter.tensor_infos.get(&format!("{name}.lora_b"));
            let weight = model.tensor_infos.get(name);
            let fits = match (a.shape.dims(), b.map(|b| b.shape.dims()), weight.map(|w| w.shape.dims())) {
                // (rank, in), (out, rank), (out, in)
                ([rank, inputs], Some([outputs, rank_b]), Some([out, into])) => {
                    rank == rank_b && inputs == into && outputs == out
                }
                _ => false,
            };
            if !fits {
                return Err(format!("the adapter's `{name}` does not fit `{}`", model_path.display()));
            }
        }
        Ok(())
    }

    /// Reads an adapter written by [`Lora::save_gguf`] (or llama.cpp's converter) for `base`.
    pub fn load_gguf(path: &Path, base: &Base) -> Result<Lora> {
        let mut file = File::open(path).map_err(|e| bad(format!("cannot open `{}`: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| bad(format!("`{}` is not a GGUF adapter: {e}", path.display())))?;
        let alpha = content.metadata.get("adapter.lora.alpha").and_then(|v| v.to_f32().ok()).unwrap_or(0.0);
        let mut pairs = BTreeMap::new();
        let mut rank = 0;
        for layer in 0..base.layers.len() {
            for target in Target::all() {
                let name = format!("blk.{layer}.{}.weight", target.gguf());
                let (a, b) = (format!("{name}.lora_a"), format!("{name}.lora_b"));
                if !content.tensor_infos.contains_key(&a) {
                    continue;
                }
                let a = content.tensor(&mut file, &a, &Device::Cpu)?.dequantize(&Device::Cpu)?;
                let b = content.tensor(&mut file, &b, &Device::Cpu)?.dequantize(&Device::Cpu)?;
                let expected = base.layers[layer].projection(target).weight.dims2()?;
                if a.dim(1)? != expected.1 || b.dim(0)? != expected.0 || a.dim(0)? != b.dim(1)? {
                    return Err(bad(format!(
                        "the adapter's `{name}` does not fit the model: `init` must be an adapter trained on this model"
                    )));
                }
                rank = a.dim(0)?;
                pairs.insert((layer, target), Pair { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)? });
            }
        }
        if pairs.is_empty() {
            return Err(bad(format!("`{}` holds no LoRA matrices for this model", path.display())));
        }
        // llama.cpp scales by adapter_scale alone when alpha is 0.
        let alpha = if alpha == 0.0 { rank as f32 } else { alpha };
        Ok(Lora { rank, alpha, pairs })
    }

    /// llama.cpp's GGUF LoRA format: `blk.N.<weight>.lora_a` with ggml dims [n_in, rank] and
    /// `.lora_b` [rank, n_out] — candle's (rank, n_in) and (n_out, rank), as stored here.
    pub fn save_gguf(&self, path: &Path, architecture: Architecture) -> Result<()> {
        let mut tensors = Vec::with_capacity(self.pairs.len() * 2);
        for (&(layer, target), pair) in &self.pairs {
            let name = format!("blk.{layer}.{}.weight", target.gguf());
            tensors.push((format!("{name}.lora_a"), QTensor::quantize(pair.a.as_tensor(), GgmlDType::F32)?));
            tensors.push((format!("{name}.lora_b"), QTensor::quantize(pair.b.as_tensor(), GgmlDType::F32)?));
        }
        let metadata = [
            ("general.architecture", gguf_file::Value::String(architecture.name().into())),
            ("general.type", gguf_file::Value::String("adapter".into())),
            ("adapter.type", gguf_file::Value::String("lora".into())),
            ("adapter.lora.alpha", gguf_file::Value::F32(self.alpha)),
        ];
        let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut bytes = Cursor::new(Vec::new());
        gguf_file::write(&mut bytes, &metadata, &tensors)?;
        write_atomic(path, bytes.get_ref()).map_err(|e| bad(format!("cannot write `{}`: {e}", path.display())))
    }

    /// A PEFT adapter directory: `adapter_config.json` and `adapter_model.safetensors` with the
    /// Hugging Face module names. llama's GGUF stores q and k rows permuted for its rope layout;
    /// their B matrices are permuted back.
    pub fn save_peft(&self, dir: &Path, base: &Base) -> Result<()> {
        let config = &base.config;
        let io = |e: std::io::Error| bad(format!("cannot write `{}`: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (&(layer, target), pair) in &self.pairs {
            let mut b = pair.b.as_tensor().clone();
            if config.architecture == Architecture::Llama && matches!(target, Target::Q | Target::K) {
                let heads = if target == Target::Q { config.heads } else { config.kv_heads };
                let (n_out, rank) = b.dims2()?;
                b = b
                    .reshape((heads, config.head_dim / 2, 2, rank))?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((n_out, rank))?;
            }
            let module = format!("base_model.model.model.layers.{layer}.{}", target.peft());
            tensors.insert(format!("{module}.lora_A.weight"), pair.a.as_tensor().clone());
            tensors.insert(format!("{module}.lora_B.weight"), b);
        }
        let bytes = safetensors::serialize(&tensors, None).map_err(|e| bad(e.to_string()))?;
        write_atomic(&dir.join("adapter_model.safetensors"), &bytes).map_err(io)?;
        let modules: Vec<String> =
            self.targets().iter().map(|t| t.peft().rsplit('.').next().unwrap_or_default().to_string()).collect();
        let adapter_config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": config.name,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "use_rslora": false,
            "use_dora": false,
        });
        let text = serde_json::to_string_pretty(&adapter_config).map_err(|e| bad(e.to_string()))?;
        write_atomic(&dir.join("adapter_config.json"), text.as_bytes()).map_err(io)
    }
}
