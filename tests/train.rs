//! LoRA training: the trainer's forward pass against llama.cpp's logits on tiny random-weight
//! GGUF models this test writes (qwen2 and llama), with and without an adapter the trainer
//! exported; gradients reaching every LoRA matrix; and the PEFT export's layout, read back.

use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use seedflow::llm::{Llama, ModelSettings};
use seedflow::train::{self, Architecture, Base, Example, Lora, Target};

const VOCAB: usize = 96;
const WIDTH: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FFN: usize = 128;
const LAYERS: usize = 2;

/// A tiny model with random weights, in f32, written as llama.cpp reads it.
fn tiny_model(architecture: Architecture) -> PathBuf {
    let arch = architecture.name();
    let head_dim = WIDTH / HEADS;
    let random = |shape: &[usize], scale: f64| {
        let t = Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap();
        (t * scale).unwrap()
    };
    let norm = || (random(&[WIDTH], 0.1) + 1.0).unwrap();
    let mut tensors: Vec<(String, Tensor)> =
        vec![("token_embd.weight".into(), random(&[VOCAB, WIDTH], 1.0)), ("output_norm.weight".into(), norm())];
    // qwen2 ties the output to the embedding; llama gets its own.
    if architecture == Architecture::Llama {
        tensors.push(("output.weight".into(), random(&[VOCAB, WIDTH], 0.2)));
    }
    for i in 0..LAYERS {
        let kv = KV_HEADS * head_dim;
        let mut add = |name: &str, t: Tensor| tensors.push((format!("blk.{i}.{name}"), t));
        add("attn_norm.weight", norm());
        add("ffn_norm.weight", norm());
        add("attn_q.weight", random(&[WIDTH, WIDTH], 0.2));
        add("attn_k.weight", random(&[kv, WIDTH], 0.2));
        add("attn_v.weight", random(&[kv, WIDTH], 0.2));
        add("attn_output.weight", random(&[WIDTH, WIDTH], 0.2));
        add("ffn_gate.weight", random(&[FFN, WIDTH], 0.2));
        add("ffn_up.weight", random(&[FFN, WIDTH], 0.2));
        add("ffn_down.weight", random(&[WIDTH, FFN], 0.2));
        if architecture == Architecture::Qwen2 {
            add("attn_q.bias", random(&[WIDTH], 0.1));
            add("attn_k.bias", random(&[kv], 0.1));
            add("attn_v.bias", random(&[kv], 0.1));
        }
    }
    let u32s = |v: usize| gguf_file::Value::U32(v as u32);
    let metadata = vec![
        ("general.architecture".to_string(), gguf_file::Value::String(arch.into())),
        ("general.name".to_string(), gguf_file::Value::String(format!("tiny-{arch}"))),
        (format!("{arch}.context_length"), u32s(512)),
        (format!("{arch}.embedding_length"), u32s(WIDTH)),
        (format!("{arch}.block_count"), u32s(LAYERS)),
        (format!("{arch}.feed_forward_length"), u32s(FFN)),
        (format!("{arch}.attention.head_count"), u32s(HEADS)),
        (format!("{arch}.attention.head_count_kv"), u32s(KV_HEADS)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), gguf_file::Value::F32(1e-6)),
        (format!("{arch}.rope.freq_base"), gguf_file::Value::F32(10_000.0)),
        (format!("{arch}.vocab_size"), u32s(VOCAB)),
        ("tokenizer.ggml.model".to_string(), gguf_file::Value::String("none".into())),
    ];
    let quantized: Vec<(String, QTensor)> =
        tensors.into_iter().map(|(n, t)| (n, QTensor::quantize(&t, GgmlDType::F32).unwrap())).collect();
    // A file of its own per call: tests run in parallel and each removes its model when done,
    // and llama.cpp keeps loaded models by path.
    static MODELS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = MODELS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("seedflow-tiny-{arch}-{}-{n}.gguf", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = quantized.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
    path
}

fn settings(path: &Path) -> ModelSettings {
    ModelSettings {
        path: path.to_path_buf(),
        context: 512,
        gpu_layers: 0,
        threads: 2,
        batch: 512,
        parallel: 1,
        server: None,
    }
}

fn tokens(count: usize, salt: usize) -> Vec<u32> {
    (0..count).map(|i| ((i * 37 + salt * 11 + 5) % VOCAB) as u32).collect()
}

/// Largest difference between the trainer's logits and llama.cpp's, over every position, and
/// over the second half asked for alone (as training asks for an answer's positions, which the
/// last layer then computes alone).
fn largest_difference(model: &Path, base: &Base, lora: Option<&Lora>, adapter: Option<&Path>, tokens: &[u32]) -> f32 {
    let ours = |from: usize| {
        let positions: Vec<u32> = (from as u32..tokens.len() as u32).collect();
        base.forward(tokens, &positions, lora, None).unwrap().to_vec2::<f32>().unwrap()
    };
    let half = tokens.len() / 2;
    let theirs = Llama::default().logits(&settings(model), adapter.map(|a| (a, 1.0)), tokens).unwrap();
    let (all, second_half) = (ours(0), ours(half));
    assert_eq!(all.len(), theirs.len());
    assert_eq!(second_half.len(), theirs.len() - half);
    let mut largest = 0f32;
    for (a, b) in all.iter().chain(&second_half).zip(theirs.iter().chain(&theirs[half..])) {
        assert_eq!(a.len(), b.len(), "vocabulary size");
        for (x, y) in a.iter().zip(b) {
            largest = largest.max((x - y).abs());
        }
    }
    largest
}

fn examples() -> Vec<Example> {
    (0..4).map(|i| Example { tokens: tokens(24 + i * 5, i), completion_start: 10 }).collect()
}

fn settings_for(epochs: usize, learning_rate: f64) -> train::Settings {
    train::Settings { epochs, learning_rate, warmup: 0.0, batch: 2, dropout: 0.0, seed: 7 }
}

fn check_parity(architecture: Architecture) {
    let model = tiny_model(architecture);
    let base = Base::load(&model, false).unwrap();
    let sequence = tokens(48, 3);
    let plain = largest_difference(&model, &base, None, None, &sequence);
    assert!(plain < 1e-4, "{architecture:?} without adapter: logits differ by {plain}");

    // Train an adapter for a few steps (so B is no longer zero), export it, and load it into
    // llama.cpp.
    let lora = Lora::new(&base, 4, 8.0, &Target::all(), 1).unwrap();
    train::train(&base, &lora, &examples(), &settings_for(3, 0.02), None, &|| false, &mut |_, _| {}).unwrap();
    let adapter = model.with_extension("adapter.gguf");
    lora.save_gguf(&adapter, architecture).unwrap();
    let adapted = largest_difference(&model, &base, Some(&lora), Some(&adapter), &sequence);
    assert!(adapted < 1e-4, "{architecture:?} with adapter: logits differ by {adapted}");
    // The adapter does change the logits, so the comparison above means something.
    let positions: Vec<u32> = (0..sequence.len() as u32).collect();
    let with = base.forward(&sequence, &positions, Some(&lora), None).unwrap();
    let without = base.forward(&sequence, &positions, None, None).unwrap();
    let change = (with - without).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(change > 1e-2, "the trained adapter changes the logits by only {change}");

    // Read back, the adapter is the same.
    let again = Lora::load_gguf(&adapter, &base).unwrap();
    assert_eq!((again.rank, again.alpha, again.pairs.len()), (4, 8.0, lora.pairs.len()));
    for _ in [std::fs::remove_file(&model), std::fs::remove_file(&adapter)] {}
}

#[test]
fn qwen2_forward_matches_llama_cpp_with_and_without_an_adapter() {
    check_parity(Architecture::Qwen2);
}

#[test]
fn llama_forward_matches_llama_cpp_with_and_without_an_adapter() {
    check_parity(Architecture::Llama);
}

#[test]
fn every_lora_matrix_of_every_layer_gets_a_gradient_and_the_loss_falls() {
    let model = tiny_model(Architecture::Qwen2);
    let base = Base::load(&model, false).unwrap();
    let lora = Lora::new(&base, 4, 8.0, &Target::all(), 2).unwrap();
    assert_eq!(lora.pairs.len(), LAYERS * Target::NAMES.len());
    // One step first: with B zero, A's gradient is zero by construction (PEFT's start).
    let records =
        train::train(&base, &lora, &examples(), &settings_for(12, 0.01), None, &|| false, &mut |_, _| {}).unwrap();
    let example = &examples()[0];
    let grads = base.loss(&example.tokens, example.completion_start, Some(&lora), None).unwrap().backward().unwrap();
    for (&(layer, target), pair) in &lora.pairs {
        for (name, var) in [("A", &pair.a), ("B", &pair.b)] {
            let grad = grads.get(var).unwrap_or_else(|| panic!("no gradient for layer {layer} {target:?} {name}"));
            let norm = grad.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "zero gradient for layer {layer} {target:?} {name}");
        }
    }
    let (first, last) = (records[0].loss, records.last().unwrap().loss);
    assert!(last < first * 0.8, "loss went from {first} to {last}");
    let _ = std::fs::remove_file(&model);
}

#[test]
fn training_is_reproducible_for_a_seed() {
    let model = tiny_model(Architecture::Llama);
    let base = Base::load(&model, false).unwrap();
    let run = || {
        let lora = Lora::new(&base, 4, 8.0, &[Target::Q, Target::V], 3).unwrap();
        let mut settings = settings_for(2, 0.01);
        settings.dropout = 0.1;
        train::train(&base, &lora, &examples(), &settings, None, &|| false, &mut |_, _| {}).unwrap();
        lora.pairs.values().map(|p| p.b.as_tensor().to_vec2::<f32>().unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
    let _ = std::fs::remove_file(&model);
}

#[test]
fn an_interrupted_training_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one() {
    let model = tiny_model(Architecture::Qwen2);
    let base = Base::load(&model, false).unwrap();
    let mut settings = settings_for(3, 0.01);
    settings.dropout = 0.1;
    let fresh = || Lora::new(&base, 4, 8.0, &Target::all(), 5).unwrap();
    let b_matrices =
        |lora: &Lora| lora.pairs.values().map(|p| p.b.as_tensor().to_vec2::<f32>().unwrap()).collect::<Vec<_>>();
    let losses = |records: &[train::StepRecord]| records.iter().map(|r| (r.step, r.loss)).collect::<Vec<_>>();

    let whole = fresh();
    let expected = train::train(&base, &whole, &examples(), &settings, None, &|| false, &mut |_, _| {}).unwrap();

    // Interrupted in step 4 (after 3 steps of 6, in the second epoch), then resumed into fresh
    // matrices, as a new process would.
    let checkpoint = model.with_extension("checkpoint.safetensors");
    let examples_seen = std::sync::atomic::AtomicUsize::new(0);
    let stop = || examples_seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 > 7;
    let interrupted = train::train(&base, &fresh(), &examples(), &settings, Some(&checkpoint), &stop, &mut |_, _| {});
    assert!(interrupted.is_err_and(|e| e.to_string().contains("interrupted")));
    let resumed = fresh();
    let mut replayed = vec![];
    let records = train::train(&base, &resumed, &examples(), &settings, Some(&checkpoint), &|| false, &mut |r, _| {
        replayed.push(r.step)
    })
    .unwrap();
    assert_eq!(replayed, (1..=6).collect::<Vec<_>>(), "the checkpoint's 3 steps, then the rest");
    // (Loss values of the checkpointed steps went through JSON: equal to the last digits.)
    for ((step, loss), (expected_step, expected_loss)) in losses(&records).into_iter().zip(losses(&expected)) {
        assert!(
            step == expected_step && (loss - expected_loss).abs() < 1e-12,
            "step {step}: {loss} vs {expected_loss}"
        );
    }
    assert_eq!(records.len(), expected.len());
    assert_eq!(b_matrices(&resumed), b_matrices(&whole));
    assert_ne!(b_matrices(&resumed), b_matrices(&fresh()), "training changed the matrices");

    // A checkpoint that does not fit the adapter is an error that names it, not a panic.
    let other = Lora::new(&base, 2, 8.0, &[Target::Q], 5).unwrap();
    let error = train::train(&base, &other, &examples(), &settings, Some(&checkpoint), &|| false, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(error.contains("checkpoint") && error.contains("does not fit"), "{error}");
    // So is a rank no projection has room for, before anything is allocated for it.
    let error = Lora::new(&base, usize::MAX / 2, 8.0, &Target::all(), 5).err().unwrap().to_string();
    assert!(error.contains("is larger than either side of the model's `attn_q` projection"), "{error}");
    for _ in [std::fs::remove_file(&model), std::fs::remove_file(&checkpoint)] {}
}

#[test]
fn peft_export_uses_hugging_face_names_and_unpermutes_llama_queries_and_reads_back() {
    let model = tiny_model(Architecture::Llama);
    let base = Base::load(&model, false).unwrap();
    let lora = Lora::new(&base, 4, 8.0, &[Target::Q, Target::Down], 4).unwrap();
    // B rows numbered, to follow the permutation.
    for pair in lora.pairs.values() {
        let (rows, rank) = pair.b.as_tensor().dims2().unwrap();
        let numbered = Tensor::arange(0f32, rows as f32, &Device::Cpu).unwrap();
        pair.b.set(&numbered.unsqueeze(1).unwrap().broadcast_as((rows, rank)).unwrap().contiguous().unwrap()).unwrap();
    }
    let dir = model.with_extension("peft");
    lora.save_peft(&dir, &base.config).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["r"], 4);
    assert_eq!(config["target_modules"], serde_json::json!(["q_proj", "down_proj"]));
    let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(tensors.len(), LAYERS * 2 * 2);
    let q_b = &tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"];
    let rows: Vec<f32> = q_b.narrow(1, 0, 1).unwrap().squeeze(1).unwrap().to_vec1().unwrap();
    // GGUF row 2i holds HF row i of the first half of a head, 2i+1 its second half.
    let head_dim = WIDTH / HEADS;
    assert_eq!(&rows[..4], &[0.0, 2.0, 4.0, 6.0]);
    assert_eq!(rows[head_dim / 2], 1.0);
    let down_a = &tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"];
    assert_eq!(down_a.dims(), &[4, FFN]);
    // Read back, the matrices are the trainer's again (queries permuted back to GGUF's order),
    // and from bf16 weights as PEFT often saves them, the same to bf16's precision.
    let same = |a: &Lora, b: &Lora, tolerance: f32| {
        assert_eq!((a.rank, a.alpha, a.pairs.len()), (b.rank, b.alpha, b.pairs.len()));
        for (key, pair) in &a.pairs {
            let other = &b.pairs[key];
            for (x, y) in [(pair.a.as_tensor(), other.a.as_tensor()), (pair.b.as_tensor(), other.b.as_tensor())] {
                let difference: f32 = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(
                    difference <= tolerance * (1.0 + x.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
                );
            }
        }
    };
    same(&lora, &Lora::load_peft(&dir, &base.config).unwrap(), 0.0);
    let halved: std::collections::HashMap<String, Tensor> =
        tensors.iter().map(|(k, v)| (k.clone(), v.to_dtype(candle_core::DType::BF16).unwrap())).collect();
    candle_core::safetensors::save(&halved, dir.join("adapter_model.safetensors")).unwrap();
    same(&lora, &Lora::load_peft(&dir, &base.config).unwrap(), 1.0 / 128.0);
    Lora::check_file(&dir, Some(&model)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&model);
}

/// The tiny GGUF model's tensors as a Hugging Face directory would hold them: Hugging Face names,
/// llama's q and k rows in Hugging Face's order (undoing llama.cpp's converter), `config.json`.
fn as_hugging_face(model: &Path, architecture: Architecture, dtype: candle_core::DType) -> PathBuf {
    let mut file = std::fs::File::open(model).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let head_dim = WIDTH / HEADS;
    let mut tensors = std::collections::HashMap::new();
    for name in content.tensor_infos.keys() {
        let mut tensor = content.tensor(&mut file, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        let heads = if name.contains("attn_q") { HEADS } else { KV_HEADS };
        if architecture == Architecture::Llama && (name.contains("attn_q") || name.contains("attn_k")) {
            let (rows, columns) = tensor.dims2().unwrap();
            tensor = tensor
                .reshape((heads, head_dim / 2, 2, columns))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((rows, columns))
                .unwrap();
        }
        let hf = match name.as_str() {
            "token_embd.weight" => "model.embed_tokens.weight".to_string(),
            "output_norm.weight" => "model.norm.weight".to_string(),
            "output.weight" => "lm_head.weight".to_string(),
            _ => {
                let (layer, rest) = name.strip_prefix("blk.").unwrap().split_once('.').unwrap();
                let (module, kind) = rest.rsplit_once('.').unwrap();
                let module = match module {
                    "attn_norm" => "input_layernorm",
                    "ffn_norm" => "post_attention_layernorm",
                    "attn_q" => "self_attn.q_proj",
                    "attn_k" => "self_attn.k_proj",
                    "attn_v" => "self_attn.v_proj",
                    "attn_output" => "self_attn.o_proj",
                    "ffn_gate" => "mlp.gate_proj",
                    "ffn_up" => "mlp.up_proj",
                    "ffn_down" => "mlp.down_proj",
                    other => panic!("unexpected tensor {other}"),
                };
                format!("model.layers.{layer}.{module}.{kind}")
            }
        };
        tensors.insert(hf, tensor.to_dtype(dtype).unwrap());
    }
    let dir = model.with_extension(format!("hf-{dtype:?}"));
    std::fs::create_dir_all(&dir).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "model_type": architecture.name(),
        "hidden_size": WIDTH,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": FFN,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": null,
        "vocab_size": VOCAB,
        "tie_word_embeddings": architecture == Architecture::Qwen2,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

/// The largest difference between two models' logits over a sequence, relative to the largest
/// logit.
fn logits_difference(a: &Base, b: &Base) -> f32 {
    let sequence = tokens(40, 2);
    let positions: Vec<u32> = (0..sequence.len() as u32).collect();
    let logits = |base: &Base| base.forward(&sequence, &positions, None, None).unwrap().flatten_all().unwrap();
    let largest = |t: candle_core::Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    largest((logits(a) - logits(b)).unwrap()) / largest(logits(a))
}

#[test]
fn a_hugging_face_directory_trains_as_its_gguf_conversion_does() {
    for architecture in [Architecture::Qwen2, Architecture::Llama] {
        let model = tiny_model(architecture);
        let gguf = Base::load(&model, false).unwrap();
        let directory = as_hugging_face(&model, architecture, candle_core::DType::F32);
        let hf = Base::load(&directory, false).unwrap();
        assert_eq!(logits_difference(&gguf, &hf), 0.0, "{architecture:?}: the same logits from both forms");
        // The same loss, step after step, and the same adapter.
        let run = |base: &Base| {
            let lora = Lora::new(base, 4, 8.0, &Target::all(), 3).unwrap();
            let records =
                train::train(base, &lora, &examples(), &settings_for(1, 0.01), None, &|| false, &mut |_, _| {})
                    .unwrap();
            (records.iter().map(|r| r.loss).collect::<Vec<_>>(), lora)
        };
        let ((gguf_losses, _), (hf_losses, hf_lora)) = (run(&gguf), run(&hf));
        assert_eq!(gguf_losses, hf_losses, "{architecture:?}");
        // Its PEFT export fits the directory it was trained on.
        hf_lora.save_peft(&directory.join("adapter"), &hf.config).unwrap();
        Lora::check_file(&directory.join("adapter"), Some(&directory)).unwrap();
        // bf16 weights, as Hugging Face models are usually saved, read to bf16's precision.
        let halved = as_hugging_face(&model, architecture, candle_core::DType::BF16);
        let difference = logits_difference(&gguf, &Base::load(&halved, false).unwrap());
        assert!(difference > 0.0 && difference < 0.05, "{architecture:?}: bf16 logits differ by {difference}");
        for dir in [&directory, &halved] {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = std::fs::remove_file(&model);
    }
}

#[test]
fn a_hugging_face_directory_s_training_text_is_its_jinja_chat_template_and_tokenizer() {
    // Qwen2.5-Coder's own Jinja template (the GGUF keeps a copy), which adds a default system
    // turn; a word-level tokenizer whose ids are easy to follow.
    let qwen = seedflow::assets::ensure(&seedflow::assets::DEFAULT_MODEL, &|m| eprintln!("{m}")).unwrap();
    let mut file = std::fs::File::open(&qwen).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let template = content.metadata["tokenizer.chat_template"].to_string().unwrap().clone();
    let words = "<|im_start|> <|im_end|> system You are Qwen , created by Alibaba Cloud . a helpful assistant user \
                 Write the function f def ( ) : return 1 [UNK]";
    let dir = std::env::temp_dir().join(format!("seedflow-hf-tokenizer-{}", std::process::id()));
    let vocabulary = word_tokenizer(&dir, words, &template);

    let pairs = [("Write the function f".to_string(), "def f ( ) : return 1".to_string())];
    let sequences = seedflow::llm::training_tokens(&settings(&dir), &pairs).unwrap();
    let id = |w: &str| vocabulary[w].as_u64().unwrap() as u32;
    let ids = |text: &str| text.split(' ').map(id).collect::<Vec<_>>();
    let prompt = ids("<|im_start|> system You are Qwen , created by Alibaba Cloud . You are a helpful assistant . \
                      <|im_end|> <|im_start|> user Write the function f <|im_end|> <|im_start|> assistant");
    let (tokens, start) = &sequences[0];
    assert_eq!(&tokens[..*start], prompt.as_slice(), "the prompt as Hugging Face renders it");
    assert_eq!(&tokens[*start..], [ids("def f ( ) : return 1"), vec![id("<|im_end|>")]].concat().as_slice());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A word-level `tokenizer.json` of `words` (the first two the chat's special tokens) and a
/// `tokenizer_config.json` with the chat `template`, in `dir`; returns the vocabulary.
fn word_tokenizer(dir: &Path, words: &str, template: &str) -> serde_json::Map<String, serde_json::Value> {
    let vocabulary: serde_json::Map<String, serde_json::Value> =
        words.split(' ').filter(|w| !w.is_empty()).enumerate().map(|(i, w)| (w.to_string(), i.into())).collect();
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                           "normalized": false, "special": true})
    };
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<|im_start|>"), special(1, "<|im_end|>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocabulary, "unk_token": "[UNK]"},
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let config = serde_json::json!({"eos_token": "<|im_end|>", "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    vocabulary
}

/// ChatML, as Jinja.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] \
                      + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

#[test]
fn a_workflow_trains_on_a_hugging_face_directory_and_is_refused_sampling_from_one_in_process() {
    let model = tiny_model(Architecture::Qwen2);
    let directory = as_hugging_face(&model, Architecture::Qwen2, candle_core::DType::BF16);
    word_tokenizer(&directory, "<|im_start|> <|im_end|> user assistant def return [UNK]", CHATML);
    let work = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(root.join("examples/data/house-api.jsonl"), work.path().join("tasks.jsonl")).unwrap();
    let run = |steps: &str, run_dir: &str| {
        let flow = format!(
            "model \"tiny\" path=\"{}\"\ndataset \"tasks\" format=\"jsonl\" path=\"tasks.jsonl\" limit=3\n{steps}\n",
            directory.display()
        );
        std::fs::write(work.path().join("flow.kdl"), flow).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_seedflow"))
            .args(["run", "flow.kdl", "--run-dir", run_dir])
            .env_remove("CI") // under CI the run's events and errors go to stdout as JSON lines
            .current_dir(work.path())
            .output()
            .unwrap();
        let said = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        (out.status, said(&out.stdout), said(&out.stderr))
    };
    // A rank past the model's projections is refused when the workflow is checked, not once the
    // steps before training have run; in the GGUF file and the Hugging Face directory alike.
    for path in [&model, &directory] {
        let why = Lora::check_rank(path, WIDTH + 1, &[Target::Down, Target::Q]).unwrap_err();
        assert!(why.contains(&format!("`attn_q` projection ({WIDTH}×{WIDTH})")), "{why}");
        Lora::check_rank(path, WIDTH + 1, &[Target::Down, Target::Up]).unwrap();
    }
    let step = format!(r#"finetune-lora "tune" model="tiny" data="tasks" rank={}"#, WIDTH + 1);
    let (status, stdout, stderr) = run(&step, "refused");
    assert!(status.code() == Some(2) && stderr.contains("rank of at most 64"), "{status}\n{stdout}\n{stderr}");
    let (status, stdout, stderr) = run(r#"finetune-lora "tune" model="tiny" data="tasks" rank=4 epochs=1"#, "trained");
    assert!(status.success(), "{status}\n{stdout}\n{stderr}");
    let tune = work.path().join("trained/tune");
    Lora::check_file(&tune.join("adapter.gguf"), Some(&model)).unwrap();
    Lora::check_file(&tune.join("peft"), Some(&directory)).unwrap();
    // Nothing to train on is said, and the run goes on.
    let bare: String = std::fs::read_to_string(work.path().join("tasks.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let mut task: serde_json::Value = serde_json::from_str(line).unwrap();
            task.as_object_mut().unwrap().remove("solution");
            format!("{task}\n")
        })
        .collect();
    std::fs::write(work.path().join("bare.jsonl"), bare).unwrap();
    let step =
        "dataset \"bare\" format=\"jsonl\" path=\"bare.jsonl\"\nfinetune-lora \"tune\" model=\"tiny\" data=\"bare\"";
    let (status, stdout, stderr) = run(step, "untrained");
    assert!(status.success(), "{status}\n{stdout}\n{stderr}");
    assert!(stderr.contains("nothing to train on (no task with a reference solution in `bare`)"), "{stderr}");
    // Sampling needs a server: refused when the workflow is checked.
    let (status, stdout, stderr) = run(r#"generate "answers" model="tiny" tasks="tasks""#, "sampled");
    assert!(
        status.code() == Some(2)
            && stderr.contains("is a Hugging Face directory")
            && stderr.contains("URL of a server"),
        "{status}\n{stdout}\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&directory);
    let _ = std::fs::remove_file(&model);
}

/// A GGUF model cut short (an interrupted download) is refused when the workflow is checked, not
/// at the first step that loads it.
#[test]
fn a_model_file_cut_short_is_refused_at_check() {
    let model = tiny_model(Architecture::Llama);
    let work = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(work.path().join("cut.gguf"), &bytes[..bytes.len() - 1]).unwrap();
    std::fs::write(work.path().join("whole.gguf"), &bytes).unwrap();
    let check = |file: &str| {
        let flow = work.path().join("flow.kdl");
        std::fs::write(work.path().join("t.jsonl"), r#"{"task_id": "a", "prompt": "p", "tests": ["assert True"]}"#)
            .unwrap();
        let steps = "dataset \"t\" format=\"jsonl\" path=\"t.jsonl\"\n";
        std::fs::write(&flow, format!("model \"m\" path=\"{file}\"\n{steps}")).unwrap();
        seedflow::load_plan(&flow, &[]).err().map(|problems| seedflow::dsl::diagnostics::render_plain(&problems, 100))
    };
    let refused = check("cut.gguf").expect("refused");
    assert!(refused.contains("`cut.gguf` is not a whole GGUF model: the file is cut short"), "{refused}");
    assert_eq!(check("whole.gguf"), None);
    // A header candle's reader would divide by zero on (an alignment of 0) is llama.cpp's to judge.
    let zeros = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let tensor = QTensor::quantize(&zeros, GgmlDType::F32).unwrap();
    let mut bytes = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut bytes, &[("general.alignment", &gguf_file::Value::U32(0))], &[("t", &tensor)]).unwrap();
    std::fs::write(work.path().join("odd.gguf"), bytes.into_inner()).unwrap();
    assert_eq!(check("odd.gguf"), None);
    let _ = std::fs::remove_file(&model);
}
