//! LoRA matrices with PEFT's semantics (A random, B zero, update scaled by alpha / rank), and
//! the two formats they are written in: llama.cpp's GGUF LoRA adapter and a PEFT directory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::bad;
use super::model::{Architecture, Base, Config, Direction, rope_rows};
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
    pub(super) fn peft(self) -> &'static str {
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

/// Why a file or directory cannot be used as an adapter (for a given model).
#[derive(Debug, thiserror::Error)]
pub enum AdapterFileError {
    #[error("`{}` cannot be read as a {what}: {why}", path.display())]
    Unreadable { path: PathBuf, what: &'static str, why: String },
    #[error("`{}` is a GGUF file but not a LoRA adapter", .0.display())]
    NotLora(PathBuf),
    #[error("the adapter was made for a `{made_for}` model, and `{}` is a `{architecture}` one", model.display())]
    Architecture { made_for: String, architecture: String, model: PathBuf },
    #[error("`{}` is an adapter seedflow cannot apply: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
    #[error("the adapter's `{tensor}` does not fit `{}`", model.display())]
    Shape { tensor: String, model: PathBuf },
}

impl Lora {
    /// Fresh matrices for `targets` of every layer: A uniform in ±1/√n_in (PEFT's Kaiming
    /// initialisation), B zero, so the adapted model starts as the base model.
    pub fn new(base: &Base, rank: usize, alpha: f32, targets: &[Target], seed: u64) -> Result<Lora> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for (layer, weights) in base.layers.iter().enumerate() {
            for &target in targets {
                let (n_out, n_in) = weights.projection(target).weight.dims()?;
                if let Some(why) = rank_misfit(rank, target, n_out, n_in) {
                    return Err(bad(why));
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

    /// Checks that `path` is a LoRA adapter — a GGUF file, or a PEFT directory — and, given the
    /// model it is for (a GGUF file or a Hugging Face directory), that it was made for that
    /// model: the same architecture (GGUF adapters name theirs), and every matrix pair the shape
    /// of the projection it adapts. Reads the files' headers only.
    pub fn check_file(path: &Path, model: Option<&Path>) -> std::result::Result<(), AdapterFileError> {
        let (made_for, matrices) = adapter_shapes(path)?;
        let Some(model_path) = model else { return Ok(()) };
        let (architecture, weights) = model_shapes(model_path)?;
        if let Some(made_for) = made_for.filter(|made_for| *made_for != architecture) {
            return Err(AdapterFileError::Architecture { made_for, architecture, model: model_path.to_path_buf() });
        }
        for (name, a, b) in matrices {
            let fits = match (a.as_slice(), b.as_deref(), weights.get(&name).map(Vec::as_slice)) {
                // (rank, in), (out, rank), (out, in)
                ([rank, inputs], Some([outputs, rank_b]), Some([out, into])) => {
                    rank == rank_b && inputs == into && outputs == out
                }
                _ => false,
            };
            if !fits {
                return Err(AdapterFileError::Shape { tensor: name, model: model_path.to_path_buf() });
            }
        }
        Ok(())
    }

    /// Checks, from the headers of `model` (a GGUF file or a Hugging Face directory), that
    /// `rank` fits each of its `targets` projections. A model that cannot be read passes: what
    /// reads it says why.
    pub fn check_rank(model: &Path, rank: usize, targets: &[Target]) -> std::result::Result<(), String> {
        let Ok((_, shapes)) = model_shapes(model) else { return Ok(()) };
        for target in targets {
            let suffix = format!(".{}.weight", target.gguf());
            let projections = shapes.iter().filter(|(name, _)| name.starts_with("blk.") && name.ends_with(&suffix));
            for (_, dims) in projections {
                if let [n_out, n_in] = dims[..]
                    && let Some(why) = rank_misfit(rank, *target, n_out, n_in)
                {
                    return Err(why);
                }
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
                let expected = base.layers[layer].projection(target).weight.dims()?;
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

    /// Reads a PEFT LoRA directory (`adapter_config.json`, `adapter_model.safetensors`; f32, f16
    /// or bf16) for a model of `config`, as [`Lora::save_peft`] or PEFT itself writes it.
    pub fn load_peft(dir: &Path, config: &Config) -> Result<Lora> {
        let settings = PeftConfig::read(dir).map_err(|e| bad(e.to_string()))?;
        let tensors = candle_core::safetensors::load(dir.join(PEFT_WEIGHTS), &Device::Cpu)?;
        let mut pairs = BTreeMap::new();
        for (name, a) in &tensors {
            let Some((layer, target, b_name)) = peft_pair(name) else { continue };
            let b = tensors.get(&b_name).ok_or_else(|| bad(format!("the adapter has `{name}` but no `{b_name}`")))?;
            let a = a.to_dtype(DType::F32)?;
            let b = rope_rows(&b.to_dtype(DType::F32)?, config, target, Direction::ToGguf)?;
            pairs.insert((layer, target), Pair { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)? });
        }
        if pairs.is_empty() {
            return Err(bad(format!("`{}` holds no LoRA matrices of a qwen2 or llama layer", dir.display())));
        }
        Ok(Lora { rank: settings.rank, alpha: settings.alpha, pairs })
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
    /// Hugging Face module names.
    pub fn save_peft(&self, dir: &Path, config: &Config) -> Result<()> {
        let io = |e: std::io::Error| bad(format!("cannot write `{}`: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (&(layer, target), pair) in &self.pairs {
            let b = rope_rows(pair.b.as_tensor(), config, target, Direction::ToHuggingFace)?;
            let module = format!("base_model.model.model.layers.{layer}.{}", target.peft());
            tensors.insert(format!("{module}.lora_A.weight"), pair.a.as_tensor().clone());
            tensors.insert(format!("{module}.lora_B.weight"), b);
        }
        let bytes = safetensors::serialize(&tensors, None).map_err(|e| bad(e.to_string()))?;
        write_atomic(&dir.join(PEFT_WEIGHTS), &bytes).map_err(io)?;
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
        write_atomic(&dir.join(PEFT_CONFIG), text.as_bytes()).map_err(io)
    }
}

/// The files of a PEFT adapter directory.
const PEFT_CONFIG: &str = "adapter_config.json";
const PEFT_WEIGHTS: &str = "adapter_model.safetensors";

/// What seedflow reads of a PEFT `adapter_config.json`.
struct PeftConfig {
    rank: usize,
    /// As llama.cpp scales (alpha / rank): rsLoRA's alpha / sqrt(rank) folded in.
    alpha: f32,
}

impl PeftConfig {
    fn read(dir: &Path) -> std::result::Result<PeftConfig, AdapterFileError> {
        let path = dir.join(PEFT_CONFIG);
        let unreadable = |why: String| AdapterFileError::Unreadable { path: path.clone(), what: "PEFT adapter", why };
        let text = std::fs::read_to_string(&path).map_err(|e| unreadable(e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
        let unsupported = |what: &str| AdapterFileError::Unsupported { path: path.clone(), what: what.to_string() };
        if json["peft_type"].as_str() != Some("LORA") {
            return Err(unsupported("an adapter other than LoRA (`peft_type` is not \"LORA\")"));
        }
        if json["use_dora"].as_bool() == Some(true) {
            return Err(unsupported("DoRA (`use_dora`)"));
        }
        if json["fan_in_fan_out"].as_bool() == Some(true) {
            return Err(unsupported("transposed matrices (`fan_in_fan_out`)"));
        }
        if json["modules_to_save"].as_array().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported("fully trained modules besides LoRA's (`modules_to_save`)"));
        }
        let rank = json["r"].as_u64().filter(|r| *r > 0).ok_or_else(|| unreadable("no rank `r`".into()))? as usize;
        let alpha = json["lora_alpha"].as_f64().unwrap_or(rank as f64);
        let alpha = if json["use_rslora"].as_bool() == Some(true) { alpha * (rank as f64).sqrt() } else { alpha };
        Ok(PeftConfig { rank, alpha: alpha as f32 })
    }
}

/// For a PEFT A matrix's name (`…layers.N.self_attn.q_proj.lora_A.weight`): its layer and
/// projection, and its B matrix's name.
fn peft_pair(name: &str) -> Option<(usize, Target, String)> {
    let module = name.strip_suffix(".lora_A.weight")?;
    let (_, after) = module.rsplit_once("layers.")?;
    let (layer, path) = after.split_once('.')?;
    let target = Target::all().into_iter().find(|t| t.peft() == path)?;
    Some((layer.parse().ok()?, target, format!("{module}.lora_B.weight")))
}

/// The shapes of a safetensors file's tensors, from its header alone (an 8-byte length, then
/// JSON).
pub(super) fn safetensors_shapes(path: &Path) -> std::io::Result<HashMap<String, Vec<usize>>> {
    use std::io::Read;
    let mut file = File::open(path)?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length)?;
    let length = u64::from_le_bytes(length);
    if length > 100 << 20 {
        return Err(std::io::Error::other("not a safetensors file (its header length is implausible)"));
    }
    let mut header = vec![0u8; length as usize];
    file.read_exact(&mut header)?;
    let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)?;
    Ok(header
        .into_iter()
        .filter_map(|(name, info)| {
            let shape =
                info["shape"].as_array()?.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<_>>()?;
            Some((name, shape))
        })
        .collect())
}

/// Whether a GGUF file holds all of its tensors' data (a download cut short does not; llama.cpp
/// then fails with "null result" at the first step that loads it). A header read here only
/// partly (a tensor type candle does not know), or with sizes past any file, is left for
/// llama.cpp to judge.
pub fn check_complete(path: &Path) -> std::result::Result<(), String> {
    let Ok(content) = read_header(path) else { return Ok(()) };
    let data = |t: &gguf_file::TensorInfo| {
        let blocks =
            t.shape.dims().iter().try_fold(1usize, |n, d| n.checked_mul(*d))? / t.ggml_dtype.block_size().max(1);
        t.offset.checked_add(u64::try_from(blocks.checked_mul(t.ggml_dtype.type_size())?).ok()?)
    };
    let ends: Option<Vec<u64>> = content.tensor_infos.values().map(data).collect();
    let Some(needed) =
        ends.and_then(|ends| content.tensor_data_offset.checked_add(ends.into_iter().max().unwrap_or(0)))
    else {
        return Ok(());
    };
    let size = std::fs::metadata(path).map_or(u64::MAX, |m| m.len());
    if size >= needed {
        return Ok(());
    }
    Err(format!(
        "the file is cut short: {} of the {} its tensors need (an interrupted download?)",
        bytesize::ByteSize(size),
        bytesize::ByteSize(needed)
    ))
}

/// A GGUF file's header.
fn gguf_header(path: &Path, what: &'static str) -> std::result::Result<gguf_file::Content, AdapterFileError> {
    read_header(path).map_err(|why| AdapterFileError::Unreadable { path: path.to_path_buf(), what, why })
}

/// Reads a GGUF header, buffered (a vocabulary is a long list of small reads). candle's reader
/// panics on some malformed headers (an alignment of 0 divides by it): that is an unreadable
/// file too, said quietly.
fn read_header(path: &Path) -> std::result::Result<gguf_file::Content, String> {
    let mut file = std::io::BufReader::new(File::open(path).map_err(|e| e.to_string())?);
    quietly(|| gguf_file::Content::read(&mut file))
        .map_err(|_| "its header is malformed".to_string())?
        .map_err(|e| e.to_string())
}

thread_local! {
    /// Set while `quietly` runs: the panic hook then prints nothing.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic without the panic hook's message.
fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                default(info)
            }
        }));
    });
    QUIET.with(|quiet| quiet.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|quiet| quiet.set(false));
    result
}

fn gguf_text(content: &gguf_file::Content, key: &str) -> String {
    content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned().unwrap_or_default()
}

/// The matrix pairs of one adapted weight: its GGUF name, A's shape (rank, in), B's (out, rank).
type Matrices = Vec<(String, Vec<usize>, Option<Vec<usize>>)>;

/// An adapter's architecture (GGUF files name it; PEFT directories do not) and matrix shapes.
fn adapter_shapes(path: &Path) -> std::result::Result<(Option<String>, Matrices), AdapterFileError> {
    if path.is_dir() {
        PeftConfig::read(path)?;
        let weights = path.join(PEFT_WEIGHTS);
        let tensors = safetensors_shapes(&weights).map_err(|e| AdapterFileError::Unreadable {
            path: weights,
            what: "PEFT adapter",
            why: e.to_string(),
        })?;
        let matrices = tensors.iter().filter_map(|(name, a)| {
            let (layer, target, b_name) = peft_pair(name)?;
            let b = tensors.get(&b_name).cloned();
            Some((format!("blk.{layer}.{}.weight", target.gguf()), a.clone(), b))
        });
        return Ok((None, matrices.collect()));
    }
    let adapter = gguf_header(path, "GGUF adapter")?;
    if gguf_text(&adapter, "general.type") != "adapter" || gguf_text(&adapter, "adapter.type") != "lora" {
        return Err(AdapterFileError::NotLora(path.to_path_buf()));
    }
    let matrices = adapter.tensor_infos.iter().filter_map(|(name, a)| {
        let name = name.strip_suffix(".lora_a")?;
        let b = adapter.tensor_infos.get(&format!("{name}.lora_b")).map(|b| b.shape.dims().to_vec());
        Some((name.to_string(), a.shape.dims().to_vec(), b))
    });
    Ok((Some(gguf_text(&adapter, "general.architecture")), matrices.collect()))
}

/// Why `rank` cannot adapt `target`'s (n_out, n_in) weight, if it cannot. Past the smaller side a
/// rank adds parameters but no directions; past both it is a mistake (and the matrices might not
/// fit in memory).
fn rank_misfit(rank: usize, target: Target, n_out: usize, n_in: usize) -> Option<String> {
    (rank > n_in.max(n_out)).then(|| {
        format!(
            "rank={rank} is larger than either side of the model's `{}` projection ({n_out}×{n_in}): use a rank of at most {} (past {} a rank adds no directions)",
            target.gguf(),
            n_in.max(n_out),
            n_in.min(n_out)
        )
    })
}

/// A model's architecture and weight shapes by GGUF name.
fn model_shapes(path: &Path) -> std::result::Result<(String, HashMap<String, Vec<usize>>), AdapterFileError> {
    if super::hf::is_model_dir(path) {
        let unreadable =
            |why: String| AdapterFileError::Unreadable { path: path.to_path_buf(), what: "Hugging Face model", why };
        let config = super::hf::config(path).map_err(|e| unreadable(e.to_string()))?;
        let shapes = super::hf::shapes(path).map_err(|e| unreadable(e.to_string()))?;
        return Ok((config.architecture.name().to_string(), shapes));
    }
    let model = gguf_header(path, "GGUF model")?;
    let shapes = model.tensor_infos.iter().map(|(name, info)| (name.clone(), info.shape.dims().to_vec())).collect();
    Ok((gguf_text(&model, "general.architecture"), shapes))
}
