//! A minimal training API: a causal-LM batch, one optimizer step with a gradient check, and
//! gradient clipping. Use it with any candle-nn optimizer (`AdamW`, `SGD`):
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
use crate::loss::{causal_lm_loss, IGNORE_INDEX};
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
        Ok(CausalLmBatch { input_ids, attention_mask, labels })
    }
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
    let inputs = ModelInputs::from_ids(batch.input_ids.clone()).with_mask(batch.attention_mask.clone());
    let logits = model.forward(&inputs)?;
    // Prompt tuning and p-tuning add virtual positions to the logits; peft prepends -100 labels.
    let virtual_tokens = model.virtual_tokens_in_output();
    let labels = if virtual_tokens > 0 {
        let (b, _) = batch.labels.dims2()?;
        let ignore = Tensor::full(IGNORE_INDEX, (b, virtual_tokens), batch.labels.device())?;
        Tensor::cat(&[&ignore, &batch.labels.to_dtype(DType::I64)?], 1)?
    } else {
        batch.labels.clone()
    };
    causal_lm_loss(&logits, &labels)
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
        let norm = g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        if !norm.is_finite() {
            return Err(PeftError::InvalidState(format!("gradient of `{name}` is not finite")));
        }
        norms.push((name.clone(), norm));
    }
    Ok(norms)
}

/// The global L2 norm of the gradients of `vars`.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f32> {
    let mut total = 0.0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            total += f64::from(g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    Ok(total.sqrt() as f32)
}

/// Scales all gradients so their global norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f32) -> Result<f32> {
    let norm = grad_norm(grads, vars)?;
    if norm > max_norm && norm.is_finite() {
        let scale = f64::from(max_norm / (norm + 1e-6));
        for var in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// One optimizer step on `batch`: forward, loss, backward, optional clipping, update.
/// `vars` must be the variables the optimizer was built with (`model.trainable_vars()`).
pub fn causal_lm_step<O: Optimizer>(
    model: &PeftModel,
    optimizer: &mut O,
    batch: &CausalLmBatch,
    max_grad_norm: Option<f32>,
) -> Result<StepStats> {
    let loss = causal_lm_batch_loss(model, batch)?;
    let loss_value = loss.to_scalar::<f32>()?;
    let mut grads = loss.backward()?;
    let vars = model.trainable_vars();
    let grad_norm = match max_grad_norm {
        Some(max) => clip_grad_norm(&mut grads, &vars, max)?,
        None => grad_norm(&grads, &vars)?,
    };
    optimizer.step(&grads)?;
    Ok(StepStats { loss: loss_value, grad_norm })
}
