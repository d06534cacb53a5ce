//! Greedy decoding with a KV cache: the prompt is processed once (with any prompt-learning
//! adapter's virtual tokens or prefix), then one token per step.

use candle_core::{DType, Tensor, D};

use crate::error::{PeftError, Result};
use crate::model::ModelInputs;
use crate::peft_model::PeftModel;

/// Greedily extends `prompt` by up to `max_new_tokens` tokens, stopping after any token in
/// `stop_tokens`. Returns only the new tokens.
pub fn greedy_generate(model: &PeftModel, prompt: &[u32], max_new_tokens: usize, stop_tokens: &[u32]) -> Result<Vec<u32>> {
    greedy_generate_with(model, prompt, max_new_tokens, stop_tokens, &mut |_| Ok(()))
}

/// [`greedy_generate`], calling `on_token` with each new token as soon as it is chosen (for
/// streaming output).
pub fn greedy_generate_with(
    model: &PeftModel,
    prompt: &[u32],
    max_new_tokens: usize,
    stop_tokens: &[u32],
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(PeftError::bad_input("generate", "a non-empty prompt", "no tokens"));
    }
    let device = model.base_model().device().clone();
    let mut cache = model.new_cache();
    let mut next_input = Tensor::new(prompt, &device)?.unsqueeze(0)?;
    let mut out = Vec::with_capacity(max_new_tokens);
    for _ in 0..max_new_tokens {
        let logits = model.forward_with_cache(&ModelInputs::from_ids(next_input), &mut cache)?;
        let t = logits.dim(1)?;
        let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?.squeeze(0)?.to_dtype(DType::F32)?;
        let token = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
        out.push(token);
        on_token(token)?;
        if stop_tokens.contains(&token) {
            break;
        }
        next_input = Tensor::new(&[token], &device)?.unsqueeze(0)?;
    }
    Ok(out)
}

/// Greedy decoding for an encoder-decoder: the encoder reads `input_ids [1, S]` (with an
/// optional mask) once; the decoder starts from the model's `decoder_start_token_id` and adds
/// one token per step. Returns the new tokens (the start token excluded).
pub fn greedy_generate_seq2seq(
    model: &PeftModel,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    max_new_tokens: usize,
    stop_tokens: &[u32],
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let info = model.base_model().info();
    let start = info.decoder_start_token_id.ok_or_else(|| {
        PeftError::bad_input("generate", "an encoder-decoder model", format!("model_type `{}`", info.model_type))
    })?;
    let device = model.base_model().device().clone();
    let mut cache = model.new_cache();
    let mut next = start;
    let mut out = Vec::with_capacity(max_new_tokens);
    for _ in 0..max_new_tokens {
        let inputs = ModelInputs {
            input_ids: Some(input_ids.clone()),
            attention_mask: attention_mask.cloned(),
            decoder_input_ids: Some(Tensor::new(&[[next]], &device)?),
            ..Default::default()
        };
        let logits = model.forward_with_cache(&inputs, &mut cache)?;
        let t = logits.dim(1)?;
        let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?.squeeze(0)?.to_dtype(DType::F32)?;
        next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
        out.push(next);
        on_token(next)?;
        if stop_tokens.contains(&next) {
            break;
        }
    }
    Ok(out)
}
