//! Training objectives, written with differentiable candle ops only.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::error::{PeftError, Result};
use crate::layers::{DenseLinear, LinearLike};

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
    check_target_shape(targets, n)?;
    let logits = logits.to_dtype(DType::F32)?;
    let targets = targets.to_dtype(DType::I64)?;
    if !logits.device().is_cpu() {
        return cross_entropy_chain(&logits, &targets);
    }
    let t = target_ids(&targets, v)?;
    let count = t.iter().filter(|&&x| x != IGNORE_INDEX).count();
    let op = FusedCrossEntropy {
        targets: std::sync::Arc::new(t),
        count,
    };
    Ok((logits.contiguous()?.apply_op1(op)?, count))
}

/// Cross-entropy targets must be one per row: `[n]`.
fn check_target_shape(targets: &Tensor, n: usize) -> Result<()> {
    if targets.dims() != [n] {
        return Err(PeftError::bad_input(
            "cross_entropy targets",
            format!("shape [{n}]"),
            format!("{:?}", targets.dims()),
        ));
    }
    Ok(())
}

/// The targets as I64 class ids, each in `0..v` or [`IGNORE_INDEX`].
fn target_ids(targets: &Tensor, v: usize) -> Result<Vec<i64>> {
    let t: Vec<i64> = targets.to_dtype(DType::I64)?.to_vec1()?;
    if let Some(bad) = t
        .iter()
        .find(|&&x| x != IGNORE_INDEX && (x < 0 || x as usize >= v))
    {
        return Err(PeftError::bad_input(
            "cross_entropy targets",
            format!("class ids in 0..{v} or {IGNORE_INDEX}"),
            bad.to_string(),
        ));
    }
    Ok(t)
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

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
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

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
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

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
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
    check_labels(labels, b, t)?;
    // Shifting the labels (not the logits) avoids copying [B, T-1, V].
    Ok(cross_entropy(&logits.reshape((b * t, v))?, &causal_lm_targets(labels)?)?.0)
}

/// Causal-LM labels must be `[B, T]`, as the logits (or hidden states) are.
pub(crate) fn check_labels(labels: &Tensor, b: usize, t: usize) -> Result<()> {
    if labels.dims() != [b, t] {
        return Err(PeftError::bad_input(
            "causal_lm_loss labels",
            format!("shape [{b}, {t}]"),
            format!("{:?}", labels.dims()),
        ));
    }
    Ok(())
}

/// The targets of causal-LM logits `[B, T, V]` (as `[B * T, V]` rows): `labels [B, T]` shifted
/// left by one, I64, the last position of each row ignored (row `(b, i)` predicts
/// `labels[b, i + 1]`).
pub fn causal_lm_targets(labels: &Tensor) -> Result<Tensor> {
    let (b, t) = labels.dims2()?;
    if t < 2 {
        return Ok(Tensor::full(IGNORE_INDEX, b * t, labels.device())?);
    }
    let labels = labels.to_dtype(DType::I64)?;
    let ignore = Tensor::full(IGNORE_INDEX, (b, 1), labels.device())?;
    Ok(Tensor::cat(&[&labels.narrow(1, 1, t - 1)?, &ignore], 1)?.reshape(b * t)?)
}

/// [`causal_lm_loss`] of `head(hidden)` for final hidden states `hidden [B, T, H]` and an
/// output head (`lm_head`): [`head_cross_entropy`] against the shifted labels.
pub fn head_causal_lm_loss(
    hidden: &Tensor,
    head: &dyn LinearLike,
    labels: &Tensor,
) -> Result<Tensor> {
    let (b, t, _) = hidden.dims3()?;
    check_labels(labels, b, t)?;
    head_cross_entropy(hidden, head, &causal_lm_targets(labels)?)
}

/// Mean token cross-entropy of `head(hidden)` against `targets [N]` (I64, `-100` ignored), for
/// hidden states `[.., H]` of `N` rows, without the `[N, V]` logits where it can: for a frozen
/// dense head on the CPU in f32 (weights f32 or bf16, bias or none), one op takes the counted
/// rows a chunk at a time (about 32 MB of logits), and while training also writes the gradient
/// of `hidden` then, so that no chunk is computed twice; what it keeps for the backward is that
/// `[.., H]` gradient. The same products and log-sum-exp as logits then [`cross_entropy`]. Rows
/// whose target is ignored (padding, each sequence's last position, prompts) are never
/// multiplied by the head. Any other head (an adapted `lm_head`, a trainable one, another
/// device or dtype) goes through `head.forward` and [`cross_entropy`].
pub fn head_cross_entropy(
    hidden: &Tensor,
    head: &dyn LinearLike,
    targets: &Tensor,
) -> Result<Tensor> {
    head_cross_entropy_in_chunks(hidden, head, targets, HEAD_CHUNK_ELEMS)
}

/// Logits computed at a time by [`head_cross_entropy`] (8M f32, 32 MB).
const HEAD_CHUNK_ELEMS: usize = 1 << 23;

fn head_cross_entropy_in_chunks(
    hidden: &Tensor,
    head: &dyn LinearLike,
    targets: &Tensor,
    chunk_elems: usize,
) -> Result<Tensor> {
    let h = hidden.dim(candle_core::D::Minus1)?;
    let n = hidden.elem_count() / h.max(1);
    let fused = head.as_any().downcast_ref::<DenseLinear>().filter(|d| {
        let (w, bias, _) = d.parts();
        let cpu_f32 = |x: &Tensor| x.device().is_cpu() && x.dtype() == DType::F32;
        cpu_f32(hidden)
            && w.device().is_cpu()
            && matches!(w.dtype(), DType::F32 | DType::BF16)
            && !w.track_op()
            && bias.is_none_or(|x| cpu_f32(x) && !x.track_op())
            && head.in_features() == h
    });
    let Some(dense) = fused else {
        let logits = head.forward(hidden)?;
        let v = logits.dim(candle_core::D::Minus1)?;
        return Ok(cross_entropy(&logits.reshape((n, v))?, targets)?.0);
    };
    let v = head.out_features();
    check_target_shape(targets, n)?;
    let targets = target_ids(targets, v)?;
    let rows: Vec<(usize, usize)> = targets
        .iter()
        .enumerate()
        .filter(|(_, &x)| x != IGNORE_INDEX)
        .map(|(i, &x)| (i, x as usize))
        .collect();
    let (weight, bias, transposed) = dense.parts();
    let op = HeadCrossEntropy {
        weight: weight.contiguous()?,
        bias: bias.cloned(),
        transposed,
        rows,
        chunk_rows: (chunk_elems / v.max(1)).max(1),
        with_grad: crate::grad::is_grad_enabled() && hidden.track_op(),
        grad: std::sync::Mutex::new(None),
    };
    Ok(hidden.contiguous()?.apply_op1(op)?)
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
    grad: std::sync::Mutex<Option<Tensor>>,
}

impl HeadCrossEntropy {
    /// The loss, and (when `want_grad`) the gradient with respect to `x` (`[N, H]` flat).
    fn pass(&self, x: &[f32], want_grad: bool) -> candle_core::Result<(f32, Option<Vec<f32>>)> {
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
            crate::layers::frozen_product(
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
                crate::layers::frozen_product(
                    &self.weight,
                    !self.transposed,
                    z,
                    m,
                    dx,
                    false,
                    name,
                )?;
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

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::layers::cpu_f32_slice(storage, layout, self.name())?;
        let (loss, grad) = self.pass(x, self.with_grad)?;
        if let Some(g) = grad {
            let g = Tensor::from_vec(g, layout.shape(), &candle_core::Device::Cpu)?;
            *self.grad.lock().map_err(|_| {
                candle_core::Error::Msg("head-cross-entropy: poisoned lock".into())
            })? = Some(g);
        }
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
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
                let g = crate::layers::with_f32s([arg], self.name(), |[x]| self.pass(x, true))?.1;
                Tensor::from_vec(g.unwrap_or_default(), arg.shape(), arg.device())?
            }
        };
        Ok(Some(grad.affine(scale, 0.0)?))
    }
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
        let (ga, gb) = (
            ga.get(x.as_tensor()).expect("grad"),
            gb.get(x.as_tensor()).expect("grad"),
        );
        let d = (ga - gb)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "gradients differ by {d}");
        let err = cross_entropy(x.as_tensor(), &Tensor::new(&[37i64, 0, 0, 0, 0, 0], &dev)?)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("0..37") && err.contains("37"), "{err}");
        Ok(())
    }

    /// The fused head + loss equals the head's logits then [`causal_lm_loss`] (loss and the
    /// gradient of the hidden states, scaled upstream), for f32 and bf16 weights, `[in, out]`
    /// storage, a bias, ignored labels, one row per chunk up to all rows in one; under
    /// `no_grad`, and for a backward the forward did not prepare.
    #[test]
    fn head_loss_equals_logits_then_loss() -> Result<()> {
        use crate::layers::DenseLinear;
        let dev = Device::Cpu;
        let (b, t, h, v) = (2, 7, 12, 40);
        let hidden = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h), &dev)?)?;
        let w = Tensor::randn(0f32, 0.5, (v, h), &dev)?;
        let bias = Tensor::randn(0f32, 0.5, v, &dev)?;
        let labels = Tensor::new(
            &[
                [3i64, -100, 0, 39, 5, 7, 1],
                [-100, -100, 2, 8, 9, 10, -100],
            ],
            &dev,
        )?;
        let heads: Vec<(&str, DenseLinear)> = vec![
            ("f32", DenseLinear::new(w.clone(), None)?),
            ("bias", DenseLinear::new(w.clone(), Some(bias.clone()))?),
            (
                "transposed",
                DenseLinear::new_transposed(w.t()?.contiguous()?, Some(bias))?,
            ),
            ("bf16", DenseLinear::new(w.to_dtype(DType::BF16)?, None)?),
        ];
        for (what, head) in &heads {
            let chain = causal_lm_loss(&head.forward(hidden.as_tensor())?, &labels)?;
            let g_chain = (&chain * 3.0)?.backward()?;
            let g_chain = g_chain.get(hidden.as_tensor()).expect("grad");
            for chunk in [1, 3 * v, 1 << 23] {
                let fused = head_cross_entropy_in_chunks(
                    hidden.as_tensor(),
                    head,
                    &causal_lm_targets(&labels)?,
                    chunk,
                )?;
                let (a, c) = (fused.to_scalar::<f32>()?, chain.to_scalar::<f32>()?);
                assert!((a - c).abs() < 1e-5, "{what} chunk {chunk}: {a} vs {c}");
                let g = (fused * 3.0)?.backward()?;
                let d = (g.get(hidden.as_tensor()).expect("grad") - g_chain)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?;
                assert!(
                    d.to_scalar::<f32>()? < 1e-6,
                    "{what} chunk {chunk}: gradients differ by {d}"
                );
            }
            let lazy = {
                let _g = crate::grad::no_grad();
                head_cross_entropy_in_chunks(
                    hidden.as_tensor(),
                    head,
                    &causal_lm_targets(&labels)?,
                    3 * v,
                )?
            };
            assert!(
                (lazy.to_scalar::<f32>()? - chain.to_scalar::<f32>()?).abs() < 1e-5,
                "{what} no_grad"
            );
            let g = (lazy * 3.0)?.backward()?;
            let d = (g.get(hidden.as_tensor()).expect("grad") - g_chain)?
                .abs()?
                .flatten_all()?
                .max(0)?;
            assert!(
                d.to_scalar::<f32>()? < 1e-6,
                "{what}: recomputed gradients differ by {d}"
            );
        }
        // A trainable head goes through the logits and gets its gradient.
        let wv = Var::from_tensor(&w)?;
        let head = DenseLinear::new(wv.as_tensor().clone(), None)?;
        let loss = head_causal_lm_loss(hidden.as_tensor(), &head, &labels)?;
        assert!(
            loss.backward()?.get(wv.as_tensor()).is_some(),
            "the head's weight got no gradient"
        );
        // Nothing counted: zero loss, zero gradient.
        let none = Tensor::full(IGNORE_INDEX, (b, t), &dev)?;
        let zero = head_causal_lm_loss(hidden.as_tensor(), &heads[0].1, &none)?;
        assert_eq!(zero.to_scalar::<f32>()?, 0.0);
        let g = zero.backward()?;
        let g = g.get(hidden.as_tensor()).expect("grad").abs()?.sum_all()?;
        assert_eq!(g.to_scalar::<f32>()?, 0.0);
        // Bad input names what was expected.
        let err = head_causal_lm_loss(
            hidden.as_tensor(),
            &heads[0].1,
            &Tensor::new(&[[0i64; 7], [0, 0, 40, 0, 0, 0, 0]], &dev)?,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("0..40") && err.contains("40"), "{err}");
        let err = head_causal_lm_loss(
            hidden.as_tensor(),
            &heads[0].1,
            &Tensor::zeros((b, t + 1), DType::I64, &dev)?,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("[2, 7]") && err.contains("[2, 8]"), "{err}");
        Ok(())
    }
}
