//! The frozen base model, read from the same GGUF file llama.cpp serves and dequantized to f32,
//! and its forward pass with LoRA — computed as llama.cpp computes it (`qwen2` and `llama`), so
//! an adapter behaves in llama.cpp as it did in training.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use rand::rngs::StdRng;
use rayon::prelude::*;

use super::lora::{Lora, Target};
use super::ops::{self, Weight};
use super::{bad, hf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Qwen2,
    Llama,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "qwen2",
            Architecture::Llama => "llama",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub architecture: Architecture,
    /// `general.name`, kept for the PEFT export.
    pub name: String,
    pub layers: usize,
    pub embedding: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
}

impl Config {
    /// A model's configuration, from a GGUF file's header or a Hugging Face directory's
    /// `config.json`.
    pub fn read(path: &Path) -> Result<Config> {
        if hf::is_model_dir(path) {
            return hf::config(path);
        }
        let mut file = File::open(path).map_err(|e| bad(format!("cannot open `{}`: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| bad(format!("`{}` is not a GGUF model: {e}", path.display())))?;
        Config::of(&content, path)
    }

    fn of(content: &gguf_file::Content, path: &Path) -> Result<Config> {
        let meta = |key: &str| content.metadata.get(key);
        let architecture = match meta("general.architecture").and_then(|v| v.to_string().ok()).map(String::as_str) {
            Some("qwen2") => Architecture::Qwen2,
            Some("llama") => Architecture::Llama,
            other => {
                return Err(bad(format!(
                    "`{}` is a `{}` model; `finetune-lora` trains `qwen2` and `llama` models: point the `model` at one of those",
                    path.display(),
                    other.unwrap_or("unknown")
                )));
            }
        };
        let arch = architecture.name();
        let number = |key: &str| -> Result<usize> {
            let key = format!("{arch}.{key}");
            meta(&key).ok_or_else(|| bad(format!("the model has no `{key}`")))?.to_u32().map(|v| v as usize)
        };
        let float =
            |key: &str, default: f32| meta(&format!("{arch}.{key}")).and_then(|v| v.to_f32().ok()).unwrap_or(default);
        let (embedding, heads) = (number("embedding_length")?, number("attention.head_count")?);
        Ok(Config {
            architecture,
            name: meta("general.name").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default(),
            layers: number("block_count")?,
            embedding,
            heads,
            kv_heads: number("attention.head_count_kv").unwrap_or(heads),
            head_dim: number("attention.key_length").unwrap_or(embedding / heads),
            rms_eps: f64::from(float("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_base: float("rope.freq_base", 10_000.0),
        })
    }
}

/// A projection's frozen weight (n_out, n_in) and bias.
pub struct Projection {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

pub struct Layer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// By `Target` order: q, k, v, o, gate, up, down.
    projections: Vec<Projection>,
}

impl Layer {
    pub fn projection(&self, target: Target) -> &Projection {
        &self.projections[target as usize]
    }
}

pub struct Base {
    pub config: Config,
    embedding: Tensor,
    pub layers: Vec<Layer>,
    output_norm: Tensor,
    /// The vocabulary projection; the embedding's values when the model ties them.
    output: Weight,
    /// llama's per-dimension rope frequency divisors (`rope_freqs.weight`), if any.
    rope_factors: Option<Vec<f32>>,
}

/// Where LoRA dropout draws from during training; `None` evaluates.
pub type Dropout<'a> = Option<(f32, &'a mut StdRng)>;

/// The model's tensors in f32, by GGUF name; read ones are taken out.
struct Reader(HashMap<String, Tensor>);

impl Reader {
    fn optional(&mut self, name: &str) -> Option<Tensor> {
        self.0.remove(name)
    }

    fn required(&mut self, name: &str) -> Result<Tensor> {
        self.optional(name).ok_or_else(|| bad(format!("the model has no tensor `{name}`")))
    }
}

impl Base {
    /// Reads a GGUF model (dequantized) or a Hugging Face model directory; with `bf16`, the
    /// projections' weights are kept in bf16 for AMX's tiles (see [`Weight`]).
    pub fn load(path: &Path, bf16: bool) -> Result<Base> {
        if hf::is_model_dir(path) {
            let config = hf::config(path)?;
            let tensors = hf::tensors(path, &config)?;
            return Base::read(config, Reader(tensors), bf16);
        }
        let mut file = File::open(path).map_err(|e| bad(format!("cannot open `{}`: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| bad(format!("`{}` is not a GGUF model: {e}", path.display())))?;
        let config = Config::of(&content, path)?;
        // Read in file order, then dequantized on every core: one at a time, dequantizing the
        // default model took ~4 of the ~6.5 s its loading took. The quantized copies (a fifth
        // of the f32 size at most) are held until then, under the training's own peak.
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort_by_key(|name| content.tensor_infos[*name].offset);
        let quantized = names
            .into_iter()
            .map(|name| Ok((name.clone(), content.tensor(&mut file, name, &Device::Cpu)?)))
            .collect::<Result<Vec<_>>>()?;
        let tensors = quantized
            .into_par_iter()
            .map(|(name, tensor)| Ok((name, tensor.dequantize(&Device::Cpu)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Base::read(config, Reader(tensors), bf16)
    }

    fn read(config: Config, mut reader: Reader, bf16: bool) -> Result<Base> {
        let embedding_weights = reader.required("token_embd.weight")?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut projections = Vec::with_capacity(Target::NAMES.len());
            for target in Target::all() {
                let weight = Weight::new(reader.required(&format!("blk.{i}.{}.weight", target.gguf()))?, bf16)?;
                let bias = reader.optional(&format!("blk.{i}.{}.bias", target.gguf()));
                projections.push(Projection { weight, bias });
            }
            layers.push(Layer {
                attn_norm: reader.required(&format!("blk.{i}.attn_norm.weight"))?,
                ffn_norm: reader.required(&format!("blk.{i}.ffn_norm.weight"))?,
                projections,
            });
        }
        let output_norm = reader.required("output_norm.weight")?;
        let output = Weight::new(reader.optional("output.weight").unwrap_or_else(|| embedding_weights.clone()), bf16)?;
        let rope_factors = reader.optional("rope_freqs.weight").map(|t| t.to_vec1::<f32>()).transpose()?;
        Ok(Base { config, embedding: embedding_weights, layers, output_norm, output, rope_factors })
    }

    /// cos and sin of the rotary angles for positions `0..tokens`, each (tokens, head_dim / 2).
    fn rotary(&self, tokens: usize) -> Result<(Tensor, Tensor)> {
        let half = self.config.head_dim / 2;
        let inverse: Vec<f32> = (0..half)
            .map(|i| {
                let theta = self.config.rope_base.powf(-((2 * i) as f32) / self.config.head_dim as f32);
                theta / self.rope_factors.as_ref().and_then(|f| f.get(i).copied()).unwrap_or(1.0)
            })
            .collect();
        let inverse = Tensor::from_vec(inverse, (1, half), &Device::Cpu)?;
        let positions = Tensor::arange(0u32, tokens as u32, &Device::Cpu)?.to_dtype(DType::F32)?.unsqueeze(1)?;
        let angles = positions.broadcast_mul(&inverse)?;
        Ok((angles.cos()?, angles.sin()?))
    }

    /// A projection of `x` (tokens, n_in) with its LoRA update, if `lora` adapts it.
    fn project(
        &self,
        x: &Tensor,
        layer: usize,
        target: Target,
        lora: Option<&Lora>,
        dropout: &mut Dropout<'_>,
    ) -> Result<Tensor> {
        let projection = self.layers[layer].projection(target);
        let Some((lora, pair)) = lora.and_then(|l| l.pair(layer, target).map(|p| (l, p))) else {
            return ops::frozen_linear(x, &projection.weight, projection.bias.as_ref());
        };
        let mask = match dropout {
            Some((p, rng)) if *p > 0.0 => {
                let keep = 1.0 - *p;
                let mask: Vec<f32> =
                    (0..x.elem_count()).map(|_| if rng.random::<f32>() < keep { 1.0 / keep } else { 0.0 }).collect();
                Some(Tensor::from_vec(mask, x.shape(), x.device())?)
            }
            _ => None,
        };
        let pair = (pair.a.as_tensor(), pair.b.as_tensor());
        ops::lora_linear(x, &projection.weight, projection.bias.as_ref(), pair, lora.scale(), mask)
    }

    /// The logits (positions.len(), vocabulary) after each of `positions` for the token sequence
    /// `tokens`; the vocabulary projection runs only there.
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[u32],
        lora: Option<&Lora>,
        mut dropout: Dropout<'_>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = tokens.len();
        let device = Device::Cpu;
        let (cos, sin) = self.rotary(n)?;
        let neox = c.architecture == Architecture::Qwen2;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let mask = ops::causal_mask(n)?;
        // After the last layer only the rows at `positions` are read. When they are consecutive
        // (a training example's answer), the last layer computes queries, its output projection
        // and its MLP for those rows alone (keys and values still for every row): the prompt's
        // rows skip about a twentieth of their work, forward and backward.
        let answer = positions.first().map(|&p| p as usize).filter(|&first| {
            positions.iter().enumerate().all(|(i, &p)| p as usize == first + i) && first + positions.len() <= n
        });
        let mut x = self.embedding.index_select(&Tensor::new(tokens, &device)?, 0)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let rows = |t: &Tensor| match answer.filter(|_| i + 1 == self.layers.len()) {
                Some(first) => t.narrow(0, first, positions.len()),
                None => Ok(t.clone()),
            };
            let q = self.project(&rows(&h)?, i, Target::Q, lora, &mut dropout)?;
            let q = ops::rope(&q, c.head_dim, &rows(&cos)?, &rows(&sin)?, neox)?;
            let k = ops::rope(&self.project(&h, i, Target::K, lora, &mut dropout)?, c.head_dim, &cos, &sin, neox)?;
            let v = self.project(&h, i, Target::V, lora, &mut dropout)?;
            let attended = ops::causal_attention(&q, &k, &v, c.head_dim, scale, &rows(&mask)?)?;
            x = (rows(&x)? + self.project(&attended, i, Target::O, lora, &mut dropout)?)?;
            let h = ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gate = self.project(&h, i, Target::Gate, lora, &mut dropout)?;
            let up = self.project(&h, i, Target::Up, lora, &mut dropout)?;
            x = (x + self.project(&ops::swiglu(&gate, &up)?, i, Target::Down, lora, &mut dropout)?)?;
        }
        let picked = match answer {
            Some(_) if !self.layers.is_empty() => x,
            _ => x.index_select(&Tensor::new(positions, &device)?, 0)?,
        };
        let normed = ops::rms_norm(&picked, &self.output_norm, c.rms_eps)?;
        ops::frozen_linear(&normed, &self.output, None)
    }

    /// Mean cross-entropy of the tokens from `completion_start` on, given those before.
    pub fn loss(
        &self,
        tokens: &[u32],
        completion_start: usize,
        lora: Option<&Lora>,
        dropout: Dropout<'_>,
    ) -> Result<Tensor> {
        let positions: Vec<u32> = (completion_start.max(1) - 1..tokens.len() - 1).map(|p| p as u32).collect();
        let targets: Vec<u32> = positions.iter().map(|&p| tokens[p as usize + 1]).collect();
        // The last token is only a target: no logit is read after it.
        let logits = self.forward(&tokens[..tokens.len().max(2) - 1], &positions, lora, dropout)?;
        ops::cross_entropy(&logits, &targets)
    }
}

pub enum Direction {
    ToGguf,
    ToHuggingFace,
}

/// llama's GGUF stores the q and k projections' rows permuted for llama.cpp's rope layout
/// (each head's two halves interleaved); a weight (or a LoRA B matrix) of those projections moves
/// between the layouts row-wise. Other projections and architectures are the same in both.
pub fn rope_rows(rows: &Tensor, config: &Config, target: Target, direction: Direction) -> Result<Tensor> {
    if config.architecture != Architecture::Llama || !matches!(target, Target::Q | Target::K) {
        return Ok(rows.clone());
    }
    let heads = if target == Target::Q { config.heads } else { config.kv_heads };
    let (n_out, columns) = rows.dims2()?;
    let split = match direction {
        Direction::ToHuggingFace => (heads, config.head_dim / 2, 2, columns),
        Direction::ToGguf => (heads, 2, config.head_dim / 2, columns),
    };
    rows.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape((n_out, columns))
}
