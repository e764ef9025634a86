//! LoRA training with candle: the frozen base read from the model's GGUF file or Hugging Face
//! directory ([`model::Base`]), LoRA matrices ([`lora::Lora`]), and the loop — AdamW with linear warmup
//! and decay, gradient accumulation, loss on the completion tokens only, seeded throughout.

mod amx;
mod hf;
mod lora;
mod model;
mod ops;
mod optimizer;

pub use hf::is_model_dir;
pub use lora::{Lora, Pair, Target, check_complete};
pub use model::{Architecture, Base, Config};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

crate::choice! {
    /// How the frozen weights' products are computed (`finetune-lora`'s `precision`). LoRA
    /// matrices, gradients and the optimizer are f32 in every case.
    pub enum Precision {
        /// bf16 where the CPU has AMX, f32 elsewhere.
        Auto = "auto",
        F32 = "f32",
        /// The weights and the products' other operand rounded to bf16, accumulated in f32, on
        /// AMX's tile units (an error where the CPU has none).
        Bf16 = "bf16",
    }
}

impl Precision {
    /// Whether the products run in bf16 on this machine; an error for `bf16` without AMX.
    pub fn bf16(self) -> Result<bool, String> {
        match self {
            Precision::Auto => Ok(amx::available()),
            Precision::F32 => Ok(false),
            Precision::Bf16 if amx::available() => Ok(true),
            Precision::Bf16 => Err("precision=\"bf16\" needs a CPU with AMX (Intel Xeon, Sapphire Rapids or later) \
                                    and this one has none; use \"auto\" or \"f32\""
                .into()),
        }
    }
}

/// A training error with seedflow's own message (candle's error type carries it).
fn bad(message: String) -> candle_core::Error {
    candle_core::Error::Msg(message)
}

/// One training sequence: the prompt's tokens, then the completion's from `completion_start`.
/// The loss covers the completion only.
#[derive(Debug, Clone)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub completion_start: usize,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub epochs: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Fraction of the steps spent warming up linearly; the rest decays linearly to zero.
    pub warmup: f64,
    /// Examples per optimizer step.
    pub batch: usize,
    pub dropout: f32,
    pub seed: u64,
}

/// What one optimizer step did: the loss curve is a list of these.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StepRecord {
    pub step: usize,
    pub epoch: usize,
    /// Mean loss of the step's examples, before the update.
    pub loss: f64,
    pub learning_rate: f64,
    /// Completion tokens the loss covered.
    pub tokens: usize,
    /// Seconds since training started, at the end of the step.
    pub seconds: f64,
}

/// The learning rate of step `step` (0-based) of `total`.
fn learning_rate(settings: &Settings, step: usize, total: usize) -> f64 {
    let warmup = (settings.warmup * total as f64).ceil() as usize;
    if step < warmup {
        settings.learning_rate * (step + 1) as f64 / warmup as f64
    } else {
        settings.learning_rate * (total - step) as f64 / (total - warmup).max(1) as f64
    }
}

/// Optimizer steps for `examples` examples.
pub fn steps(settings: &Settings, examples: usize) -> usize {
    settings.epochs * examples.div_ceil(settings.batch.max(1))
}

/// Makes the allocator keep freed memory for reuse; call first thing in `main`, before threads
/// start. Training allocates and frees tensors of up to hundreds of megabytes every step; by
/// default glibc serves blocks above 32 MiB with mmap, unmaps them on free and trims its heaps,
/// so the kernel zeroes every page again on the next allocation — steps took 2–3x as long on
/// this kind of machine. Here all blocks come from one heap that keeps what is
/// freed; [`train`] gives the memory back when it is done.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

/// Keeps candle's pool for elementwise ops from taking cores from its matrix multiplies; call
/// first thing in `main`, before threads start (candle reads these variables once). The two run
/// on different pools (candle's own, and rayon's for gemm), and an idle worker of candle's spins
/// for a while before it sleeps, so after every elementwise op it competes with the multiply
/// that follows. Workers here sleep at once, and where there are only two cores there is no
/// elementwise pool at all (the calling thread does that work): training on the quickstart's
/// pairs on 2 cores took 34.9–37.8 s with candle's defaults, 32.5–33.9 s with sleeping workers
/// and 30.8–33.8 s with no pool, with the same losses (README, Training). A variable the user
/// set is left as it is.
///
/// # Safety
/// No other thread may be running (the environment is changed).
pub unsafe fn share_cores_with_gemm() {
    let unset = |name: &str| std::env::var_os(name).is_none();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY (both): the caller guarantees that no other thread reads the environment.
    if unset("CANDLE_BARRIER_POOL_SPIN_LIMIT") {
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0") };
    }
    if unset("CANDLE_NUM_THREADS") && cores <= 2 {
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// Returns the memory training freed to the system.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How often a running training writes its checkpoint (and always when it is interrupted).
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Trains `lora` on `examples`, calling `on_step` after every optimizer step with the step's
/// record and the number of steps in all. Stops with an error once `cancelled` says so.
///
/// With a `checkpoint` path, training resumes from the file there if there is one (after
/// calling `on_step` for each step it had done), writes it every minute and when it is
/// interrupted, and ends as it would have without the interruption: the order of the examples is
/// replayed from the seed and dropout draws from a generator seeded per step.
pub fn train(
    base: &Base,
    lora: &Lora,
    examples: &[Example],
    settings: &Settings,
    checkpoint: Option<&std::path::Path>,
    cancelled: &(dyn Fn() -> bool + Sync),
    on_step: &mut (dyn FnMut(&StepRecord, usize) + Send),
) -> candle_core::Result<Vec<StepRecord>> {
    // On one of rayon's threads, where the matrix multiplies and elementwise loops run: from a
    // thread outside the pool each of them would be handed over to the pool while the caller
    // sleeps, thread switches thousands of times a step (the quickstart's training on 2 cores:
    // 45.1 → 39.2–42.7 s with gemm's AVX-512 kernels; README, Training).
    rayon::scope(|_| train_in_pool(base, lora, examples, settings, checkpoint, cancelled, on_step))
}

fn train_in_pool(
    base: &Base,
    lora: &Lora,
    examples: &[Example],
    settings: &Settings,
    checkpoint: Option<&std::path::Path>,
    cancelled: &dyn Fn() -> bool,
    on_step: &mut dyn FnMut(&StepRecord, usize),
) -> candle_core::Result<Vec<StepRecord>> {
    let mut optimizer = optimizer::AdamW::new(lora.vars())?;
    let total = steps(settings, examples.len());
    let mut records = match checkpoint {
        Some(path) if path.exists() => optimizer.load(path)?,
        _ => vec![],
    };
    for record in &records {
        on_step(record, total);
    }
    let resumed = records.len();
    let earlier_seconds = records.last().map_or(0.0, |r| r.seconds);
    let started = std::time::Instant::now();
    let mut saved = started;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let mut shuffle = StdRng::seed_from_u64(settings.seed);
    let mut step = 0;
    for epoch in 1..=settings.epochs {
        order.shuffle(&mut shuffle);
        for batch in order.chunks(settings.batch.max(1)) {
            step += 1;
            if step <= resumed {
                continue;
            }
            let mut dropout_rng = dropout_rng(settings.seed, step);
            // Gradients are summed over the batch's examples, each backward pass on its own
            // graph, so memory holds one example's activations at a time.
            let mut sums: Vec<Option<candle_core::Tensor>> = vec![None; optimizer.vars().len()];
            let mut last = None;
            let (mut loss_sum, mut tokens) = (0.0, 0);
            for &i in batch {
                if cancelled() {
                    if let Some(path) = checkpoint {
                        optimizer.save(path, &records)?;
                    }
                    candle_core::bail!("interrupted");
                }
                let example = &examples[i];
                let dropout = (settings.dropout > 0.0).then_some((settings.dropout, &mut dropout_rng));
                let loss = base.loss(&example.tokens, example.completion_start, Some(lora), dropout)?;
                loss_sum += f64::from(loss.to_scalar::<f32>()?);
                tokens += example.tokens.len() - example.completion_start;
                let grads = (loss / batch.len() as f64)?.backward()?;
                for (sum, var) in sums.iter_mut().zip(optimizer.vars()) {
                    if let Some(grad) = grads.get(var) {
                        *sum = Some(match sum.take() {
                            None => grad.clone(),
                            Some(s) => (s + grad)?,
                        });
                    }
                }
                last = Some(grads);
            }
            let Some(mut grads) = last else { continue };
            for (sum, var) in sums.into_iter().zip(optimizer.vars()) {
                if let Some(sum) = sum {
                    grads.insert(var, sum);
                }
            }
            let rate = learning_rate(settings, step - 1, total);
            optimizer.step(&grads, rate)?;
            let record = StepRecord {
                step,
                epoch,
                loss: loss_sum / batch.len() as f64,
                learning_rate: rate,
                tokens,
                seconds: earlier_seconds + started.elapsed().as_secs_f64(),
            };
            on_step(&record, total);
            records.push(record);
            if let Some(path) = checkpoint
                && saved.elapsed() >= CHECKPOINT_INTERVAL
            {
                optimizer.save(path, &records)?;
                saved = std::time::Instant::now();
            }
        }
    }
    release_freed_memory();
    Ok(records)
}

/// The generator LoRA dropout draws from in step `step`: its own per (seed, step), so a resumed
/// training draws what the uninterrupted one would have.
fn dropout_rng(seed: u64, step: usize) -> StdRng {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&(step as u64).to_le_bytes());
    StdRng::from_seed(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_warms_up_then_decays_to_zero() {
        let settings = Settings { epochs: 1, learning_rate: 1.0, warmup: 0.2, batch: 1, dropout: 0.0, seed: 0 };
        let rates: Vec<f64> = (0..10).map(|s| learning_rate(&settings, s, 10)).collect();
        assert_eq!(rates[0], 0.5);
        assert_eq!(rates[1], 1.0);
        assert!(rates.windows(2).skip(2).all(|w| w[1] < w[0]));
        assert!(rates[9] > 0.0 && rates[9] <= 0.125);
    }

    #[test]
    fn precision_is_bf16_only_where_the_cpu_runs_it_and_says_so_where_it_cannot_be() {
        assert_eq!(Precision::F32.bf16(), Ok(false));
        assert_eq!(Precision::Auto.bf16(), Ok(amx::available()));
        match Precision::Bf16.bf16() {
            Ok(bf16) => assert!(bf16 && amx::available()),
            Err(message) => assert!(!amx::available() && message.contains("AMX") && message.contains("\"f32\"")),
        }
    }
}
