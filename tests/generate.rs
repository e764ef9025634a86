//! Generation with llama.cpp and the real default model (fetched on first use with pip,
//! `seedflow fetch model`): code that runs, reproducible sampling, and adapters.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use std::sync::LazyLock;

use seedflow::data::{Status, Task};
use seedflow::llm::{
    Generated, Generation, Inference, Llama, LlmError, ModelSettings, Request, Sampling, Timing, extract, prompt,
};

/// The tests' llama.cpp: each model loaded once for them all.
static LLAMA: LazyLock<Llama> = LazyLock::new(Llama::default);

/// Samples `requests` with the tests' llama.cpp.
fn sample_with(
    settings: &ModelSettings,
    adapter: Option<(&std::path::Path, f32)>,
    requests: &[Request],
    sampling: &Sampling,
) -> Result<(Vec<Vec<Generated>>, Timing), LlmError> {
    LLAMA.generate(&Generation { settings, adapter, requests, sampling }, &|| false, &mut |_, _| {})
}

fn settings() -> ModelSettings {
    let path =
        seedflow::assets::ensure(&seedflow::assets::DEFAULT_MODEL, &|m| eprintln!("{m}")).expect("default model");
    ModelSettings { path, context: 2048, gpu_layers: 0, threads: 0, batch: 512, parallel: 8, server: None }
}

fn sampling(temperature: f32, max_tokens: u32) -> Sampling {
    Sampling { temperature, top_p: 0.95, top_k: 40, max_tokens, stop: vec![], stop_after_code: true }
}

fn run(requests: &[Request], sampling: &Sampling, adapter: Option<(&std::path::Path, f32)>) -> Vec<Vec<Generated>> {
    sample_with(&settings(), adapter, requests, sampling).unwrap().0
}

fn request(task: &Task, seeds: &[u64]) -> Request {
    Request {
        examples: vec![],
        message: prompt::solve(prompt::default_template(task.style), task),
        seeds: seeds.to_vec(),
    }
}

#[test]
fn greedy_answers_are_code_that_runs_in_the_sandbox() {
    let tasks = common::mbpp(&["2", "3", "4"]);
    let requests: Vec<Request> = tasks.iter().map(|t| request(t, &[0])).collect();
    let (answers, timing) = sample_with(&settings(), None, &requests, &sampling(0.0, 384)).unwrap();
    // Decoding is part of generating, the rest being the sampling around it.
    assert!(timing.decoding_seconds > 0.0 && timing.decoding_seconds < timing.generation_seconds, "{timing:?}");
    let wasm = seedflow::sandbox::interpreter(&|_| {}).unwrap();
    let sandbox = Arc::new(seedflow::sandbox::Sandbox::new(&wasm, 1, 256 << 20).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let limits = seedflow::nodes::default_limits().unwrap();
    let mut statuses = vec![];
    for (task, answer) in tasks.iter().zip(&answers) {
        let generated = &answer[0];
        // A greedy token is the likeliest, so its log-probability lies between -ln(vocabulary)
        // and 0: a normaliser left out or taken twice falls outside.
        let floor = -(151_936f64).ln();
        assert!(generated.tokens > 0 && (floor..0.0).contains(&generated.mean_logprob), "{generated:?}");
        let code = extract::extract_code(&generated.text, None, None);
        let job = seedflow::sandbox::Job::new(&code, task, &limits);
        let result = runtime.block_on(sandbox.run(&job, &limits)).unwrap();
        assert_ne!(result.status, Status::Syntax, "{}\n{code}\n{}", generated.text, result.feedback);
        statuses.push(result.status);
    }
    assert!(statuses.contains(&Status::Passed), "none of the greedy answers passed: {statuses:?}");
}

#[test]
fn samples_repeat_for_a_seed_and_differ_across_seeds() {
    let task = &common::mbpp(&["6"])[0];
    let sampling = sampling(0.9, 96);
    let first = run(&[request(task, &[11, 12, 11])], &sampling, None);
    let again = run(&[request(task, &[11])], &sampling, None);
    assert_eq!(first[0][0].text, first[0][2].text, "one seed, one batch");
    assert_eq!(first[0][0].text, again[0][0].text, "one seed, two runs");
    assert_ne!(first[0][0].text, first[0][1].text, "two seeds");
    // With one sequence, each sample starts only once the last one is done, from the prompt
    // kept aside, and the next task's prompt then takes its place. Alone in its batch, as the
    // single-seed run above was, a sample is the same text (sequences of unequal lengths in one
    // batch can shift the last bits of each other's logits, and with them a near tie).
    let one = ModelSettings { parallel: 1, ..settings() };
    let other = &common::mbpp(&["7"])[0];
    let requests = [request(task, &[11, 12, 11]), request(other, &[11])];
    let narrow = sample_with(&one, None, &requests, &sampling).unwrap().0;
    assert_eq!(narrow[0][0].text, again[0][0].text);
    assert_eq!(narrow[0][2].text, again[0][0].text, "a sample started later");
    assert_ne!(narrow[0][1].text, again[0][0].text);
    // The next task keeps the cache of the prompt opening it shares with the task before it,
    // whose samples leave nothing behind: the same text after one sample of it as after three.
    let after_one = sample_with(&one, None, &[request(task, &[11]), request(other, &[11])], &sampling).unwrap().0;
    assert_eq!(narrow[1][0].text, after_one[1][0].text, "the next task");
}

/// A random rank-4 LoRA on every layer's query and down projections of the default model
/// (Qwen2.5-Coder-0.5B: 24 layers, width 896, MLP 4864), written by the trainer's exporter.
fn random_adapter() -> PathBuf {
    use candle_core::{Device, Tensor, Var};
    use seedflow::train::{Architecture, Lora, Pair, Target};
    let random = |rows: usize, cols: usize| {
        Var::from_tensor(&(Tensor::rand(-0.1f32, 0.1, (rows, cols), &Device::Cpu).unwrap())).unwrap()
    };
    let rank = 4;
    let mut lora = Lora { rank, alpha: rank as f32, pairs: Default::default() };
    for layer in 0..24 {
        for (target, n_in, n_out) in [(Target::Q, 896, 896), (Target::Down, 4864, 896)] {
            lora.pairs.insert((layer, target), Pair { a: random(rank, n_in), b: random(n_out, rank) });
        }
    }
    let path = std::env::temp_dir().join(format!("seedflow-test-adapter-{}.gguf", std::process::id()));
    lora.save_gguf(&path, Architecture::Qwen2).unwrap();
    path
}

#[test]
fn an_adapter_changes_the_output_and_detaches() {
    let task = &common::mbpp(&["7"])[0];
    let greedy = sampling(0.0, 64);
    let adapter = random_adapter();
    let base = run(&[request(task, &[0])], &greedy, None);
    let adapted = run(&[request(task, &[0])], &greedy, Some((&adapter, 1.0)));
    let detached = run(&[request(task, &[0])], &greedy, None);
    let _ = std::fs::remove_file(&adapter);
    assert_ne!(base[0][0].text, adapted[0][0].text);
    assert_eq!(base[0][0].text, detached[0][0].text);
}

#[test]
fn few_shot_turns_go_through_the_chat_template() {
    let task = &common::mbpp(&["7"])[0];
    let greedy = sampling(0.0, 16);
    let plain = run(&[request(task, &[0])], &greedy, None);
    let mut with_examples = request(task, &[0]);
    with_examples.examples = vec![("Answer every request with the word hello.".to_string(), "hello".to_string())];
    let shown = run(&[with_examples], &greedy, None);
    assert!(shown[0][0].tokens > 0);
    // The same tokens may come out, but not with the same probabilities: the turns were seen.
    assert_ne!(plain[0][0].mean_logprob, shown[0][0].mean_logprob, "the examples reach the model");
}

/// A prompt keeps the cache of what it shares with the prompt before it (the system turn, the
/// template's opening, worked examples) and decodes only the rest: the same samples, fewer prompt
/// tokens decoded.
#[test]
fn a_prompt_reuses_what_it_shares_with_the_one_before() {
    let tasks = common::mbpp(&["2", "3"]);
    let greedy = sampling(0.0, 24);
    let turns =
        vec![("Write a function that returns 1.".to_string(), "```python\ndef one():\n    return 1\n```".to_string())];
    let shown: Vec<Request> =
        tasks.iter().map(|t| Request { examples: turns.clone(), ..request(t, &[0, 1]) }).collect();
    let (together, timing) = sample_with(&settings(), None, &shown, &greedy).unwrap();
    let (alone, first) = sample_with(&settings(), None, &shown[1..], &greedy).unwrap();
    let (_, second) = sample_with(&settings(), None, &shown[..1], &greedy).unwrap();
    for (a, b) in together[1].iter().zip(&alone[0]) {
        assert_eq!((&a.text, a.tokens), (&b.text, b.tokens));
        // Not to the last bit: the batches around it differ, and with them llama.cpp's sums.
        assert!((a.mean_logprob - b.mean_logprob).abs() < 1e-2, "{} against {}", a.mean_logprob, b.mean_logprob);
    }
    // The system turn, the template's opening and the example were decoded once, not twice.
    let saved = (first.prompt_tokens + second.prompt_tokens) - timing.prompt_tokens;
    assert!(saved > 40, "{saved} prompt tokens saved");
}

/// A stop string ends a sample where it first appears, inside a token's piece too, and is left
/// out of the text; what comes before it is the same as without it.
#[test]
fn a_stop_string_ends_the_sample_where_it_first_appears() {
    let task = &common::mbpp(&["2"])[0];
    let greedy = sampling(0.0, 48);
    let plain = run(&[request(task, &[0])], &greedy, None).remove(0).remove(0);
    // Five characters from the middle of the answer: seldom where a token starts.
    let starts: Vec<usize> = plain.text.char_indices().map(|(i, _)| i).chain([plain.text.len()]).collect();
    let middle = starts.len() / 2;
    let stop = &plain.text[starts[middle]..starts[(middle + 5).min(starts.len() - 1)]];
    let stopped = run(&[request(task, &[0])], &Sampling { stop: vec![stop.to_string()], ..greedy }, None);
    let first = plain.text.find(stop).unwrap();
    assert_eq!(stopped[0][0].text, plain.text[..first], "stop string {stop:?}");
    assert!(stopped[0][0].tokens < plain.tokens, "{stopped:?}");
}

/// An answer that ends before its first token is scored by its end token's log-probability, not
/// by a mean over no tokens (0, which `select prefer="highest-logprob"` would pick first).
#[test]
fn an_empty_answer_is_scored_by_its_end() {
    let mut silent = request(&common::mbpp(&["2"])[0], &[0]);
    let turn = |n: u32| (format!("Say nothing at all ({n})."), String::new());
    silent.examples = vec![turn(1), turn(2), turn(3)];
    silent.message = "Say nothing at all (4).".into();
    let answer = run(&[silent], &sampling(0.0, 8), None).remove(0).remove(0);
    assert_eq!((answer.text.as_str(), answer.tokens), ("", 0), "{answer:?}");
    assert!((-(151_936f64).ln()..0.0).contains(&answer.mean_logprob), "{answer:?}");
}

/// Without a GPU llama.cpp would run the layers on the CPU, silently; asking for one is an error.
#[test]
#[cfg(not(feature = "cuda"))]
fn asking_for_gpu_layers_without_a_gpu_is_an_error() {
    let settings = ModelSettings { gpu_layers: -1, ..settings() };
    let error = LLAMA.logits(&settings, None, &[1, 2, 3]).unwrap_err().to_string();
    assert!(error.contains("`gpu-layers=-1` asks for a GPU") && error.contains("--features cuda"), "{error}");
}

/// `context` caps a sequence: a step that needs more fails before decoding, naming the fix, and
/// `context=0` is the model's training context (32,768 tokens for the default model).
#[test]
fn a_sequence_longer_than_the_context_is_an_error() {
    let requests = [request(&common::mbpp(&["2"])[0], &[0])];
    let generate = |context: u32, max_tokens: u32| {
        let settings = ModelSettings { context, ..settings() };
        sample_with(&settings, None, &requests, &sampling(0.0, max_tokens)).unwrap_err().to_string()
    };
    let capped = generate(256, 512);
    assert!(capped.contains("raise the model's `context` (now 256)"), "{capped}");
    let model_own = generate(0, 40_000);
    assert!(model_own.contains("(now 0: the model's own, 32768)"), "{model_own}");
}

/// `batch` sizes the prompt's decodes; the sequences' next tokens still go into one decode
/// (llama.cpp aborted the process when they were more than `batch`).
#[test]
fn a_batch_smaller_than_the_sequences_still_samples() {
    let settings = ModelSettings { batch: 1, ..settings() };
    let requests = [request(&common::mbpp(&["2"])[0], &[1, 2, 3, 4, 5, 6, 7, 8])];
    let samples = sample_with(&settings, None, &requests, &sampling(0.8, 4)).unwrap().0;
    assert_eq!(samples[0].len(), 8);
    assert!(samples[0].iter().all(|s| s.tokens > 0), "{samples:?}");
}
