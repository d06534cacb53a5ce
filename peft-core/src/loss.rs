//! Training objectives, written with differentiable candle ops only.

use candle_core::{DType, Tensor, D};

use crate::error::{PeftError, Result};
use crate::layers::{DenseLinear, LinearLike};

/// The label value ignored by the loss (as in transformers).
pub use peft_kernels::loss::IGNORE_INDEX;

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
    // Validated on every path (a bad id would index out of range in the chain's gather).
    let t = target_ids(&targets, v)?;
    if !peft_kernels::fused_f32(&[&logits]) {
        return cross_entropy_chain(&logits, &targets);
    }
    let count = t.iter().filter(|&&x| x != IGNORE_INDEX).count();
    match peft_kernels::loss::cross_entropy(&logits, std::sync::Arc::new(t), count)? {
        Some(loss) => Ok((loss, count)),
        None => cross_entropy_chain(&logits, &targets),
    }
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

/// The op-chain version (log_softmax, gather, masked mean): the portable path, used off the
/// CPU and under `PEFT_KERNELS=portable`.
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
        peft_kernels::fused_f32(&[hidden])
            && peft_kernels::gemm::is_frozen_cpu_matrix(w)
            && bias.is_none_or(|x| peft_kernels::fused_f32(&[x]) && !x.track_op())
            && head.in_features() == h
    });
    let unfused = || -> Result<Tensor> {
        let logits = head.forward(hidden)?;
        let v = logits.dim(candle_core::D::Minus1)?;
        Ok(cross_entropy(&logits.reshape((n, v))?, targets)?.0)
    };
    let Some(dense) = fused else {
        return unfused();
    };
    let v = head.out_features();
    check_target_shape(targets, n)?;
    let ids = target_ids(targets, v)?;
    let rows: Vec<(usize, usize)> = ids
        .iter()
        .enumerate()
        .filter(|(_, &x)| x != IGNORE_INDEX)
        .map(|(i, &x)| (i, x as usize))
        .collect();
    let (weight, bias, transposed) = dense.parts();
    match peft_kernels::loss::head_cross_entropy(
        hidden,
        weight,
        bias,
        transposed,
        rows,
        (chunk_elems / v.max(1)).max(1),
        crate::grad::is_grad_enabled() && hidden.track_op(),
    )? {
        Some(loss) => Ok(loss),
        None => unfused(),
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
