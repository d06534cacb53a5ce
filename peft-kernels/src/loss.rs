//! The fused losses: token cross-entropy over `[N, V]` logits, and the output head +
//! cross-entropy that never holds the `[N, V]` logits. Both are one op with its own backward
//! on the CPU in f32; the callers (`peft_core::loss`) take the op chain elsewhere.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::gemm::frozen_product;
use crate::view::{cpu_f32_slice, with_f32s};

/// The label value ignored by the loss (as in transformers).
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy of contiguous-able f32 CPU `logits [N, V]` against `targets` (`N` class
/// ids in `0..V` or [`IGNORE_INDEX`], `count` of them not ignored), one fused op whose backward
/// writes `(softmax - onehot) / count` straight into the gradient. `None` where the fused
/// kernels do not apply (another device or dtype, the portable mode).
pub fn cross_entropy(
    logits: &Tensor,
    targets: Arc<Vec<i64>>,
    count: usize,
) -> Result<Option<Tensor>> {
    if !crate::cpu::fused_f32(&[logits]) || logits.rank() != 2 || logits.dim(0)? != targets.len() {
        return Ok(None);
    }
    let op = FusedCrossEntropy { targets, count };
    Ok(Some(logits.contiguous()?.apply_op1(op)?))
}

/// The mean over `rows` (`(row of hidden, target)`) of `logsumexp(z) - z[target]` with
/// `z = hidden[row] op(W) + bias` for a frozen head weight (`[V, H]`, or `[H, V]` when
/// `transposed`), f32 or bf16, and hidden states `[.., H]` f32 on the CPU, `chunk_rows` rows at
/// a time; with `with_grad` the forward also writes the gradient of `hidden`, kept for the
/// backward. `None` where the fused kernels do not apply.
pub fn head_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    transposed: bool,
    rows: Vec<(usize, usize)>,
    chunk_rows: usize,
    with_grad: bool,
) -> Result<Option<Tensor>> {
    let fits = crate::cpu::fused_f32(&[hidden])
        && crate::gemm::is_frozen_cpu_matrix(weight)
        && bias.is_none_or(|b| crate::cpu::fused_f32(&[b]) && !b.track_op());
    if !fits {
        return Ok(None);
    }
    let op = HeadCrossEntropy {
        weight: weight.contiguous()?,
        bias: bias.cloned(),
        transposed,
        rows,
        chunk_rows: chunk_rows.max(1),
        with_grad,
        grad: Mutex::new(None),
    };
    Ok(Some(hidden.contiguous()?.apply_op1(op)?))
}

/// Fused cross-entropy over contiguous f32 `[N, V]` logits (see [`cross_entropy`]).
struct FusedCrossEntropy {
    targets: Arc<Vec<i64>>,
    count: usize,
}

impl CustomOp1 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32_slice(storage, layout, self.name())?;
        let n = self.targets.len();
        let v = x.len().checked_div(n).unwrap_or(0);
        let total: f64 = x
            .par_chunks(v.max(1))
            .zip(self.targets.par_iter())
            .filter(|(_, &t)| t != IGNORE_INDEX)
            .map_init(Vec::new, |scratch: &mut Vec<f32>, (row, &t)| {
                scratch.clear();
                scratch.extend_from_slice(row);
                let (max, sum) = crate::vmath::exp_minus_max(scratch);
                f64::from(max + sum.ln() - row[t as usize])
            })
            .sum();
        let loss = (total / self.count.max(1) as f64) as f32;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let scale = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()? / self.count.max(1) as f32;
        let op = FusedCrossEntropyGrad {
            targets: Arc::clone(&self.targets),
            scale,
        };
        Ok(Some(arg.apply_op1_no_bwd(&op)?))
    }
}

/// The gradient of [`FusedCrossEntropy`]: `scale * (softmax(row) - onehot(target))`, zero
/// rows for ignored targets.
struct FusedCrossEntropyGrad {
    targets: Arc<Vec<i64>>,
    scale: f32,
}

impl CustomOp1 for FusedCrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32_slice(storage, layout, self.name())?;
        let n = self.targets.len();
        let v = x.len().checked_div(n).unwrap_or(0);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(v.max(1))
            .zip(x.par_chunks(v.max(1)))
            .zip(self.targets.par_iter())
            .for_each(|((g, row), &t)| {
                if t == IGNORE_INDEX {
                    return;
                }
                g.copy_from_slice(row);
                let (_, sum) = crate::vmath::exp_minus_max(g);
                let k = self.scale / sum;
                g.iter_mut().for_each(|o| *o *= k);
                g[t as usize] -= self.scale;
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// The fused head + cross-entropy of [`head_cross_entropy`]: the input is `hidden`, the loss
/// the mean over `rows` (`(row of hidden, target)`) of `logsumexp(z) - z[target]` with
/// `z = hidden[row] op(W) + bias`.
struct HeadCrossEntropy {
    weight: Tensor,
    bias: Option<Tensor>,
    transposed: bool,
    rows: Vec<(usize, usize)>,
    chunk_rows: usize,
    with_grad: bool,
    /// The gradient of the loss with respect to `hidden`, written by the forward when
    /// `with_grad`.
    grad: Mutex<Option<Tensor>>,
}

impl HeadCrossEntropy {
    /// The loss, and (when `want_grad`) the gradient with respect to `x` (`[N, H]` flat).
    fn pass(&self, x: &[f32], want_grad: bool) -> Result<(f32, Option<Vec<f32>>)> {
        let name = "head-cross-entropy";
        let (d0, d1) = self.weight.dims2()?;
        let (v, k) = if self.transposed { (d1, d0) } else { (d0, d1) };
        if !x.len().is_multiple_of(k.max(1)) {
            candle_core::bail!("{name}: hidden states of width {k} expected");
        }
        let count = self.rows.len();
        let mut grad = want_grad.then(|| vec![0f32; x.len()]);
        let c = self.chunk_rows.min(count.max(1));
        let mut xin = vec![0f32; c * k];
        let mut z = vec![0f32; c * v];
        let mut dx = if want_grad {
            vec![0f32; c * k]
        } else {
            Vec::new()
        };
        let inv_count = 1.0 / count.max(1) as f32;
        let bias = self.bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
        let mut total = 0f64;
        for chunk in self.rows.chunks(c) {
            let m = chunk.len();
            for (dst, &(r, _)) in xin.chunks_mut(k).zip(chunk) {
                dst.copy_from_slice(&x[r * k..(r + 1) * k]);
            }
            let z = &mut z[..m * v];
            frozen_product(
                &self.weight,
                self.transposed,
                &xin[..m * k],
                m,
                z,
                false,
                name,
            )?;
            total += z
                .par_chunks_mut(v)
                .zip(chunk.par_iter())
                .map(|(row, &(_, target))| {
                    if let Some(b) = &bias {
                        row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
                    }
                    let picked = row[target];
                    let (max, sum) = crate::vmath::exp_minus_max(row);
                    if want_grad {
                        let s = inv_count / sum;
                        row.iter_mut().for_each(|o| *o *= s);
                        row[target] -= inv_count;
                    }
                    f64::from(max + sum.ln() - picked)
                })
                .sum::<f64>();
            if let Some(grad) = grad.as_mut() {
                let dx = &mut dx[..m * k];
                frozen_product(&self.weight, !self.transposed, z, m, dx, false, name)?;
                for (src, &(r, _)) in dx.chunks(k).zip(chunk) {
                    grad[r * k..(r + 1) * k].copy_from_slice(src);
                }
            }
        }
        Ok(((total / count.max(1) as f64) as f32, grad))
    }
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32_slice(storage, layout, self.name())?;
        let (loss, grad) = self.pass(x, self.with_grad)?;
        if let Some(g) = grad {
            let g = Tensor::from_vec(g, layout.shape(), &candle_core::Device::Cpu)?;
            *self.grad.lock().map_err(|_| {
                candle_core::Error::Msg("head-cross-entropy: poisoned lock".into())
            })? = Some(g);
        }
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let scale = f64::from(grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        let stored = self
            .grad
            .lock()
            .map_err(|_| candle_core::Error::Msg("head-cross-entropy: poisoned lock".into()))?
            .clone();
        let grad = match stored {
            Some(g) => g,
            // The forward ran without a gradient (it did not expect a backward): compute it now.
            None => {
                let g = with_f32s([arg], self.name(), |[x]| self.pass(x, true))?.1;
                Tensor::from_vec(g.unwrap_or_default(), arg.shape(), arg.device())?
            }
        };
        Ok(Some(grad.affine(scale, 0.0)?))
    }
}
