//! Training data: JSONL records with `text`, `prompt`/`completion` or chat `messages`, and CSV
//! files with `text` or `prompt`,`completion` columns, tokenized into examples that say which
//! tokens are learned (all of `text`; only the completion; only the assistant turns of a chat),
//! then batched with padding or packed into fixed-length blocks.
//!
//! A bad record (invalid JSON, missing field, empty text, a sequence longer than the limit) is
//! a [`PeftError::Data`] naming the file and line, or, where the caller asked for it, a counted
//! skip.

use std::path::Path;

use candle_core::{Device, Tensor};
use peft_core::loss::IGNORE_INDEX;
use peft_core::training::CausalLmBatch;
use peft_core::{PeftError, Result};
use peft_models::{ChatMessage, TextTokenizer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Whether each token is a training target.
    pub learn: Vec<bool>,
    /// The line of the data file it came from (1-based).
    pub line: usize,
}

/// How over-long sequences are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// A [`PeftError::Data`] error naming the line.
    Error,
    /// Cut to the limit.
    Truncate,
    /// Dropped and counted.
    Skip,
}

/// Options for reading a data file.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// Longest sequence allowed (tokens); with packing, longer texts are fine and this is the
    /// block length.
    pub max_len: usize,
    /// Sequences are packed into blocks (no limit per record).
    pub packing: bool,
    /// What to do with a record longer than `max_len` (without packing).
    pub overflow: Overflow,
    /// Skip and count malformed records (bad JSON, missing or empty fields) instead of failing.
    pub skip_bad: bool,
    /// Append the tokenizer's end-of-sequence token to `text` and completions.
    pub add_eos: bool,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            max_len: 512,
            packing: false,
            overflow: Overflow::Error,
            skip_bad: false,
            add_eos: true,
        }
    }
}

/// A tokenized data file.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// Records skipped as malformed (with `skip_bad`).
    pub skipped_bad: usize,
    /// Records skipped as too long (with [`Overflow::Skip`]).
    pub skipped_long: usize,
    /// Records truncated (with [`Overflow::Truncate`]).
    pub truncated: usize,
}

impl Dataset {
    /// Number of learned tokens (labels that count toward the loss).
    pub fn target_tokens(&self) -> usize {
        self.examples
            .iter()
            .map(|e| e.learn.iter().filter(|&&l| l).count())
            .sum()
    }

    /// Splits off a held-out fraction, chosen by a seeded shuffle: `(train, eval)`.
    pub fn split(mut self, eval_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(0.0..1.0).contains(&eval_fraction) {
            return Err(PeftError::bad_input(
                "eval fraction",
                "a value in [0, 1)",
                eval_fraction.to_string(),
            ));
        }
        let n = self.examples.len();
        let n_eval = ((n as f64) * eval_fraction).round() as usize;
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut StdRng::seed_from_u64(seed));
        let eval_set: std::collections::HashSet<usize> = order[..n_eval].iter().copied().collect();
        let mut train = Vec::with_capacity(n - n_eval);
        let mut eval = Vec::with_capacity(n_eval);
        for (i, e) in self.examples.drain(..).enumerate() {
            if eval_set.contains(&i) {
                eval.push(e);
            } else {
                train.push(e);
            }
        }
        let stats = |examples| Dataset {
            examples,
            ..Default::default()
        };
        let mut train = stats(train);
        train.skipped_bad = self.skipped_bad;
        train.skipped_long = self.skipped_long;
        train.truncated = self.truncated;
        Ok((train, stats(eval)))
    }
}

/// The fields of one record, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Plain text; every token is learned.
    Text(String),
    /// A prompt and its completion; only the completion is learned.
    PromptCompletion(String, String),
    /// A chat; only the assistant turns are learned.
    Messages(Vec<ChatMessage>),
}

fn data_err(path: &Path, line: usize, reason: impl Into<String>) -> PeftError {
    PeftError::Data {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

fn string_field(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    path: &Path,
    line: usize,
) -> Result<String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(data_err(
            path,
            line,
            format!("field `{key}`: expected a string, found {other}"),
        )),
        None => Err(data_err(path, line, format!("missing field `{key}`"))),
    }
}

/// Parses one JSON record.
pub fn parse_json_record(text: &str, path: &Path, line: usize) -> Result<Record> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| data_err(path, line, format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(data_err(
            path,
            line,
            "expected a JSON object with `text`, `prompt`/`completion` or `messages`",
        ));
    };
    let record = if obj.contains_key("messages") {
        let Some(Value::Array(items)) = obj.get("messages") else {
            return Err(data_err(
                path,
                line,
                "field `messages`: expected a list of {role, content} objects",
            ));
        };
        let mut messages = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let Value::Object(m) = item else {
                return Err(data_err(
                    path,
                    line,
                    format!("messages[{i}]: expected an object with `role` and `content`"),
                ));
            };
            let role = string_field(m, "role", path, line).map_err(|_| {
                data_err(
                    path,
                    line,
                    format!("messages[{i}]: missing or non-string `role`"),
                )
            })?;
            let content = string_field(m, "content", path, line).map_err(|_| {
                data_err(
                    path,
                    line,
                    format!("messages[{i}]: missing or non-string `content`"),
                )
            })?;
            messages.push(ChatMessage { role, content });
        }
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err(data_err(
                path,
                line,
                "field `messages`: no `assistant` turn to learn",
            ));
        }
        Record::Messages(messages)
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        Record::PromptCompletion(
            string_field(&obj, "prompt", path, line)?,
            string_field(&obj, "completion", path, line)?,
        )
    } else if obj.contains_key("text") {
        Record::Text(string_field(&obj, "text", path, line)?)
    } else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        return Err(data_err(
            path,
            line,
            format!(
                "expected a `text`, `prompt`/`completion` or `messages` field; found keys {keys:?}"
            ),
        ));
    };
    check_not_empty(&record, path, line)?;
    Ok(record)
}

fn check_not_empty(record: &Record, path: &Path, line: usize) -> Result<()> {
    let empty = match record {
        Record::Text(t) => t.trim().is_empty().then_some("`text` is empty"),
        Record::PromptCompletion(_, c) => c.trim().is_empty().then_some("`completion` is empty"),
        Record::Messages(m) => m
            .iter()
            .all(|m| m.content.trim().is_empty())
            .then_some("every message is empty"),
    };
    match empty {
        Some(why) => Err(data_err(path, line, why)),
        None => Ok(()),
    }
}

/// Reads the records of a JSONL (`.jsonl`, `.json`) or CSV (`.csv`) file, each with its line.
/// Blank JSONL lines are ignored. Malformed records are errors, or skipped and counted.
pub fn read_records(path: &Path, skip_bad: bool) -> Result<(Vec<(usize, Record)>, usize)> {
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    let is_csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let mut out = Vec::new();
    let mut skipped = 0;
    let mut push = |line: usize, r: Result<Record>| -> Result<()> {
        match r {
            Ok(rec) => out.push((line, rec)),
            Err(e) if skip_bad => {
                tracing::warn!("skipping: {e}");
                skipped += 1;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    };
    if is_csv {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .from_reader(text.as_bytes());
        let headers = reader
            .headers()
            .map_err(|e| data_err(path, 1, format!("CSV header: {e}")))?
            .clone();
        let col = |name: &str| headers.iter().position(|h| h.trim() == name);
        let (text_col, prompt_col, completion_col) =
            (col("text"), col("prompt"), col("completion"));
        if text_col.is_none() && (prompt_col.is_none() || completion_col.is_none()) {
            let found: Vec<&str> = headers.iter().collect();
            return Err(data_err(path, 1, format!("CSV header: expected a `text` column or `prompt` and `completion` columns; found {found:?}")));
        }
        for row in reader.records() {
            let (line, r) = match row {
                Ok(row) => {
                    let line = row.position().map_or(0, |p| p.line() as usize);
                    let get = |c: usize| row.get(c).unwrap_or_default().to_string();
                    let rec = match (prompt_col, completion_col) {
                        (Some(p), Some(c)) => Record::PromptCompletion(get(p), get(c)),
                        _ => Record::Text(get(text_col.unwrap_or(0))),
                    };
                    (line, check_not_empty(&rec, path, line).map(|()| rec))
                }
                Err(e) => {
                    let line = e.position().map_or(0, |p| p.line() as usize);
                    (
                        line,
                        Err(data_err(path, line, format!("bad CSV record: {e}"))),
                    )
                }
            };
            push(line, r)?;
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            push(i + 1, parse_json_record(line, path, i + 1))?;
        }
    }
    if out.is_empty() {
        return Err(data_err(path, 1, "no usable records in the file"));
    }
    Ok((out, skipped))
}

/// Byte spans of the assistant turns in the rendered chat, found by rendering each prefix of
/// the conversation (the template must render a conversation as an extension of its prefixes).
fn assistant_spans(
    tok: &TextTokenizer,
    messages: &[ChatMessage],
    path: &Path,
    line: usize,
) -> Result<(String, Vec<(usize, usize)>)> {
    let full = tok.apply_chat_template(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tok.apply_chat_template(&messages[..i], true)?;
        let through = tok.apply_chat_template(&messages[..=i], false)?;
        if !full.starts_with(&before) || !full.starts_with(&through) || through.len() < before.len()
        {
            return Err(data_err(
                path,
                line,
                "the chat template does not render a conversation as an extension of its prefixes, so the assistant turns cannot be located",
            ));
        }
        spans.push((before.len(), through.len()));
    }
    Ok((full, spans))
}

/// Tokenizes one record.
pub fn tokenize_record(
    tok: &TextTokenizer,
    record: &Record,
    opts: &DataOptions,
    path: &Path,
    line: usize,
) -> Result<Example> {
    let eos = if opts.add_eos {
        tok.eos_token_ids.first().copied()
    } else {
        None
    };
    let (ids, learn) = match record {
        Record::Text(text) => {
            let mut ids = tok.encode(text, true)?;
            ids.extend(eos);
            let learn = vec![true; ids.len()];
            (ids, learn)
        }
        Record::PromptCompletion(prompt, completion) => {
            let mut ids = tok.encode(prompt, true)?;
            let n_prompt = ids.len();
            ids.extend(tok.encode(completion, false)?);
            ids.extend(eos);
            let learn = (0..ids.len()).map(|i| i >= n_prompt).collect();
            (ids, learn)
        }
        Record::Messages(messages) => {
            if !tok.has_chat_template() {
                return Err(data_err(
                    path,
                    line,
                    "`messages` records need a tokenizer with a chat template",
                ));
            }
            let (text, spans) = assistant_spans(tok, messages, path, line)?;
            let enc = tok
                .inner()
                .encode(text.as_str(), false)
                .map_err(|e| data_err(path, line, e.to_string()))?;
            let ids = enc.get_ids().to_vec();
            let learn = enc
                .get_offsets()
                .iter()
                .map(|&(s, e)| spans.iter().any(|&(a, b)| s >= a && e <= b && e > s))
                .collect();
            (ids, learn)
        }
    };
    Ok(Example { ids, learn, line })
}

/// Reads and tokenizes a data file.
pub fn load_dataset(path: &Path, tok: &TextTokenizer, opts: &DataOptions) -> Result<Dataset> {
    let (records, skipped_bad) = read_records(path, opts.skip_bad)?;
    let mut ds = Dataset {
        skipped_bad,
        ..Default::default()
    };
    for (line, record) in &records {
        let mut ex = match tokenize_record(tok, record, opts, path, *line) {
            Ok(ex) => ex,
            Err(e) if opts.skip_bad => {
                tracing::warn!("skipping: {e}");
                ds.skipped_bad += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        if !ex.learn.iter().any(|&l| l) {
            let e = data_err(path, *line, "no tokens to learn after tokenization");
            if opts.skip_bad {
                ds.skipped_bad += 1;
                continue;
            }
            return Err(e);
        }
        if !opts.packing && ex.ids.len() > opts.max_len {
            match opts.overflow {
                Overflow::Error => {
                    return Err(data_err(
                        path,
                        *line,
                        format!(
                            "sequence of {} tokens is longer than the limit of {} (raise --seq-len up to the model's context, or pass --truncate, --skip-long or --packing)",
                            ex.ids.len(),
                            opts.max_len
                        ),
                    ))
                }
                Overflow::Skip => {
                    ds.skipped_long += 1;
                    continue;
                }
                Overflow::Truncate => {
                    ex.ids.truncate(opts.max_len);
                    ex.learn.truncate(opts.max_len);
                    ds.truncated += 1;
                    if !ex.learn.iter().any(|&l| l) {
                        ds.skipped_long += 1;
                        continue;
                    }
                }
            }
        }
        ds.examples.push(ex);
    }
    if ds.examples.is_empty() {
        return Err(data_err(path, 1, "no usable examples after tokenization"));
    }
    Ok(ds)
}

/// The training sequences of a dataset: the examples themselves (padding), or the examples
/// concatenated in order and cut into blocks of `block` tokens (packing; a final partial block
/// is kept if it has at least two tokens).
pub fn sequences(ds: &Dataset, packing: bool, block: usize) -> Vec<Example> {
    if !packing {
        return ds.examples.clone();
    }
    let mut out = Vec::new();
    let mut cur = Example {
        ids: Vec::with_capacity(block),
        learn: Vec::with_capacity(block),
        line: 0,
    };
    for ex in &ds.examples {
        for (&id, &l) in ex.ids.iter().zip(&ex.learn) {
            if cur.ids.is_empty() {
                cur.line = ex.line;
            }
            cur.ids.push(id);
            cur.learn.push(l);
            if cur.ids.len() == block {
                out.push(std::mem::replace(
                    &mut cur,
                    Example {
                        ids: Vec::with_capacity(block),
                        learn: Vec::with_capacity(block),
                        line: 0,
                    },
                ));
            }
        }
    }
    if cur.ids.len() >= 2 {
        out.push(cur);
    }
    out
}

/// A causal-LM batch of `examples`, right-padded with `pad_id` to the longest; labels are the
/// ids where learned and `-100` elsewhere.
pub fn collate(examples: &[&Example], pad_id: u32, device: &Device) -> Result<CausalLmBatch> {
    let width = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if width == 0 {
        return Err(PeftError::bad_input(
            "collate",
            "at least one non-empty example",
            "none",
        ));
    }
    let b = examples.len();
    let mut ids = Vec::with_capacity(b * width);
    let mut mask = Vec::with_capacity(b * width);
    let mut labels = Vec::with_capacity(b * width);
    for e in examples {
        for i in 0..width {
            match e.ids.get(i) {
                Some(&id) => {
                    ids.push(id);
                    mask.push(1u32);
                    labels.push(if e.learn[i] {
                        i64::from(id)
                    } else {
                        IGNORE_INDEX
                    });
                }
                None => {
                    ids.push(pad_id);
                    mask.push(0);
                    labels.push(IGNORE_INDEX);
                }
            }
        }
    }
    let all_ones = mask.iter().all(|&m| m == 1);
    Ok(CausalLmBatch {
        input_ids: Tensor::from_vec(ids, (b, width), device)?,
        attention_mask: if all_ones {
            None
        } else {
            Some(Tensor::from_vec(mask, (b, width), device)?)
        },
        labels: Tensor::from_vec(labels, (b, width), device)?,
    })
}
