//! Running a model with a prompt-learning adapter, as peft's `PeftModelForCausalLM.forward`
//! does: the attention mask gains `num_virtual_tokens` ones in front; prompt tuning and
//! p-tuning prepend virtual-token embeddings (so logits include their positions); prefix
//! tuning turns the encoder output into per-layer key/value prefixes that sit in the KV cache
//! before the first real token. With a cache, the prompt is injected on the first call only
//! and stays for every decoded token.

use candle_core::{DType, Tensor};

use crate::error::{PeftError, Result};
use crate::method::{PromptEncoder, PromptKind};
use crate::model::{AdaptableModel, KvCache, ModelInputs};

/// A prompt-learning adapter attached to a model.
#[derive(Debug)]
pub(crate) struct PromptState {
    pub(crate) encoder: Box<dyn PromptEncoder>,
    pub(crate) kind: PromptKind,
    pub(crate) num_virtual_tokens: usize,
}

/// Per-layer `(key, value)` prefixes `[batch, heads, nvt, head_dim]` from peft's flat layout
/// `[nvt, num_layers * 2 * heads * head_dim]` (peft's `get_prompt` view and permute).
///
/// With two transformer submodules peft concatenates the `2L` key/value slots with themselves
/// and splits the result in groups of four (self key, self value, cross key, cross value); the
/// decoder's self-attention of layer `i` thus receives slots `4i mod 2L` and `4i + 1 mod 2L`.
/// That is reproduced here so that checkpoints behave as in peft.
pub fn prefix_key_values(
    flat: &Tensor,
    batch: usize,
    num_layers: usize,
    num_heads: usize,
    head_dim: usize,
    submodules: usize,
    dtype: DType,
) -> Result<Vec<(Tensor, Tensor)>> {
    let (nvt, width) = flat.dims2()?;
    if width != num_layers * 2 * num_heads * head_dim {
        return Err(PeftError::bad_input(
            "prefix encoder output",
            format!(
                "width num_layers * 2 * heads * head_dim = {}",
                num_layers * 2 * num_heads * head_dim
            ),
            width.to_string(),
        ));
    }
    let per = flat
        .to_dtype(dtype)?
        .reshape((nvt, num_layers * 2, num_heads, head_dim))?
        .permute((1, 2, 0, 3))?;
    let expand = |t: Tensor| -> Result<Tensor> {
        Ok(t.unsqueeze(0)?
            .broadcast_as((batch, num_heads, nvt, head_dim))?
            .contiguous()?)
    };
    let slots = 2 * num_layers;
    let (stride, wrap) = if submodules == 2 {
        (4, slots)
    } else {
        (2, usize::MAX)
    };
    (0..num_layers)
        .map(|i| {
            let k = (stride * i) % wrap;
            Ok((expand(per.get(k)?)?, expand(per.get((k + 1) % wrap)?)?))
        })
        .collect()
}

fn with_leading_ones(mask: &Tensor, n: usize) -> Result<Tensor> {
    let (batch, _) = mask.dims2()?;
    let ones = Tensor::ones((batch, n), mask.dtype(), mask.device())?;
    Ok(Tensor::cat(&[&ones, mask], 1)?)
}

/// Runs `base` on `inputs` with the prompt of `prompt` applied. For an encoder-decoder, as in
/// peft's `PeftModelForSeq2SeqLM`: prompt tuning and p-tuning prepend the first
/// `num_virtual_tokens` rows to the encoder input (its mask gains ones); prefix tuning fills the
/// decoder's self-attention cache (the decoder mask gains ones). With `targets`, returns the
/// base model's token loss against them ([`AdaptableModel::token_loss`]) instead of its logits.
pub(crate) fn forward_with_prompt(
    base: &dyn AdaptableModel,
    prompt: &PromptState,
    inputs: &ModelInputs,
    cache: Option<&mut KvCache>,
    training: bool,
    targets: Option<&Tensor>,
) -> Result<Tensor> {
    let (batch, _) = inputs.batch_and_len()?;
    let nvt = prompt.num_virtual_tokens;
    let encoder_decoder = base.info().is_encoder_decoder;
    let mut inputs = inputs.clone();
    let first_call = cache.as_ref().is_none_or(|c| c.is_empty());
    match prompt.kind {
        PromptKind::Prepend => {
            if let Some(mask) = &inputs.attention_mask {
                inputs.attention_mask = Some(with_leading_ones(mask, nvt)?);
            }
            if inputs.position_ids.take().is_some() {
                tracing::warn!(
                    "position ids are not supported with prompt tuning or p-tuning; ignoring them"
                );
            }
            if let Some(t) = inputs.token_type_ids.take() {
                let zeros = Tensor::zeros((batch, nvt), t.dtype(), t.device())?;
                inputs.token_type_ids = Some(Tensor::cat(&[&zeros, &t], 1)?);
            }
            // The encoder (or a decoder-only model) sees the virtual tokens on the first call;
            // later calls reuse the cache, which holds their positions or the encoder output.
            if first_call {
                let embeds = match (inputs.inputs_embeds.take(), inputs.input_ids.take()) {
                    (Some(e), _) => e,
                    (None, Some(ids)) => base.embed_tokens(&ids)?,
                    (None, None) => unreachable!("batch_and_len checked the inputs"),
                };
                let prompts = crate::grad::maybe_detach(prompt.encoder.forward(training)?)
                    .narrow(0, 0, nvt)?;
                let (rows, width) = prompts.dims2()?;
                let prompts = prompts
                    .to_dtype(embeds.dtype())?
                    .unsqueeze(0)?
                    .broadcast_as((batch, rows, width))?;
                inputs.inputs_embeds = Some(Tensor::cat(&[&prompts.contiguous()?, &embeds], 1)?);
            }
            run_base(base, &inputs, cache, targets)
        }
        PromptKind::Prefix {
            num_layers,
            num_heads,
            head_dim,
            submodules,
        } => {
            let mask = if encoder_decoder {
                &mut inputs.decoder_attention_mask
            } else {
                &mut inputs.attention_mask
            };
            if let Some(m) = mask.take() {
                *mask = Some(with_leading_ones(&m, nvt)?);
            }
            if let Some(p) = inputs.position_ids.take() {
                inputs.position_ids = Some((p.to_dtype(DType::I64)? + nvt as f64)?);
            }
            let mut fresh;
            let cache = match cache {
                Some(c) if !first_call => c,
                other => {
                    let flat = crate::grad::maybe_detach(prompt.encoder.forward(training)?);
                    let kv = prefix_key_values(
                        &flat,
                        batch,
                        num_layers,
                        num_heads,
                        head_dim,
                        submodules,
                        base.dtype(),
                    )?;
                    match other {
                        Some(c) => {
                            *c = KvCache::from_prefix(kv);
                            c
                        }
                        None => {
                            fresh = KvCache::from_prefix(kv);
                            &mut fresh
                        }
                    }
                }
            };
            run_base(base, &inputs, Some(cache), targets)
        }
    }
}

/// The base model's logits, or its token loss against `targets`.
fn run_base(
    base: &dyn AdaptableModel,
    inputs: &ModelInputs,
    cache: Option<&mut KvCache>,
    targets: Option<&Tensor>,
) -> Result<Tensor> {
    match targets {
        Some(targets) => base.token_loss(inputs, cache, targets),
        None => base.forward(inputs, cache),
    }
}
