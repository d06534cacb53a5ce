//! A minimal training API: batches for the three objectives (causal LM, sequence-to-sequence,
//! classification), one optimizer step, gradient checks and clipping. Use it with any candle-nn
//! optimizer (`AdamW`, `SGD`):
//!
//! ```ignore
//! let mut opt = candle_nn::AdamW::new_lr(model.trainable_vars(), 1e-3)?;
//! model.set_training(true);
//! let stats = peft_core::training::causal_lm_step(&model, &mut opt, &batch, None)?;
//! ```

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::Optimizer;

use crate::error::{PeftError, Result};
use crate::loss::{cross_entropy, IGNORE_INDEX};
use crate::model::ModelInputs;
use crate::peft_model::PeftModel;

/// One batch for causal-LM training.
#[derive(Debug, Clone)]
pub struct CausalLmBatch {
    /// Token ids `[B, T]`.
    pub input_ids: Tensor,
    /// Attention mask `[B, T]` (1 = token, 0 = padding).
    pub attention_mask: Option<Tensor>,
    /// Labels `[B, T]` (I64); `-100` is ignored.
    pub labels: Tensor,
}

impl CausalLmBatch {
    /// A batch whose labels are the inputs, with padding positions ignored.
    pub fn from_ids(input_ids: Tensor, attention_mask: Option<Tensor>) -> Result<Self> {
        let ids = input_ids.to_dtype(DType::I64)?;
        let labels = match &attention_mask {
            Some(mask) => {
                let keep = mask.to_dtype(DType::U8)?;
                let ignore = Tensor::full(IGNORE_INDEX, ids.shape(), ids.device())?;
                keep.where_cond(&ids, &ignore)?
            }
            None => ids.clone(),
        };
        Ok(CausalLmBatch {
            input_ids,
            attention_mask,
            labels,
        })
    }
}

/// A sequence-to-sequence batch: the decoder reads `labels` shifted right behind the model's
/// `decoder_start_token_id` and predicts `labels` (transformers' `shift_tokens_right`).
#[derive(Debug, Clone)]
pub struct Seq2SeqBatch {
    /// Encoder token ids `[B, S]`.
    pub input_ids: Tensor,
    /// Encoder attention mask `[B, S]`.
    pub attention_mask: Option<Tensor>,
    /// Target ids `[B, T]` (I64); `-100` is ignored.
    pub labels: Tensor,
}

/// A classification batch: one label per sequence (`SEQ_CLS`, `[B]`) or per token
/// (`TOKEN_CLS`, `[B, T]`, `-100` ignored).
#[derive(Debug, Clone)]
pub struct ClassificationBatch {
    /// Token ids `[B, T]`.
    pub input_ids: Tensor,
    /// Attention mask `[B, T]`.
    pub attention_mask: Option<Tensor>,
    /// Labels (I64).
    pub labels: Tensor,
}

/// A batch for any of the supported objectives.
#[derive(Debug, Clone)]
pub enum Batch {
    /// Next-token prediction.
    CausalLm(CausalLmBatch),
    /// Encoder-decoder generation.
    Seq2Seq(Seq2SeqBatch),
    /// Sequence or token classification.
    Classification(ClassificationBatch),
}

/// The decoder inputs for `labels`: `[start, labels[:-1]]`, with `-100` replaced by `pad`.
pub fn shift_right(labels: &Tensor, start: u32, pad: u32) -> Result<Tensor> {
    let (b, t) = labels.dims2()?;
    let labels = labels.to_dtype(DType::I64)?;
    let pad_t = Tensor::full(i64::from(pad), (b, t), labels.device())?;
    let labels = labels.ne(IGNORE_INDEX)?.where_cond(&labels, &pad_t)?;
    let start = Tensor::full(i64::from(start), (b, 1), labels.device())?;
    Ok(Tensor::cat(&[&start, &labels.narrow(1, 0, t - 1)?], 1)?)
}

impl Batch {
    /// The loss of `model` on this batch (with the model's current train/eval mode).
    pub fn loss(&self, model: &PeftModel) -> Result<Tensor> {
        match self {
            Batch::CausalLm(b) => causal_lm_batch_loss(model, b),
            Batch::Seq2Seq(b) => model.seq2seq_loss(&seq2seq_inputs(model, b)?, &b.labels),
            Batch::Classification(b) => Ok(classification_loss(model, b)?.0),
        }
    }

    /// Targets that count toward the mean loss: predicted tokens after the causal shift, target
    /// tokens of a seq2seq batch, labelled sequences (or tokens) of a classification batch.
    /// Gradient accumulation weights micro-batches by it, as transformers' `Trainer` does.
    pub fn targets(&self) -> Result<usize> {
        let (labels, shift) = match self {
            Batch::CausalLm(b) => (&b.labels, true),
            Batch::Seq2Seq(b) => (&b.labels, false),
            Batch::Classification(b) => (&b.labels, false),
        };
        let labels = if shift {
            let t = labels.dim(1)?;
            if t < 2 {
                return Ok(0);
            }
            labels.narrow(1, 1, t - 1)?
        } else {
            labels.clone()
        };
        Ok(labels
            .to_dtype(DType::I64)?
            .ne(IGNORE_INDEX)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize)
    }

    /// Input tokens (padding excluded).
    pub fn input_tokens(&self) -> Result<u64> {
        let (ids, mask) = match self {
            Batch::CausalLm(b) => (&b.input_ids, &b.attention_mask),
            Batch::Seq2Seq(b) => (&b.input_ids, &b.attention_mask),
            Batch::Classification(b) => (&b.input_ids, &b.attention_mask),
        };
        Ok(match mask {
            Some(m) => u64::from(m.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()?),
            None => ids.elem_count() as u64,
        })
    }
}

/// A seq2seq batch's model inputs: the decoder reads the labels shifted right behind the
/// model's `decoder_start_token_id`.
fn seq2seq_inputs(model: &PeftModel, b: &Seq2SeqBatch) -> Result<ModelInputs> {
    let info = model.base_model().info();
    let start = info.decoder_start_token_id.ok_or_else(|| {
        PeftError::bad_input(
            "seq2seq batch",
            "an encoder-decoder model",
            info.model_type.clone(),
        )
    })?;
    Ok(ModelInputs {
        input_ids: Some(b.input_ids.clone()),
        attention_mask: b.attention_mask.clone(),
        decoder_input_ids: Some(shift_right(&b.labels, start, 0)?),
        ..Default::default()
    })
}

/// The mean cross-entropy of a classification batch and the logits `[rows, classes]` it came
/// from (one row per sequence, or per token for token classification).
pub fn classification_loss(model: &PeftModel, b: &ClassificationBatch) -> Result<(Tensor, Tensor)> {
    let inputs = ModelInputs::from_ids(b.input_ids.clone()).with_mask(b.attention_mask.clone());
    let logits = model.forward(&inputs)?;
    let classes = logits.dim(logits.rank() - 1)?;
    let rows = logits.elem_count() / classes.max(1);
    let labels = b.labels.to_dtype(DType::I64)?.reshape(rows)?;
    let logits = logits.reshape((rows, classes))?;
    Ok((cross_entropy(&logits, &labels)?.0, logits))
}

/// Rows of `logits` `[rows, classes]` whose arg-max is the label (`-100` rows not counted),
/// and the rows counted.
pub fn correct_predictions(logits: &Tensor, labels: &Tensor) -> Result<(usize, usize)> {
    let predicted = logits
        .argmax(candle_core::D::Minus1)?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    let labels = labels
        .to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1::<i64>()?;
    let counted = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    let correct = predicted
        .iter()
        .zip(&labels)
        .filter(|(p, l)| p == l)
        .count();
    Ok((correct, counted))
}

/// One optimizer step on any batch: forward, loss, backward, optional clipping, update.
pub fn train_step<O: Optimizer>(
    model: &PeftModel,
    optimizer: &mut O,
    batch: &Batch,
    max_grad_norm: Option<f32>,
) -> Result<StepStats> {
    step_on_loss(model, optimizer, batch.loss(model)?, max_grad_norm)
}

fn step_on_loss<O: Optimizer>(
    model: &PeftModel,
    optimizer: &mut O,
    loss: Tensor,
    max_grad_norm: Option<f32>,
) -> Result<StepStats> {
    let loss_value = loss.to_scalar::<f32>()?;
    let mut grads = crate::recompute::backward(&loss)?;
    let vars = model.trainable_vars();
    let grad_norm = match max_grad_norm {
        Some(max) => clip_grad_norm(&mut grads, &vars, max)?,
        None => grad_norm(&grads, &vars)?,
    };
    optimizer.step(&grads)?;
    Ok(StepStats {
        loss: loss_value,
        grad_norm,
    })
}

/// What one training step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The loss before the update.
    pub loss: f32,
    /// The global gradient norm before clipping.
    pub grad_norm: f32,
}

/// The causal-LM loss of `model` on `batch` (with the model's current train/eval mode).
pub fn causal_lm_batch_loss(model: &PeftModel, batch: &CausalLmBatch) -> Result<Tensor> {
    let inputs =
        ModelInputs::from_ids(batch.input_ids.clone()).with_mask(batch.attention_mask.clone());
    model.causal_lm_loss(&inputs, &batch.labels)
}

/// Checks that every trainable variable received a finite gradient and returns each one's L2
/// norm. A missing gradient means an op without a backward pass cut the graph: training would
/// run and learn nothing. (A zero gradient can be legitimate: LoRA's A while B is still zero.)
pub fn check_gradients(grads: &GradStore, vars: &[(String, Var)]) -> Result<Vec<(String, f32)>> {
    let mut norms = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let Some(g) = grads.get(var.as_tensor()) else {
            return Err(PeftError::InvalidState(format!(
                "trainable parameter `{name}` received no gradient: an op on its path has no backward pass"
            )));
        };
        let norm = g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?
            .sqrt();
        if !norm.is_finite() {
            return Err(PeftError::InvalidState(format!(
                "gradient of `{name}` is not finite"
            )));
        }
        norms.push((name.clone(), norm));
    }
    Ok(norms)
}

/// The global L2 norm of a set of gradients (accumulated in f64).
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a Tensor>) -> Result<f32> {
    let mut total = 0.0f64;
    for g in grads {
        total += f64::from(
            g.to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()?,
        );
    }
    Ok(total.sqrt() as f32)
}

/// The factor that brings gradients of global norm `norm` down to `max_norm` (torch's
/// `clip_grad_norm_`), or `None` when no clipping applies (within the bound, or not finite).
pub fn clip_scale(norm: f32, max_norm: f32) -> Option<f64> {
    (norm > max_norm && norm.is_finite()).then(|| f64::from(max_norm / (norm + 1e-6)))
}

/// Dynamic loss scaling for f16 compute, as torch's `GradScaler` does it: the loss is
/// multiplied by [`LossScaler::scale`] before the backward pass (so small f16 gradients do not
/// flush to zero), the gradients divided by it after; a step whose gradients are not finite is
/// skipped and the scale halved; after `growth_interval` finite steps in a row it doubles. The
/// adapter's weights (and so the optimizer's state) stay f32 throughout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaler {
    /// The factor applied to the loss now (torch's `init_scale` 65536 to start).
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good_steps: u32,
    /// Steps between growths (torch: 2000).
    pub growth_interval: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            good_steps: 0,
            growth_interval: 2000,
        }
    }
}

impl LossScaler {
    /// A scaler where the compute dtype needs one (f16; bf16 has f32's range), else `None`.
    pub fn for_dtype(dtype: DType) -> Option<Self> {
        (dtype == DType::F16).then(Self::default)
    }

    /// Records a step whose unscaled gradients were `finite` or not; returns whether the
    /// optimizer step applies (torch's `scaler.step` then `scaler.update`).
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale *= 0.5;
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

/// The global L2 norm of the gradients of `vars`.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f32> {
    global_norm(vars.iter().filter_map(|v| grads.get(v.as_tensor())))
}

/// Scales all gradients so their global norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f32) -> Result<f32> {
    let norm = grad_norm(grads, vars)?;
    if let Some(scale) = clip_scale(norm, max_norm) {
        for var in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// One optimizer step on a causal-LM `batch`: forward, loss, backward, optional clipping, update.
/// `vars` must be the variables the optimizer was built with (`model.trainable_vars()`).
pub fn causal_lm_step<O: Optimizer>(
    model: &PeftModel,
    optimizer: &mut O,
    batch: &CausalLmBatch,
    max_grad_norm: Option<f32>,
) -> Result<StepStats> {
    step_on_loss(
        model,
        optimizer,
        causal_lm_batch_loss(model, batch)?,
        max_grad_norm,
    )
}

#[cfg(test)]
mod loss_scaler_tests {
    use super::*;

    #[test]
    fn the_scale_backs_off_on_overflow_and_grows_after_a_run_of_good_steps() {
        assert_eq!(LossScaler::for_dtype(DType::BF16), None);
        assert_eq!(LossScaler::for_dtype(DType::F32), None);
        let mut s = LossScaler::for_dtype(DType::F16).unwrap();
        assert_eq!(s.scale, 65536.0);
        assert!(!s.update(false));
        assert_eq!(s.scale, 32768.0);
        s.growth_interval = 3;
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        assert!(s.update(true));
        assert!(!s.update(false));
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
    }
}
