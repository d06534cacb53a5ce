//! Training objectives, written with differentiable candle ops only.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::error::{PeftError, Result};

/// The label value ignored by the loss (as in transformers).
pub const IGNORE_INDEX: i64 = -100;

/// Mean token cross-entropy of `logits [N, V]` against `targets [N]` (I64, `-100` ignored),
/// computed in f32. Returns `(loss, counted_tokens)`; with no counted token the loss is 0.
///
/// On the CPU this is one fused op with its own backward: the forward takes each row's
/// log-sum-exp in one pass and never writes log-probabilities; the backward writes
/// `(softmax - onehot) / count` straight into the one gradient tensor. (The chain of generic
/// ops it replaces held four more `[N, V]` tensors; with a 32k vocabulary those are the largest
/// allocations of a training step.) Other devices use the differentiable op chain.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, usize)> {
    let (n, v) = logits.dims2()?;
    if targets.dims() != [n] {
        return Err(PeftError::bad_input(
            "cross_entropy targets",
            format!("shape [{n}]"),
            format!("{:?}", targets.dims()),
        ));
    }
    let logits = logits.to_dtype(DType::F32)?;
    let targets = targets.to_dtype(DType::I64)?;
    if !logits.device().is_cpu() {
        return cross_entropy_chain(&logits, &targets);
    }
    let t: Vec<i64> = targets.to_vec1()?;
    if let Some(bad) = t.iter().find(|&&x| x != IGNORE_INDEX && (x < 0 || x as usize >= v)) {
        return Err(PeftError::bad_input(
            "cross_entropy targets",
            format!("class ids in 0..{v} or {IGNORE_INDEX}"),
            bad.to_string(),
        ));
    }
    let count = t.iter().filter(|&&x| x != IGNORE_INDEX).count();
    let op = FusedCrossEntropy {
        targets: std::sync::Arc::new(t),
        count,
    };
    Ok((logits.contiguous()?.apply_op1(op)?, count))
}

/// The op-chain version (log_softmax, gather, masked mean), used off the CPU.
fn cross_entropy_chain(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, usize)> {
    let keep = targets.ne(IGNORE_INDEX)?;
    let count = keep.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
    let safe_targets = keep
        .where_cond(targets, &targets.zeros_like()?)?
        .to_dtype(DType::U32)?;
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = log_probs
        .gather(&safe_targets.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    let masked = (picked * keep.to_dtype(DType::F32)?)?;
    let loss = (masked.sum_all()?.neg()? / (count.max(1) as f64))?;
    Ok((loss, count))
}

/// Fused cross-entropy over contiguous f32 `[N, V]` logits (see [`cross_entropy`]).
struct FusedCrossEntropy {
    targets: std::sync::Arc<Vec<i64>>,
    count: usize,
}

impl CustomOp1 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::layers::cpu_f32_slice(storage, layout, self.name())?;
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

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let scale = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()? / self.count.max(1) as f32;
        let op = FusedCrossEntropyGrad {
            targets: std::sync::Arc::clone(&self.targets),
            scale,
        };
        Ok(Some(arg.apply_op1_no_bwd(&op)?))
    }
}

/// The gradient of [`FusedCrossEntropy`]: `scale * (softmax(row) - onehot(target))`, zero
/// rows for ignored targets.
struct FusedCrossEntropyGrad {
    targets: std::sync::Arc<Vec<i64>>,
    scale: f32,
}

impl CustomOp1 for FusedCrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::layers::cpu_f32_slice(storage, layout, self.name())?;
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

/// transformers' causal-LM loss: logits `[B, T, V]` predict labels `[B, T]` shifted left by
/// one; positions labelled `-100` are ignored; the mean is over counted tokens.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if labels.dims() != [b, t] {
        return Err(PeftError::bad_input(
            "causal_lm_loss labels",
            format!("shape [{b}, {t}]"),
            format!("{:?}", labels.dims()),
        ));
    }
    if t < 2 {
        return Ok(Tensor::zeros((), DType::F32, logits.device())?);
    }
    // Row (b, i) of the logits predicts labels[b, i + 1]; the last position of each row
    // predicts nothing. Shifting the labels (not the logits) avoids copying [B, T-1, V].
    let labels = labels.to_dtype(DType::I64)?;
    let ignore = Tensor::full(IGNORE_INDEX, (b, 1), labels.device())?;
    let shifted_labels = Tensor::cat(&[&labels.narrow(1, 1, t - 1)?, &ignore], 1)?.reshape(b * t)?;
    Ok(cross_entropy(&logits.reshape((b * t, v))?, &shifted_labels)?.0)
}

#[cfg(test)]
mod fused_tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op and the op chain agree on the loss and on the gradient, ignored rows
    /// included.
    #[test]
    fn fused_cross_entropy_equals_the_op_chain() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (6, 37), &dev)?))?;
        let targets = Tensor::new(&[3i64, -100, 0, 36, 5, -100], &dev)?;
        let (fused, n1) = cross_entropy(x.as_tensor(), &targets)?;
        let (chain, n2) = cross_entropy_chain(x.as_tensor(), &targets)?;
        assert_eq!((n1, n2), (4, 4));
        let (a, b) = (fused.to_scalar::<f32>()?, chain.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let ga = (fused * 2.0)?.backward()?;
        let gb = (chain * 2.0)?.backward()?;
        let (ga, gb) = (ga.get(x.as_tensor()).expect("grad"), gb.get(x.as_tensor()).expect("grad"));
        let d = (ga - gb)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "gradients differ by {d}");
        let err = cross_entropy(x.as_tensor(), &Tensor::new(&[37i64, 0, 0, 0, 0, 0], &dev)?)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("0..37") && err.contains("37"), "{err}");
        Ok(())
    }
}
