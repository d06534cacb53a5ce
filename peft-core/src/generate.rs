//! Decoding with a KV cache, greedy or sampled, for decoder-only and encoder-decoder models
//! alike: the prompt is processed once (with any prompt-learning adapter's virtual tokens or
//! prefix), then one token per step.

use candle_core::{DType, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{PeftError, Result};
use crate::model::ModelInputs;
use crate::peft_model::PeftModel;

/// Greedily extends `prompt` by up to `max_new_tokens` tokens, stopping after any token in
/// `stop_tokens`. Returns only the new tokens.
pub fn greedy_generate(
    model: &PeftModel,
    prompt: &[u32],
    max_new_tokens: usize,
    stop_tokens: &[u32],
) -> Result<Vec<u32>> {
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
    generate_with(
        model,
        prompt,
        max_new_tokens,
        stop_tokens,
        &mut Sampler::greedy(),
        on_token,
    )
}

/// How the next token is chosen: greedy (`temperature == 0`) or sampled from the softmax of
/// `logits / temperature`, restricted to the `top_k` most likely tokens and then to the
/// smallest set whose probability reaches `top_p` (transformers' processor order).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 for greedy decoding.
    pub temperature: f32,
    /// Keep only the k most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1] (`None`: 1).
    pub top_p: Option<f32>,
    /// Seed of the sampling generator.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

/// Picks tokens from logits according to a [`SamplingConfig`], with its own seeded generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self::new(SamplingConfig::default())
            .unwrap_or_else(|_| unreachable!("the default config is valid"))
    }

    /// A sampler; rejects a negative or non-finite temperature and `top_p` outside (0, 1].
    pub fn new(cfg: SamplingConfig) -> Result<Self> {
        if !cfg.temperature.is_finite() || cfg.temperature < 0.0 {
            return Err(PeftError::bad_input(
                "temperature",
                "a finite value >= 0",
                cfg.temperature.to_string(),
            ));
        }
        if let Some(p) = cfg.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(PeftError::bad_input(
                    "top_p",
                    "a value in (0, 1]",
                    p.to_string(),
                ));
            }
        }
        let rng = StdRng::seed_from_u64(cfg.seed);
        Ok(Sampler { cfg, rng })
    }

    /// The next token for `logits` (`[V]`).
    pub fn pick(&mut self, logits: &Tensor) -> Result<u32> {
        if self.cfg.temperature == 0.0 {
            return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
        }
        let values: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        let t = self.cfg.temperature;
        let mut order: Vec<usize> = (0..values.len())
            .filter(|&i| values[i].is_finite())
            .collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
        if let Some(k) = self.cfg.top_k.filter(|&k| k > 0) {
            order.truncate(k);
        }
        if order.is_empty() {
            return Err(PeftError::InvalidState("sampling: no finite logits".into()));
        }
        let max = values[order[0]] / t;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| f64::from((values[i] / t - max).exp()))
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.cfg.top_p {
            // Keep the most likely tokens until their mass reaches top_p (at least one).
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= f64::from(top_p) {
                    keep = i + 1;
                    break;
                }
            }
            order.truncate(keep);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let u: f64 = self.rng.random::<f64>();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if u < acc {
                return Ok(order[i] as u32);
            }
        }
        Ok(order[order.len() - 1] as u32)
    }
}

/// Extends `prompt` by up to `max_new_tokens` tokens chosen by `sampler`, stopping after any
/// token in `stop_tokens`, calling `on_token` with each new token as it is chosen. Returns the
/// new tokens. A decoder-only model continues `prompt`; an encoder-decoder reads it with its
/// encoder and decodes from its `decoder_start_token_id` (see [`decode`]).
pub fn generate_with(
    model: &PeftModel,
    prompt: &[u32],
    max_new_tokens: usize,
    stop_tokens: &[u32],
    sampler: &mut Sampler,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(PeftError::bad_input(
            "generate",
            "a non-empty prompt",
            "no tokens",
        ));
    }
    let ids = Tensor::new(prompt, model.base_model().device())?.unsqueeze(0)?;
    decode(
        model,
        &ids,
        None,
        max_new_tokens,
        stop_tokens,
        sampler,
        on_token,
    )
}

/// The decoding loop behind every entry point, for both kinds of model: a decoder-only model
/// continues `input_ids [1, T]`; an encoder-decoder reads them (with `attention_mask`) with its
/// encoder once (the cache keeps the encoder output) and decodes from its
/// `decoder_start_token_id` (not returned). Each step asks for the last position's logits only
/// and keeps no autograd graph.
pub fn decode(
    model: &PeftModel,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    max_new_tokens: usize,
    stop_tokens: &[u32],
    sampler: &mut Sampler,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let _no_grad = crate::grad::no_grad();
    let info = model.base_model().info();
    let device = model.base_model().device().clone();
    // The encoder's input (encoder-decoders) and the first tokens the decoder reads.
    let (encoder_input, mut next_input) = if info.is_encoder_decoder {
        let start = info.decoder_start_token_id.ok_or_else(|| {
            PeftError::bad_input(
                "generate",
                "a decoder_start_token_id in the encoder-decoder's config",
                format!("none for model_type `{}`", info.model_type),
            )
        })?;
        (Some(input_ids), Tensor::new(&[[start]], &device)?)
    } else {
        (None, input_ids.clone())
    };
    let mut cache = model.new_cache();
    let mut out = Vec::with_capacity(max_new_tokens);
    for step in 0..max_new_tokens {
        let inputs = match encoder_input {
            Some(enc) => ModelInputs {
                input_ids: Some(enc.clone()),
                attention_mask: attention_mask.cloned(),
                decoder_input_ids: Some(next_input),
                logits_to_keep: 1,
                ..Default::default()
            },
            None => ModelInputs {
                logits_to_keep: 1,
                // The prompt's mask on the prefill; later steps attend to every cached position.
                attention_mask: if step == 0 {
                    attention_mask.cloned()
                } else {
                    None
                },
                ..ModelInputs::from_ids(next_input)
            },
        };
        let logits = model.forward_with_cache(&inputs, &mut cache)?;
        let t = logits.dim(1)?;
        let last = logits
            .narrow(1, t - 1, 1)?
            .squeeze(1)?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        let token = sampler.pick(&last)?;
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
/// one token per step. Returns the new tokens (the start token excluded). [`decode`] with a
/// greedy sampler, refusing a decoder-only model.
pub fn greedy_generate_seq2seq(
    model: &PeftModel,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    max_new_tokens: usize,
    stop_tokens: &[u32],
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let info = model.base_model().info();
    if !info.is_encoder_decoder {
        return Err(PeftError::bad_input(
            "generate",
            "an encoder-decoder model",
            format!("model_type `{}`", info.model_type),
        ));
    }
    let mut greedy = Sampler::greedy();
    decode(
        model,
        input_ids,
        attention_mask,
        max_new_tokens,
        stop_tokens,
        &mut greedy,
        on_token,
    )
}

/// Greedy decoding of a batch of prompts at once, as transformers' `generate` does it:
/// `input_ids [B, T]` left-padded with `attention_mask [B, T]` (1 on real tokens). A
/// decoder-only model gets each row's positions counted over its real tokens (the padding
/// skipped) and the mask grown by one each step; an encoder-decoder encodes the rows once and
/// decodes all from its `decoder_start_token_id`. A row stops after a token in `stop_tokens`
/// (later steps still run it, their tokens dropped); decoding ends when every row has stopped
/// or after `max_new_tokens`. Returns each row's new tokens. Under [`PeftModel::mixed_batch`]
/// each row decodes with its own adapter.
pub fn greedy_generate_batch(
    model: &PeftModel,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    max_new_tokens: usize,
    stop_tokens: &[u32],
) -> Result<Vec<Vec<u32>>> {
    decode_batch(
        model,
        input_ids,
        attention_mask,
        max_new_tokens,
        stop_tokens,
        &mut Sampler::greedy(),
    )
}

/// [`greedy_generate_batch`] with tokens chosen by `sampler` (one draw per row and step, rows
/// in order).
pub fn decode_batch(
    model: &PeftModel,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    max_new_tokens: usize,
    stop_tokens: &[u32],
    sampler: &mut Sampler,
) -> Result<Vec<Vec<u32>>> {
    let _no_grad = crate::grad::no_grad();
    let (b, t) = input_ids.dims2().map_err(|_| {
        PeftError::bad_input(
            "generate",
            "input_ids of shape [batch, length]",
            format!("{:?}", input_ids.dims()),
        )
    })?;
    if attention_mask.dims() != [b, t] {
        return Err(PeftError::bad_input(
            "generate",
            format!("an attention_mask of shape [{b}, {t}] like input_ids"),
            format!("{:?}", attention_mask.dims()),
        ));
    }
    if b == 0 || t == 0 {
        return Err(PeftError::bad_input(
            "generate",
            "at least one prompt of at least one token",
            format!("{:?}", input_ids.dims()),
        ));
    }
    let info = model.base_model().info();
    let device = model.base_model().device().clone();
    let mask = attention_mask.to_dtype(DType::U32)?;
    let rows: Vec<Vec<u32>> = mask.to_vec2()?;
    if let Some(i) = rows.iter().position(|r| r.iter().all(|&m| m == 0)) {
        return Err(PeftError::bad_input(
            "generate",
            "a real token in every prompt",
            format!("row {i} is all padding"),
        ));
    }
    let encoder_decoder = info.is_encoder_decoder;
    let start = if encoder_decoder {
        Some(info.decoder_start_token_id.ok_or_else(|| {
            PeftError::bad_input(
                "generate",
                "a decoder_start_token_id in the encoder-decoder's config",
                format!("none for model_type `{}`", info.model_type),
            )
        })?)
    } else {
        None
    };
    // transformers: position = (number of real tokens so far) - 1, padding at position 1.
    let mut next_pos: Vec<u32> = rows.iter().map(|r| r.iter().sum::<u32>()).collect();
    let prefill_pos: Vec<u32> = rows
        .iter()
        .flat_map(|r| {
            let mut seen = 0u32;
            r.iter()
                .map(move |&m| {
                    seen += m;
                    if m == 0 {
                        1
                    } else {
                        seen - 1
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let mut full_mask = mask.clone();
    let mut cache = model.new_cache();
    let mut out = vec![Vec::with_capacity(max_new_tokens); b];
    let mut done = vec![false; b];
    let mut next: Option<Tensor> = None;
    for step in 0..max_new_tokens {
        let inputs = if let Some(start) = start {
            let dec = match &next {
                Some(n) => n.clone(),
                None => Tensor::full(start, (b, 1), &device)?,
            };
            ModelInputs {
                input_ids: Some(input_ids.clone()),
                attention_mask: Some(mask.clone()),
                decoder_input_ids: Some(dec),
                logits_to_keep: 1,
                ..Default::default()
            }
        } else if step == 0 {
            ModelInputs {
                attention_mask: Some(mask.clone()),
                position_ids: Some(Tensor::from_vec(prefill_pos.clone(), (b, t), &device)?),
                logits_to_keep: 1,
                ..ModelInputs::from_ids(input_ids.clone())
            }
        } else {
            full_mask = Tensor::cat(
                &[&full_mask, &Tensor::ones((b, 1), DType::U32, &device)?],
                1,
            )?;
            let pos = Tensor::from_vec(next_pos.clone(), (b, 1), &device)?;
            next_pos.iter_mut().for_each(|p| *p += 1);
            ModelInputs {
                attention_mask: Some(full_mask.clone()),
                position_ids: Some(pos),
                logits_to_keep: 1,
                ..ModelInputs::from_ids(next.clone().unwrap_or(Tensor::zeros(
                    (b, 1),
                    DType::U32,
                    &device,
                )?))
            }
        };
        let logits = model.forward_with_cache(&inputs, &mut cache)?;
        let last = logits.narrow(1, logits.dim(1)? - 1, 1)?.squeeze(1)?;
        let mut picked = Vec::with_capacity(b);
        for (i, row) in out.iter_mut().enumerate() {
            let token = sampler.pick(&last.get(i)?)?;
            picked.push(token);
            if !done[i] {
                row.push(token);
                done[i] = stop_tokens.contains(&token);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        next = Some(Tensor::from_vec(picked, (b, 1), &device)?);
    }
    Ok(out)
}
