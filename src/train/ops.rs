//! Differentiable building blocks. candle's fused `rms_norm`, `softmax_last_dim`, `rope` and
//! quantized matmul pass no gradient back (silently), so the forward pass is written with ops
//! that do. The big ones are single ops with their own backward pass: a composed form keeps
//! every intermediate tensor alive until the backward pass (several times the activations'
//! memory), where one op keeps its inputs and output and computes what else it needs again.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, Device, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::amx;
use crate::numeric::{exp_nonpositive, log_sum_exp};

/// The values of an op's input: contiguous f32.
fn values<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let (Some((start, end)), CpuStorage::F32(values)) = (layout.contiguous_offsets(), storage) else {
        candle_core::bail!("training ops take contiguous f32 tensors")
    };
    Ok(&values[start..end])
}

/// `storage` under `layout` as a tensor outside any graph (a copy).
fn detached(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    Tensor::from_slice(values(storage, layout)?, layout.shape(), &Device::Cpu)
}

/// Calls `f` with the values of `tensors`, tensors of the backward pass (made contiguous where
/// they are not).
fn with_values<const N: usize, R>(tensors: [&Tensor; N], f: impl FnOnce([&[f32]; N]) -> Result<R>) -> Result<R> {
    let contiguous = tensors.iter().map(|t| t.contiguous()).collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = contiguous.iter().map(Tensor::storage_and_layout).collect();
    let slices = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            Storage::Cpu(storage) => values(storage, layout),
            _ => candle_core::bail!("training runs on the CPU"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(slices.try_into().map_err(|_| candle_core::Error::Msg("one slice per tensor".into()))?)
}

/// The owned values of a result just computed (its storage, not a copy).
fn into_values(storage: CpuStorage) -> Result<Vec<f32>> {
    match storage {
        CpuStorage::F32(values) => Ok(values),
        _ => candle_core::bail!("training computes in f32"),
    }
}

/// Fewest elements a thread takes in an elementwise loop. The loops run on rayon's threads,
/// which are the matrix multiplies' and idle between them: a single-threaded pass over a
/// (tokens, 4,864) tensor costs about what the multiply that made it does.
pub(super) const CHUNK: usize = 1 << 14;

/// `f` of `a` and `b`, element by element, on rayon's threads.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    a.par_iter().zip(b).with_min_len(CHUNK).map(|(&a, &b)| f(a, b)).collect()
}

/// `into[i] += from[i]`, on rayon's threads.
fn add_into(into: &mut [f32], from: &Tensor) -> Result<()> {
    with_values([from], |[from]| {
        into.par_iter_mut().zip(from).with_min_len(CHUNK).for_each(|(v, &u)| *v += u);
        Ok(())
    })
}

/// A tensor's values as an op's output.
fn output(t: &Tensor) -> Result<(CpuStorage, Shape)> {
    Ok((CpuStorage::F32(t.flatten_all()?.to_vec1::<f32>()?), t.shape().clone()))
}

/// (tokens, heads · d) as (heads, tokens, d), contiguous.
fn split_heads(t: &Tensor, d: usize) -> Result<Tensor> {
    let (n, width) = t.dims2()?;
    t.reshape((n, width / d, d))?.transpose(0, 1)?.contiguous()
}

/// (heads, tokens, d) as (tokens, heads · d), contiguous.
fn merge_heads(t: &Tensor) -> Result<Tensor> {
    let (heads, n, d) = t.dims3()?;
    t.transpose(0, 1)?.contiguous()?.reshape((n, heads * d))
}

/// A frozen weight `W` (n_out, n_in): in f32, or rounded to bf16 and laid out for AMX's tiles
/// ([`amx`]), once for each product training takes (`x @ Wᵀ` forward, `grad @ W` backward: the
/// same memory as the f32 weight).
#[derive(Clone)]
pub enum Weight {
    F32(Tensor),
    Bf16(Arc<Bf16Weight>),
}

pub struct Bf16Weight {
    forward: amx::Packed,
    backward: amx::Packed,
}

impl Weight {
    /// `w` (n_out, n_in) in bf16 where asked and its sides fit AMX's tiles whole (every
    /// projection of the Qwen2.5 and Llama models); in f32 otherwise.
    pub fn new(w: Tensor, bf16: bool) -> Result<Weight> {
        if !bf16 {
            return Ok(Weight::F32(w));
        }
        let (n_out, n_in) = w.dims2()?;
        let packed = with_values([&w], |[values]| {
            Ok(amx::Packed::transposed(values, n_out, n_in).zip(amx::Packed::plain(values, n_out, n_in)))
        })?;
        Ok(match packed {
            Some((forward, backward)) => Weight::Bf16(Arc::new(Bf16Weight { forward, backward })),
            None => Weight::F32(w),
        })
    }

    /// (n_out, n_in).
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Weight::F32(w) => w.dims2(),
            Weight::Bf16(w) => Ok((w.backward.depth(), w.backward.columns())),
        }
    }

    /// `x @ Wᵀ` for an op's input `x` (m, n_in), as values the caller owns.
    fn times_transposed(&self, x: &CpuStorage, x_layout: &Layout) -> Result<Vec<f32>> {
        match self {
            Weight::F32(w) => times_transposed(x, x_layout, w),
            Weight::Bf16(w) => amx::matmul(values(x, x_layout)?, x_layout.shape().dims2()?.0, &w.forward),
        }
    }

    /// `grad @ W`, the input's gradient, as values the caller owns.
    fn input_gradient(&self, grad: &Tensor) -> Result<Vec<f32>> {
        match self {
            Weight::F32(w) => frozen_input_gradient(grad, w),
            Weight::Bf16(w) => with_values([grad], |[g]| amx::matmul(g, grad.dim(0)?, &w.backward)),
        }
    }
}

/// `x @ Wᵀ + b` for a frozen `W` (n_out, n_in) and bias `b`. Through `Tensor::matmul` the
/// backward pass would also compute `W`'s gradient, a full matmul per projection that nothing
/// uses; this op returns the input's gradient only.
struct Frozen {
    weight: Weight,
    bias: Option<Vec<f32>>,
}

impl CustomOp1 for Frozen {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n) = (x_layout.shape().dims2()?.0, self.weight.dims()?.0);
        let mut out = self.weight.times_transposed(x, x_layout)?;
        if let Some(bias) = &self.bias {
            for row in out.chunks_mut(n) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(Tensor::from_vec(self.weight.input_gradient(grad)?, x.shape(), &Device::Cpu)?))
    }
}

/// `x @ Wᵀ` for an op's input `x` (m, k) and a weight `W` (n, k), as values the caller owns.
///
/// gemm copies its left operand into its kernel's layout on every call, and for a row-major
/// result it takes `W` as that operand: a projection with more outputs than the sequence has
/// tokens would copy its whole weight matrix for a product of a few rows. There the product is
/// computed column by column instead (`x` copied, `W` read where it lies) and transposed back:
/// the MLP's down projection at 220 tokens 10.7 → 6.7 ms on an Intel Xeon (README, Training).
fn times_transposed(x: &CpuStorage, x_layout: &Layout, weight: &Tensor) -> Result<Vec<f32>> {
    let ((m, k), n) = (x_layout.shape().dims2()?, weight.dim(0)?);
    if n <= m {
        let transposed = weight.t()?;
        let (w, w_layout) = transposed.storage_and_layout();
        let Storage::Cpu(w) = &*w else { candle_core::bail!("training runs on the CPU") };
        return into_values(x.matmul(w, (1, m, n, k), x_layout, w_layout)?);
    }
    let x = values(x, x_layout)?;
    with_values([weight], |[w]| {
        if x.len() != m * k || w.len() != n * k {
            candle_core::bail!("times_transposed: ({m}, {k}) @ ({n}, {k})ᵀ with {} and {} values", x.len(), w.len())
        }
        let mut columns = vec![0f32; m * n];
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        // SAFETY: the lengths were checked above against the shapes the strides describe:
        // `columns` (m, n) column-major, `x` (m, k) row-major, `Wᵀ` (k, n) column-major.
        unsafe {
            #[rustfmt::skip]
            gemm::gemm(
                m, n, k,
                columns.as_mut_ptr(), m as isize, 1, false,
                x.as_ptr(), 1, k as isize,
                w.as_ptr(), k as isize, 1,
                0.0, 1.0, false, false, false, parallelism,
            );
        }
        Ok(transpose(&columns, n, m))
    })
}

/// `t` (rows, cols), row-major, transposed, in square blocks on rayon's threads.
fn transpose(t: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const BLOCK: usize = 16;
    let mut out = vec![0f32; t.len()];
    out.par_chunks_mut(rows * BLOCK).enumerate().for_each(|(block, chunk)| {
        let first = block * BLOCK;
        for r0 in (0..rows).step_by(BLOCK) {
            for (c, row) in chunk.chunks_mut(rows).enumerate() {
                for r in r0..(r0 + BLOCK).min(rows) {
                    row[r] = t[r * cols + first + c];
                }
            }
        }
    });
    out
}

/// `grad @ W`, the input's gradient through a frozen `W` (n_out, n_in), as values the caller owns.
fn frozen_input_gradient(grad: &Tensor, weight: &Tensor) -> Result<Vec<f32>> {
    let grad = grad.contiguous()?;
    let ((m, n_out), n_in) = (grad.dims2()?, weight.dim(1)?);
    let (g, g_layout) = grad.storage_and_layout();
    let (w, w_layout) = weight.storage_and_layout();
    let (Storage::Cpu(g), Storage::Cpu(w)) = (&*g, &*w) else { candle_core::bail!("training runs on the CPU") };
    into_values(g.matmul(w, (1, m, n_in, n_out), g_layout, w_layout)?)
}

impl Frozen {
    fn new(weight: &Weight, bias: Option<&Tensor>) -> Result<Frozen> {
        Ok(Frozen { weight: weight.clone(), bias: bias.map(|b| b.to_vec1::<f32>()).transpose()? })
    }
}

/// `x @ Wᵀ + b` where `W` and `b` never train; `x` is (tokens, n_in).
pub fn frozen_linear(x: &Tensor, weight: &Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Frozen::new(weight, bias)?)
}

/// `x @ Wᵀ + b + s · ((x ⊙ m) @ Aᵀ) @ Bᵀ`: a frozen projection with its LoRA update (A, B
/// train; m is the dropout mask) as one op. Composed, the graph would keep three
/// (tokens, n_out) tensors per projection (frozen output, update, sum); this keeps the output,
/// and the backward pass computes the rank-sized `(x ⊙ m) @ Aᵀ` again.
struct LoraLinear {
    frozen: Frozen,
    scale: f64,
    mask: Option<Tensor>,
}

impl LoraLinear {
    fn masked(&self, x: &Tensor) -> Result<Tensor> {
        match &self.mask {
            Some(mask) => x * mask,
            None => Ok(x.clone()),
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, shape) = self.frozen.cpu_fwd(x, x_layout)?;
        let mut out = into_values(out)?;
        let (a, b) = (detached(a, a_layout)?, detached(b, b_layout)?);
        let low = match &self.mask {
            Some(mask) => (detached(x, x_layout)? * mask)?.matmul(&a.t()?)?,
            None => {
                let m = x_layout.shape().dims2()?.0;
                Tensor::from_vec(times_transposed(x, x_layout, &a)?, (m, a.dim(0)?), &Device::Cpu)?
            }
        };
        add_into(&mut out, &low.matmul(&(b * self.scale)?.t()?)?)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b, grad) = (a.detach(), b.detach(), grad.detach());
        let input = self.masked(&x.detach())?;
        let low = input.matmul(&a.t()?)?;
        let grad_low = (grad.matmul(&b)? * self.scale)?;
        let mut dx = self.frozen.weight.input_gradient(&grad)?;
        add_into(&mut dx, &self.masked(&grad_low.matmul(&a)?)?)?;
        let dx = Tensor::from_vec(dx, x.shape(), &Device::Cpu)?;
        let da = grad_low.t()?.matmul(&input)?;
        let db = (grad.t()?.matmul(&low)? * self.scale)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x @ Wᵀ + b` plus the LoRA update `scale · ((x ⊙ mask) @ Aᵀ) @ Bᵀ`; `x` is (tokens, n_in),
/// A (rank, n_in), B (n_out, rank).
pub fn lora_linear(
    x: &Tensor,
    weight: &Weight,
    bias: Option<&Tensor>,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    mask: Option<Tensor>,
) -> Result<Tensor> {
    let op = LoraLinear { frozen: Frozen::new(weight, bias)?, scale, mask };
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// RMS normalisation over the last dimension, times a frozen `weight`:
/// `y = x · r · w` with `r = 1 / sqrt(mean(x²) + eps)`, so `dx = r · gw − x · r³ · mean(gw · x)`
/// where `gw = dy · w`.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn inverse_rms(&self, x: &Tensor) -> Result<Tensor> {
        (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = detached(x, layout)?;
        output(&x.broadcast_mul(&self.inverse_rms(&x)?)?.broadcast_mul(&self.weight)?)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (x, grad) = (x.detach(), grad.detach());
        let r = self.inverse_rms(&x)?;
        let gw = grad.broadcast_mul(&self.weight)?;
        let projection = (&gw * &x)?.mean_keepdim(D::Minus1)?.broadcast_mul(&r.powf(3.0)?)?;
        Ok(Some((gw.broadcast_mul(&r)? - x.broadcast_mul(&projection)?)?))
    }
}

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(RmsNorm { weight: weight.clone(), eps })
}

/// Causal self-attention `softmax(q kᵀ · scale + causal mask) v` for q (m, heads · d) and k, v
/// (n, kv_heads · d), each key/value head serving heads / kv_heads query heads; the output is
/// (m, heads · d), as the projections give and take it. The queries are m of the n positions,
/// which the mask's m rows say (all n, or a run of them). The backward pass computes the
/// attention weights again rather than keeping four (heads, n, n) tensors per layer (60 MB at
/// n = 512) until it runs. The heads are split and merged inside the op: as graph nodes, each
/// reshape and copy would cost the backward pass two more passes over its gradient.
struct Attention {
    head_dim: usize,
    scale: f64,
    /// (m, n): 0 where a query sees a key, -inf where it does not.
    mask: Tensor,
}

impl Attention {
    /// A key or value tensor for every query head.
    fn expand(t: &Tensor, heads: usize) -> Result<Tensor> {
        let (kv_heads, n, d) = t.dims3()?;
        if kv_heads == heads {
            return Ok(t.clone());
        }
        t.unsqueeze(1)?.broadcast_as((kv_heads, heads / kv_heads, n, d))?.reshape((heads, n, d))
    }

    /// The attention weights (heads, n, n).
    fn weights(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let scores = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(&self.mask)?;
        candle_nn::ops::softmax_last_dim(&scores)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let split = |storage, layout| split_heads(&detached(storage, layout)?, self.head_dim);
        let (q, k, v) = (split(q, q_layout)?, split(k, k_layout)?, split(v, v_layout)?);
        let heads = q.dim(0)?;
        output(&merge_heads(&self.weights(&q, &Self::expand(&k, heads)?)?.matmul(&Self::expand(&v, heads)?)?)?)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let split = |t: &Tensor| split_heads(&t.detach(), self.head_dim);
        let (q, grad, k, v) = (split(q)?, split(grad)?, split(k)?, split(v)?);
        let (heads, kv_heads) = (q.dim(0)?, k.dim(0)?);
        let (k, v) = (Self::expand(&k, heads)?, Self::expand(&v, heads)?);
        let p = self.weights(&q, &k)?;
        let dv = p.t()?.matmul(&grad)?;
        let dp = grad.matmul(&v.t()?)?;
        // Softmax: ds = p · (dp − Σ dp · p), then the scale.
        let sums = (&dp * &p)?.sum_keepdim(D::Minus1)?;
        let n = p.dim(2)?;
        let scale = self.scale as f32;
        let ds = with_values([&p, &dp, &sums], |[p, dp, sums]| {
            let mut ds = vec![0f32; p.len()];
            ds.par_chunks_mut(n).zip(p.par_chunks(n)).zip(dp.par_chunks(n)).zip(sums).for_each(
                |(((ds, p), dp), &sum)| {
                    for ((d, &p), &dp) in ds.iter_mut().zip(p).zip(dp) {
                        // `+ 0.0` as candle's scaling by `affine` adds it: the same bits.
                        *d = p * (dp - sum) * scale + 0.0;
                    }
                },
            );
            Ok(ds)
        })?;
        let ds = Tensor::from_vec(ds, p.shape(), &Device::Cpu)?;
        let dq = ds.matmul(&k)?;
        let dk = ds.t()?.matmul(&q)?;
        // A key/value head's gradient sums those of the query heads it served.
        let fold = |t: Tensor| -> Result<Tensor> {
            let (_, n, d) = t.dims3()?;
            t.reshape((kv_heads, heads / kv_heads, n, d))?.sum(1)
        };
        Ok((Some(merge_heads(&dq)?), Some(merge_heads(&fold(dk)?)?), Some(merge_heads(&fold(dv)?)?)))
    }
}

/// The causal mask for `n` tokens, (n, n): 0 on and below the diagonal, -inf above.
pub fn causal_mask(n: usize) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n * n).map(|i| if i % n > i / n { f32::NEG_INFINITY } else { 0.0 }).collect();
    Tensor::from_vec(mask, (n, n), &Device::Cpu)
}

/// Causal self-attention of q (m, heads · head_dim) over k, v (n, kv_heads · head_dim), scaled
/// by `scale`; `mask` is the rows of [`causal_mask`] for n tokens at the m queries' positions.
/// Returns (m, heads · head_dim).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    head_dim: usize,
    scale: f64,
    mask: &Tensor,
) -> Result<Tensor> {
    let op = Attention { head_dim, scale, mask: mask.clone() };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// SwiGLU, `silu(gate) · up`, as one op: `d_up = dy · silu(gate)` and
/// `d_gate = dy · up · σ(gate) · (1 + gate · (1 − σ(gate)))`.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    // Both passes compute what candle's `silu`, `sigmoid` and elementwise ops would, in the
    // same order (so to the bit), in one loop over the elements.
    fn cpu_fwd(&self, gate: &CpuStorage, g: &Layout, up: &CpuStorage, u: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = zip_map(values(gate, g)?, values(up, u)?, |g, u| g / (1.0 + (-g).exp()) * u);
        Ok((CpuStorage::F32(out), g.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (mut d_gate, mut d_up) = (vec![], vec![]);
        with_values([gate, up, grad], |[g, u, dy]| {
            g.par_iter()
                .zip(u)
                .zip(dy)
                .with_min_len(CHUNK)
                .map(|((&g, &u), &dy)| {
                    let sigmoid = ((-g).exp() + 1.0).recip();
                    let slope = sigmoid * ((g * (1.0 - sigmoid)) + 1.0);
                    (dy * u * slope, dy * (g * sigmoid))
                })
                .unzip_into_vecs(&mut d_gate, &mut d_up);
            Ok(())
        })?;
        let tensor = |values| Tensor::from_vec(values, gate.shape(), &Device::Cpu);
        Ok((Some(tensor(d_gate)?), Some(tensor(d_up)?)))
    }
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// Mean cross-entropy of logits (rows, vocabulary) against `targets`, as one op: the backward
/// pass is (softmax − one-hot) / rows from the log-sum-exp of each row the forward pass kept,
/// where the composed form keeps three more tensors the size of the logits.
struct CrossEntropy {
    targets: Vec<u32>,
    log_sums: Mutex<Vec<f64>>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, logits: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (Some((start, end)), CpuStorage::F32(values)) = (layout.contiguous_offsets(), logits) else {
            candle_core::bail!("cross-entropy takes contiguous f32 logits")
        };
        let (rows, vocabulary) = layout.shape().dims2()?;
        if self.targets.len() != rows || self.targets.iter().any(|&t| t as usize >= vocabulary) {
            candle_core::bail!("cross-entropy needs one target in the vocabulary per row");
        }
        let log_sums: Vec<f64> = values[start..end].chunks(vocabulary).map(log_sum_exp).collect();
        let total: f64 = values[start..end]
            .chunks(vocabulary)
            .zip(&self.targets)
            .zip(&log_sums)
            .map(|((row, &target), log_sum)| log_sum - f64::from(row[target as usize]))
            .sum();
        *self.log_sums.lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))? = log_sums;
        Ok((CpuStorage::F32(vec![(total / rows.max(1) as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocabulary) = logits.dims2()?;
        let scale = grad.to_scalar::<f32>()? / rows.max(1) as f32;
        let log_sums = self.log_sums.lock().map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        let logits = logits.contiguous()?;
        let (storage, layout) = logits.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) = (&*storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("cross-entropy takes f32 logits on the CPU")
        };
        let mut d = Vec::with_capacity(rows * vocabulary);
        for ((row, &log_sum), &target) in values[start..end].chunks(vocabulary).zip(log_sums.iter()).zip(&self.targets)
        {
            let offset = d.len();
            let log_sum = log_sum as f32;
            d.extend(row.iter().map(|&x| exp_nonpositive(x - log_sum) * scale));
            d[offset + target as usize] -= scale;
        }
        Ok(Some(Tensor::from_vec(d, (rows, vocabulary), &Device::Cpu)?))
    }
}

/// Mean cross-entropy of `logits` (rows, vocabulary) against `targets`, one per row.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(CrossEntropy { targets: targets.to_vec(), log_sums: Mutex::default() })
}

/// Rotates `x` (heads, tokens, head_dim) by the angles whose `cos`/`sin` are given
/// (tokens, head_dim / 2). `neox` rotates the two halves of a head (qwen2); otherwise
/// neighbouring pairs (llama's GGUF layout).
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, neox: bool) -> Result<Tensor> {
    let (heads, tokens, dim) = x.dims3()?;
    let half = dim / 2;
    let (x1, x2) = if neox {
        (x.narrow(2, 0, half)?, x.narrow(2, half, half)?)
    } else {
        let pairs = x.reshape((heads, tokens, half, 2))?;
        (pairs.narrow(3, 0, 1)?.squeeze(3)?, pairs.narrow(3, 1, 1)?.squeeze(3)?)
    };
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x1.broadcast_mul(sin)? + x2.broadcast_mul(cos)?)?;
    if neox { Tensor::cat(&[r1, r2], 2) } else { Tensor::stack(&[r1, r2], 3)?.reshape((heads, tokens, dim)) }
}

/// Rotary position embedding, as one op: a rotation, whose backward pass is the rotation by
/// the opposite angles. It takes and gives (tokens, heads · head_dim), the projections' layout.
struct Rope {
    head_dim: usize,
    cos: Tensor,
    sin: Tensor,
    neox: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = split_heads(&detached(x, layout)?, self.head_dim)?;
        output(&merge_heads(&rotate(&x, &self.cos, &self.sin, self.neox)?)?)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = split_heads(&grad.detach(), self.head_dim)?;
        Ok(Some(merge_heads(&rotate(&grad, &self.cos, &self.sin.neg()?, self.neox)?)?))
    }
}

/// Rotary position embedding of `x` (tokens, heads · head_dim) with the angles' `cos`/`sin`
/// (tokens, head_dim / 2); `neox` as in [`rotate`].
pub fn rope(x: &Tensor, head_dim: usize, cos: &Tensor, sin: &Tensor, neox: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope { head_dim, cos: cos.clone(), sin: sin.clone(), neox })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    fn random(shape: &[usize]) -> Var {
        Var::randn(0f32, 1., shape, &Device::Cpu).unwrap()
    }

    /// Checks that `op` computes what `composed` (plain candle ops) computes, and passes back the
    /// same gradients to every input, under a random weighting of the output.
    fn agree(inputs: &[Var], op: impl Fn(&[Tensor]) -> Result<Tensor>, composed: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (ours, theirs) = (op(&tensors).unwrap(), composed(&tensors).unwrap());
        assert!(close(&ours, &theirs) < 1e-5, "forward differs by {}", close(&ours, &theirs));
        let weights = Tensor::randn(0f32, 1., ours.shape(), &Device::Cpu).unwrap();
        let by_op = (ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let by_parts = (theirs * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, input) in inputs.iter().enumerate() {
            let (a, b) = (by_op.get(input).unwrap(), by_parts.get(input).unwrap());
            assert!(close(a, b) < 1e-4, "input {i}: gradients differ by {}", close(a, b));
        }
    }

    #[test]
    fn frozen_linear_matches_matmul_and_passes_the_input_gradient() {
        // Fewer outputs than rows, and more (computed column by column, over several blocks of
        // the transposition).
        for outputs in [3, 37] {
            let w = Tensor::randn(0f32, 1., (outputs, 7), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, 1., outputs, &Device::Cpu).unwrap();
            agree(
                &[random(&[21, 7])],
                |t| frozen_linear(&t[0], &Weight::F32(w.clone()), Some(&b)),
                |t| t[0].matmul(&w.t()?)?.broadcast_add(&b),
            );
        }
    }

    #[test]
    fn rms_norm_matches_candle_and_the_composed_gradient() {
        let w = Tensor::randn(0f32, 1., 8, &Device::Cpu).unwrap();
        let x = random(&[4, 8]);
        let fused = candle_nn::ops::rms_norm(x.as_tensor(), &w, 1e-6).unwrap();
        assert!(close(&rms_norm(x.as_tensor(), &w, 1e-6).unwrap(), &fused) < 1e-5);
        agree(
            &[x],
            |t| rms_norm(&t[0], &w, 1e-6),
            |t| {
                let scale = (t[0].sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?.recip()?;
                t[0].broadcast_mul(&scale)?.broadcast_mul(&w)
            },
        );
    }

    #[test]
    fn rope_matches_candle_and_the_composed_gradient() {
        // Two heads of 8 over 4 tokens, in the projections' layout (tokens, heads · 8).
        let x = random(&[4, 16]);
        let cos = Tensor::randn(0f32, 1., (4, 4), &Device::Cpu).unwrap();
        let sin = Tensor::randn(0f32, 1., (4, 4), &Device::Cpu).unwrap();
        let batch = split_heads(x.as_tensor(), 8).unwrap().unsqueeze(0).unwrap();
        let ours = |neox| split_heads(&rope(x.as_tensor(), 8, &cos, &sin, neox).unwrap(), 8).unwrap();
        let neox = candle_nn::rotary_emb::rope(&batch, &cos, &sin).unwrap().squeeze(0).unwrap();
        assert!(close(&ours(true), &neox) < 1e-5);
        let pairs = candle_nn::rotary_emb::rope_i(&batch, &cos, &sin).unwrap().squeeze(0).unwrap();
        assert!(close(&ours(false), &pairs) < 1e-5);
        // A rotation: the gradient check needs real angles.
        let angles = Tensor::randn(0f32, 1., (4, 4), &Device::Cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        for neox in [true, false] {
            agree(
                std::slice::from_ref(&x),
                |t| rope(&t[0], 8, &cos, &sin, neox),
                |t| merge_heads(&rotate(&split_heads(&t[0], 8)?, &cos, &sin, neox)?),
            );
        }
    }

    #[test]
    fn attention_matches_the_composed_form_with_grouped_heads() {
        let (heads, kv_heads, n, d) = (4, 2, 5, 8);
        let scale = 1.0 / (d as f64).sqrt();
        // All n positions as queries, and the last two alone.
        for queries in [n, 2] {
            let mask = causal_mask(n).unwrap().narrow(0, n - queries, queries).unwrap();
            // Composed on (heads, tokens, d), as the attention is usually written.
            let composed = |t: &[Tensor]| -> Result<Tensor> {
                let split = |x: &Tensor| x.reshape((x.dim(0)?, x.dim(1)? / d, d))?.transpose(0, 1);
                let repeat = |x: &Tensor| {
                    split(x)?.unsqueeze(1)?.broadcast_as((kv_heads, heads / kv_heads, n, d))?.reshape((heads, n, d))
                };
                let scores = (split(&t[0])?.matmul(&repeat(&t[1])?.t()?)? * scale)?.broadcast_add(&mask)?;
                let max = scores.max_keepdim(D::Minus1)?.detach();
                let e = scores.broadcast_sub(&max)?.exp()?;
                let out = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.matmul(&repeat(&t[2])?)?;
                out.transpose(0, 1)?.reshape((queries, heads * d))
            };
            let inputs = [random(&[queries, heads * d]), random(&[n, kv_heads * d]), random(&[n, kv_heads * d])];
            agree(&inputs, |t| causal_attention(&t[0], &t[1], &t[2], d, scale, &mask), composed);
        }
    }

    #[test]
    fn swiglu_matches_the_composed_form() {
        agree(&[random(&[3, 6]), random(&[3, 6])], |t| swiglu(&t[0], &t[1]), |t| t[0].silu()? * &t[1]);
    }

    #[test]
    fn cross_entropy_matches_candle_nn() {
        let targets = [1u32, 0, 10, 5];
        let target_tensor = Tensor::new(&targets, &Device::Cpu).unwrap();
        let logits = Var::randn(0f32, 3., (4, 11), &Device::Cpu).unwrap();
        agree(&[logits], |t| cross_entropy(&t[0], &targets), |t| candle_nn::loss::cross_entropy(&t[0], &target_tensor));
        assert!(
            cross_entropy(&Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap(), &[0, 3]).is_err()
        );
    }

    #[test]
    fn lora_linear_matches_the_composed_form_with_and_without_dropout() {
        let w = Tensor::randn(0f32, 1., (6, 7), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 1., 6, &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[2f32, 0., 2., 2., 0., 2., 2.]; 5], &Device::Cpu).unwrap();
        for mask in [None, Some(mask)] {
            let inputs = [random(&[5, 7]), random(&[3, 7]), random(&[6, 3])];
            let composed = |t: &[Tensor]| -> Result<Tensor> {
                let input = match &mask {
                    Some(m) => (&t[0] * m)?,
                    None => t[0].clone(),
                };
                let update = (input.matmul(&t[1].t()?)?.matmul(&t[2].t()?)? * 2.0)?;
                t[0].matmul(&w.t()?)?.broadcast_add(&bias)? + update
            };
            let weight = Weight::F32(w.clone());
            agree(&inputs, |t| lora_linear(&t[0], &weight, Some(&bias), (&t[1], &t[2]), 2.0, mask.clone()), composed);
        }
    }

    #[test]
    fn bf16_weights_give_the_f32_outputs_and_gradients_within_rounding() {
        if !amx::available() {
            eprintln!("skipped: this CPU has no AMX");
            return;
        }
        let w = Tensor::randn(0f32, 1., (64, 96), &Device::Cpu).unwrap();
        let bf16 = Weight::new(w.clone(), true).unwrap();
        assert!(matches!(bf16, Weight::Bf16(_)) && bf16.dims().unwrap() == (64, 96));
        // Sides that are not whole tiles stay in f32.
        let odd = Tensor::randn(0f32, 1., (6, 7), &Device::Cpu).unwrap();
        assert!(matches!(Weight::new(odd, true).unwrap(), Weight::F32(_)));
        let (x, a, b) = (random(&[21, 96]), random(&[4, 96]), random(&[64, 4]));
        let outputs = |weight: &Weight| {
            let y = lora_linear(x.as_tensor(), weight, None, (a.as_tensor(), b.as_tensor()), 2.0, None).unwrap();
            let y = frozen_linear(&y.matmul(&w).unwrap(), weight, None).unwrap();
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            [y, grads.get(&x).unwrap().clone(), grads.get(&a).unwrap().clone()]
        };
        for (ours, exact) in outputs(&bf16).iter().zip(outputs(&Weight::F32(w.clone()))) {
            let scale = exact.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(close(ours, &exact) < 0.02 * scale, "differs by {} at a scale of {scale}", close(ours, &exact));
        }
    }
}
