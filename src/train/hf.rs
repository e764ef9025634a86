//! A Hugging Face model directory (`config.json`, `*.safetensors` in f32, f16 or bf16) read as
//! llama.cpp's converter would write it to GGUF: the same tensor names, llama's query and key
//! rows in llama.cpp's rope order, so the trainer computes one forward pass for both forms and
//! an adapter trained on either fits the weights a server of that directory serves.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};

use super::bad;
use super::lora::Target;
use super::model::{Architecture, Config, Direction, rope_rows};

/// Whether `path` is a Hugging Face model directory (it holds a `config.json`).
pub fn is_model_dir(path: &Path) -> bool {
    path.join("config.json").is_file()
}

/// The model's configuration from its `config.json`.
pub fn config(dir: &Path) -> Result<Config> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read `{}`: {e}", path.display())))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("`{}` is not JSON: {e}", path.display())))?;
    let architecture = match json["model_type"].as_str() {
        Some("qwen2") => Architecture::Qwen2,
        Some("llama") => Architecture::Llama,
        other => {
            return Err(bad(format!(
                "`{}` is a `{}` model; `finetune-lora` trains `qwen2` and `llama` models",
                dir.display(),
                other.unwrap_or("unknown")
            )));
        }
    };
    if !json["rope_scaling"].is_null() {
        return Err(bad(format!("`{}` scales its rope (`rope_scaling`), which the trainer does not", path.display())));
    }
    let number = |key: &str| {
        json[key].as_u64().map(|v| v as usize).ok_or_else(|| bad(format!("`{}` has no `{key}`", path.display())))
    };
    let (embedding, heads) = (number("hidden_size")?, number("num_attention_heads")?);
    let name = json["_name_or_path"].as_str().map(str::to_string);
    Ok(Config {
        architecture,
        name: name.unwrap_or_else(|| dir.file_name().unwrap_or_default().to_string_lossy().into_owned()),
        layers: number("num_hidden_layers")?,
        embedding,
        heads,
        kv_heads: number("num_key_value_heads").unwrap_or(heads),
        head_dim: number("head_dim").unwrap_or(embedding / heads),
        rms_eps: json["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        rope_base: json["rope_theta"].as_f64().unwrap_or(10_000.0) as f32,
    })
}

/// The directory's weight files: `model.safetensors` or its shards.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| bad(format!("cannot read `{}`: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("model") && name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(bad(format!("`{}` has no `model*.safetensors` weights", dir.display())));
    }
    Ok(files)
}

/// A tensor's GGUF name for its Hugging Face one, with the projection it is (for llama's rope
/// order), or `None` for a tensor the trainer does not read.
fn gguf_name(name: &str) -> Option<(String, Option<Target>)> {
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(fixed) = fixed {
        return Some((fixed.to_string(), None));
    }
    let (layer, rest) = name.strip_prefix("model.layers.")?.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let named = |gguf: &str| format!("blk.{layer}.{gguf}.{kind}");
    match module {
        "input_layernorm" => Some((named("attn_norm"), None)),
        "post_attention_layernorm" => Some((named("ffn_norm"), None)),
        _ => {
            let target = Target::all().into_iter().find(|t| t.peft() == module)?;
            Some((named(target.gguf()), Some(target)))
        }
    }
}

/// Every tensor the trainer reads, by GGUF name, in f32.
pub fn tensors(dir: &Path, config: &Config) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for file in weight_files(dir)? {
        for (name, tensor) in candle_core::safetensors::load(&file, &Device::Cpu)? {
            let Some((gguf, target)) = gguf_name(&name) else { continue };
            let tensor = tensor.to_dtype(DType::F32)?;
            let tensor = match target {
                Some(target) if tensor.rank() == 1 => {
                    let rows = tensor.dim(0)?;
                    rope_rows(&tensor.reshape((rows, 1))?, config, target, Direction::ToGguf)?.reshape(rows)?
                }
                Some(target) => rope_rows(&tensor, config, target, Direction::ToGguf)?,
                None => tensor,
            };
            tensors.insert(gguf, tensor);
        }
    }
    Ok(tensors)
}

/// Every tensor's shape by GGUF name, from the weight files' headers alone.
pub fn shapes(dir: &Path) -> std::io::Result<HashMap<String, Vec<usize>>> {
    let files = weight_files(dir).map_err(std::io::Error::other)?;
    let mut shapes = HashMap::new();
    for file in files {
        for (name, shape) in super::lora::safetensors_shapes(&file)? {
            if let Some((gguf, _)) = gguf_name(&name) {
                shapes.insert(gguf, shape);
            }
        }
    }
    Ok(shapes)
}
