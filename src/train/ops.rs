//! Differentiable building blocks. candle's fused `rms_norm`, `softmax_last_dim`, `rope` and
//! quantized matmul pass no gradient back (silently), so the forward pass is written with ops
//! that do; and a frozen weight gets its own op so that the backward pass computes only what
//! the LoRA matrices need.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, D, Layout, Result, Shape, Storage, Tensor};

/// `x @ Wᵀ` for a frozen `W` (n_out, n_in). Through `Tensor::matmul` the backward pass would
/// also compute `W`'s gradient, a full matmul per projection that nothing uses; this op
/// returns the input's gradient only.
struct Frozen {
    weight: Tensor,
}

impl CustomOp1 for Frozen {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let n = self.weight.dim(0)?;
        let transposed = self.weight.t()?;
        let (storage, w_layout) = transposed.storage_and_layout();
        let Storage::Cpu(w) = &*storage else { candle_core::bail!("frozen weights live on the CPU") };
        let out = x.matmul(w, (1, m, n, k), x_layout, w_layout)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// `x @ Wᵀ` where `W` never trains; `x` is (tokens, n_in).
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Frozen { weight: weight.clone() })
}

/// RMS normalisation over the last dimension, times `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&scale)?.broadcast_mul(weight)
}

/// Softmax over the last dimension, as one op: the backward pass needs only the output
/// (`dx = y * (dy - sum(dy * y))`), so the graph keeps two tensors of attention scores per
/// layer instead of the five a composed softmax keeps.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (Some((start, end)), CpuStorage::F32(values)) = (layout.contiguous_offsets(), x) else {
            candle_core::bail!("softmax takes a contiguous f32 tensor")
        };
        let width = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = values[start..end].to_vec();
        for row in out.chunks_mut(width) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            row.iter_mut().for_each(|v| *v /= sum);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * grad.broadcast_sub(&dot)?)?))
    }
}

pub fn softmax(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

/// Mean cross-entropy of `logits` (rows, vocabulary) against `targets` (rows, u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (log_sum - picked)?.mean_all()
}

/// Rotary position embedding of `x` (heads, tokens, head_dim) with angles' `cos`/`sin`
/// (tokens, head_dim / 2). `neox` rotates the two halves of a head (qwen2); otherwise
/// neighbouring pairs (llama's GGUF layout).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, neox: bool) -> Result<Tensor> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn frozen_linear_matches_matmul_and_passes_the_input_gradient() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (5, 7), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (3, 7), &dev).unwrap();
        let y = frozen_linear(x.as_tensor(), &w).unwrap();
        let expected = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        assert!(close(&y, &expected) < 1e-5);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let by_matmul = expected.sum_all().unwrap().backward().unwrap();
        assert!(close(grads.get(&x).unwrap(), by_matmul.get(&x).unwrap()) < 1e-5);
    }

    #[test]
    fn composed_ops_match_candles_fused_ones() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 4, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        assert!(close(&rms_norm(&x, &w, 1e-6).unwrap(), &candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap()) < 1e-5);
        assert!(close(&softmax(&x).unwrap(), &candle_nn::ops::softmax_last_dim(&x).unwrap()) < 1e-6);
        let cos = Tensor::randn(0f32, 1., (4, 4), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1., (4, 4), &dev).unwrap();
        let neox = candle_nn::rotary_emb::rope(&x.unsqueeze(0).unwrap(), &cos, &sin).unwrap().squeeze(0).unwrap();
        assert!(close(&rope(&x, &cos, &sin, true).unwrap(), &neox) < 1e-5);
        let pairs = candle_nn::rotary_emb::rope_i(&x.unsqueeze(0).unwrap(), &cos, &sin).unwrap().squeeze(0).unwrap();
        assert!(close(&rope(&x, &cos, &sin, false).unwrap(), &pairs) < 1e-5);
    }

    #[test]
    fn softmax_gradient_matches_the_composed_form() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 2., (3, 5, 7), &dev).unwrap();
        let weights = Tensor::randn(0f32, 1., (3, 5, 7), &dev).unwrap();
        let fused = softmax(x.as_tensor()).unwrap();
        let max = x.as_tensor().max_keepdim(D::Minus1).unwrap().detach();
        let e = x.as_tensor().broadcast_sub(&max).unwrap().exp().unwrap();
        let composed = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        assert!(close(&fused, &composed) < 1e-6);
        let by_op = (fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let by_parts = (composed * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(close(by_op.get(&x).unwrap(), by_parts.get(&x).unwrap()) < 1e-5);
    }

    #[test]
    fn cross_entropy_matches_candle_nn() {
        let dev = Device::Cpu;
        let logits = Tensor::randn(0f32, 3., (4, 11), &dev).unwrap();
        let targets = Tensor::new(&[1u32, 0, 10, 5], &dev).unwrap();
        let ours = cross_entropy(&logits, &targets).unwrap();
        let theirs = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        assert!(close(&ours, &theirs) < 1e-5);
    }
}
