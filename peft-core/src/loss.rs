//! Training objectives, written with differentiable candle ops only.

use candle_core::{DType, Tensor, D};

use crate::error::{PeftError, Result};

/// The label value ignored by the loss (as in transformers).
pub const IGNORE_INDEX: i64 = -100;

/// Mean token cross-entropy of `logits [N, V]` against `targets [N]` (I64, `-100` ignored),
/// computed in f32. Returns `(loss, counted_tokens)`; with no counted token the loss is 0.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, usize)> {
    let (n, _v) = logits.dims2()?;
    if targets.dims() != [n] {
        return Err(PeftError::bad_input(
            "cross_entropy targets",
            format!("shape [{n}]"),
            format!("{:?}", targets.dims()),
        ));
    }
    let logits = logits.to_dtype(DType::F32)?;
    let targets = targets.to_dtype(DType::I64)?;
    let keep = targets.ne(IGNORE_INDEX)?;
    let count = keep.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
    let safe_targets = keep
        .where_cond(&targets, &targets.zeros_like()?)?
        .to_dtype(DType::U32)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
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
    let shifted_logits = logits
        .narrow(1, 0, t - 1)?
        .contiguous()?
        .reshape((b * (t - 1), v))?;
    let shifted_labels = labels
        .narrow(1, 1, t - 1)?
        .contiguous()?
        .reshape(b * (t - 1))?;
    Ok(cross_entropy(&shifted_logits, &shifted_labels)?.0)
}
