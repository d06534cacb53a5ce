//! Training data: JSONL records with `text`, `prompt`/`completion` (or `input`/`target`), chat
//! `messages`, or `text` + `label`, and CSV files with the same columns, tokenized for the
//! model's objective ([`Objective`]): for a causal LM, examples that say which tokens are
//! learned (all of `text`; only the completion; only the assistant turns of a chat); for an
//! encoder-decoder, the prompt as encoder input and the completion as decoder target; for a
//! sequence classifier, the text and its class. Then batched with padding (or, for causal LMs,
//! packed into fixed-length blocks).
//!
//! A bad record (invalid JSON, missing field, empty text, a sequence longer than the limit) is
//! a [`PeftError::Data`] naming the file and line, or, where the caller asked for it, a counted
//! skip.

use std::path::Path;

use candle_core::{Device, Tensor};
use peft_core::loss::IGNORE_INDEX;
use peft_core::training::{Batch, CausalLmBatch, ClassificationBatch, Seq2SeqBatch};
use peft_core::{PeftError, Result};
use peft_models::{ChatMessage, TextTokenizer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids (the encoder's input for an encoder-decoder).
    pub ids: Vec<u32>,
    /// Whether each token is a training target (causal LMs; empty for other targets).
    pub learn: Vec<bool>,
    /// The line of the data file it came from (1-based).
    pub line: usize,
    /// What the example teaches.
    pub target: Target,
}

impl Example {
    /// A causal-LM example learning the `learn` tokens of `ids`.
    pub fn tokens(ids: Vec<u32>, learn: Vec<bool>, line: usize) -> Self {
        Example {
            ids,
            learn,
            line,
            target: Target::Tokens,
        }
    }

    /// Tokens that count toward the loss.
    pub fn target_tokens(&self) -> usize {
        match &self.target {
            Target::Tokens => self.learn.iter().filter(|&&l| l).count(),
            Target::Decoder(t) => t.len(),
            Target::Class(_) => 1,
        }
    }
}

/// What an example teaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The next token at every learned position of `ids` (decoder-only models).
    Tokens,
    /// The decoder's target ids (encoder-decoders; `ids` is the encoder input).
    Decoder(Vec<u32>),
    /// The class of the whole sequence (sequence classification).
    Class(u32),
}

/// The training objective, from the model: what records must hold and how they tokenize.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Objective {
    /// Next-token prediction (`text`, `prompt`/`completion`, `messages`).
    #[default]
    CausalLm,
    /// Sequence to sequence (`prompt`/`completion` or `input`/`target`; the loss is on the
    /// target).
    Seq2Seq,
    /// Sequence classification (`text` + `label`): the label is a class index or one of
    /// `labels` (the names, index order, as a config's `id2label`).
    Classification {
        /// Class names in index order.
        labels: Vec<String>,
    },
}

/// A record's class: an index, or a name to look up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Label {
    /// A class index.
    Index(i64),
    /// A class name.
    Name(String),
}

impl Label {
    /// The class index among `labels` (names in index order), or why not.
    pub fn resolve(&self, labels: &[String]) -> std::result::Result<u32, String> {
        match self {
            Label::Index(i) if (0..labels.len() as i64).contains(i) => Ok(*i as u32),
            Label::Index(i) => Err(format!(
                "label {i} is not a class index in 0..{}",
                labels.len()
            )),
            Label::Name(n) => match labels.iter().position(|l| l == n) {
                Some(i) => Ok(i as u32),
                None => Err(format!("label `{n}` is not one of the classes {labels:?}")),
            },
        }
    }
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
    /// The model's objective.
    pub objective: Objective,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            max_len: 512,
            packing: false,
            overflow: Overflow::Error,
            skip_bad: false,
            add_eos: true,
            objective: Objective::CausalLm,
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
        self.examples.iter().map(Example::target_tokens).sum()
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
    /// A text and its class (sequence classification).
    Labeled(String, Label),
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
            "expected a JSON object with `text`, `prompt`/`completion` or `messages` (or `input`/`target`, or `text` + `label` for a classifier)",
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
    } else if obj.contains_key("input") || obj.contains_key("target") {
        Record::PromptCompletion(
            string_field(&obj, "input", path, line)?,
            string_field(&obj, "target", path, line)?,
        )
    } else if obj.contains_key("label") {
        let label = match obj.get("label") {
            Some(Value::Number(n)) if n.as_i64().is_some() => Label::Index(n.as_i64().unwrap_or(0)),
            Some(Value::String(s)) => Label::Name(s.clone()),
            Some(other) => {
                return Err(data_err(
                    path,
                    line,
                    format!("field `label`: expected an integer or a string, found {other}"),
                ))
            }
            None => unreachable!("contains_key checked"),
        };
        Record::Labeled(string_field(&obj, "text", path, line)?, label)
    } else if obj.contains_key("text") {
        Record::Text(string_field(&obj, "text", path, line)?)
    } else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        return Err(data_err(
            path,
            line,
            format!(
                "expected a `text`, `prompt`/`completion` or `messages` field (or `input`/`target`, or `text` + `label` for a classifier); found keys {keys:?}"
            ),
        ));
    };
    check_not_empty(&record, path, line)?;
    Ok(record)
}

fn check_not_empty(record: &Record, path: &Path, line: usize) -> Result<()> {
    let empty = match record {
        Record::Text(t) | Record::Labeled(t, _) => t.trim().is_empty().then_some("`text` is empty"),
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
        let (text_col, label_col) = (col("text"), col("label"));
        let (prompt_col, completion_col) = match (col("prompt"), col("completion")) {
            (Some(p), Some(c)) => (Some(p), Some(c)),
            _ => (col("input"), col("target")),
        };
        if text_col.is_none() && (prompt_col.is_none() || completion_col.is_none()) {
            let found: Vec<&str> = headers.iter().collect();
            return Err(data_err(path, 1, format!("CSV header: expected a `text` column (and `label` for a classifier), or `prompt` and `completion` (or `input` and `target`) columns; found {found:?}")));
        }
        for row in reader.records() {
            let (line, r) = match row {
                Ok(row) => {
                    let line = row.position().map_or(0, |p| p.line() as usize);
                    let get = |c: usize| row.get(c).unwrap_or_default().to_string();
                    let rec = match (prompt_col, completion_col, label_col) {
                        (Some(p), Some(c), _) => Record::PromptCompletion(get(p), get(c)),
                        (_, _, Some(l)) => {
                            let raw = get(l);
                            let label = match raw.trim().parse::<i64>() {
                                Ok(i) => Label::Index(i),
                                Err(_) => Label::Name(raw.trim().to_string()),
                            };
                            Record::Labeled(get(text_col.unwrap_or(0)), label)
                        }
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
    // The tokenizer's own end token (T5's `</s>`, BERT's `[SEP]`) is kept; `eos` is appended
    // only where it is missing.
    let ended = |mut ids: Vec<u32>| {
        if let Some(e) = eos.filter(|&e| ids.last() != Some(&e)) {
            ids.push(e);
        }
        ids
    };
    match (&opts.objective, record) {
        (Objective::CausalLm, Record::Labeled(..)) => {
            return Err(data_err(
                path,
                line,
                "a `text` + `label` record trains a classifier; this model is a language model",
            ))
        }
        (Objective::Seq2Seq, Record::PromptCompletion(prompt, completion)) => {
            let ids = tok.encode(prompt, true)?;
            let target = ended(tok.encode(completion, true)?);
            return Ok(Example { ids, learn: Vec::new(), line, target: Target::Decoder(target) });
        }
        (Objective::Seq2Seq, _) => {
            return Err(data_err(
                path,
                line,
                "an encoder-decoder model trains on `prompt`/`completion` (or `input`/`target`) records",
            ))
        }
        (Objective::Classification { labels }, Record::Labeled(text, label)) => {
            let class = label.resolve(labels).map_err(|e| data_err(path, line, e))?;
            let ids = tok.encode(text, true)?;
            return Ok(Example { ids, learn: Vec::new(), line, target: Target::Class(class) });
        }
        (Objective::Classification { .. }, _) => {
            return Err(data_err(path, line, "a sequence classifier trains on `text` + `label` records"))
        }
        (Objective::CausalLm, _) => {}
    }
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
        Record::Labeled(..) => unreachable!("refused above for causal LMs"),
    };
    Ok(Example::tokens(ids, learn, line))
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
        if ex.target_tokens() == 0 {
            let e = data_err(path, *line, "no tokens to learn after tokenization");
            if opts.skip_bad {
                ds.skipped_bad += 1;
                continue;
            }
            return Err(e);
        }
        let longest = match &ex.target {
            Target::Decoder(t) => ex.ids.len().max(t.len()),
            _ => ex.ids.len(),
        };
        if !opts.packing && longest > opts.max_len {
            match opts.overflow {
                Overflow::Error => {
                    return Err(data_err(
                        path,
                        *line,
                        format!(
                            "sequence of {} tokens is longer than the limit of {} (raise --seq-len up to the model's context, or pass --truncate, --skip-long or --packing)",
                            longest,
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
                    if let Target::Decoder(t) = &mut ex.target {
                        t.truncate(opts.max_len);
                    }
                    ds.truncated += 1;
                    if ex.target_tokens() == 0 {
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

/// The training sequences of a dataset: the examples themselves (padding), or, for causal-LM
/// examples, the examples concatenated in order and cut into blocks of `block` tokens (packing;
/// a final partial block is kept if it has at least two tokens). Other objectives do not pack.
pub fn sequences(ds: &Dataset, packing: bool, block: usize) -> Vec<Example> {
    if !packing || ds.examples.iter().any(|e| e.target != Target::Tokens) {
        return ds.examples.clone();
    }
    let mut out = Vec::new();
    let empty = || Example::tokens(Vec::with_capacity(block), Vec::with_capacity(block), 0);
    let mut cur = empty();
    for ex in &ds.examples {
        for (&id, &l) in ex.ids.iter().zip(&ex.learn) {
            if cur.ids.is_empty() {
                cur.line = ex.line;
            }
            cur.ids.push(id);
            cur.learn.push(l);
            if cur.ids.len() == block {
                out.push(std::mem::replace(&mut cur, empty()));
            }
        }
    }
    if cur.ids.len() >= 2 {
        out.push(cur);
    }
    out
}

/// A batch of `examples` (all of one objective), right-padded with `pad_id` to the longest
/// (the attention mask marks the padding): a causal-LM batch whose labels are the ids where
/// learned and `-100` elsewhere; a seq2seq batch whose labels are the decoder targets (`-100`
/// padded); or a classification batch of class indices.
pub fn collate(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    let Some(first) = examples.first() else {
        return Err(PeftError::bad_input(
            "collate",
            "at least one example",
            "none",
        ));
    };
    let same =
        |e: &&Example| std::mem::discriminant(&e.target) == std::mem::discriminant(&first.target);
    if !examples.iter().all(same) {
        return Err(PeftError::bad_input(
            "collate",
            "examples of one objective",
            "a mix",
        ));
    }
    let (input_ids, attention_mask) = padded_ids(examples, pad_id, device)?;
    Ok(match first.target {
        Target::Tokens => {
            let labels = padded(examples, IGNORE_INDEX, |e| {
                e.ids
                    .iter()
                    .zip(&e.learn)
                    .map(|(&id, &l)| if l { i64::from(id) } else { IGNORE_INDEX })
                    .collect()
            });
            let (b, w) = input_ids.dims2()?;
            Batch::CausalLm(CausalLmBatch {
                input_ids,
                attention_mask,
                labels: Tensor::from_vec(labels.0, (b, w), device)?,
            })
        }
        Target::Decoder(_) => {
            let (labels, width) = padded(examples, IGNORE_INDEX, |e| match &e.target {
                Target::Decoder(t) => t.iter().map(|&id| i64::from(id)).collect(),
                _ => Vec::new(),
            });
            Batch::Seq2Seq(Seq2SeqBatch {
                input_ids,
                attention_mask,
                labels: Tensor::from_vec(labels, (examples.len(), width), device)?,
            })
        }
        Target::Class(_) => {
            let labels: Vec<i64> = examples
                .iter()
                .map(|e| match e.target {
                    Target::Class(c) => i64::from(c),
                    _ => IGNORE_INDEX,
                })
                .collect();
            Batch::Classification(ClassificationBatch {
                input_ids,
                attention_mask,
                labels: Tensor::from_vec(labels, examples.len(), device)?,
            })
        }
    })
}

/// Rows of `row(e)` right-padded with `fill` to the longest: the flat values and the width.
fn padded<T: Copy>(
    examples: &[&Example],
    fill: T,
    row: impl Fn(&Example) -> Vec<T>,
) -> (Vec<T>, usize) {
    let rows: Vec<Vec<T>> = examples.iter().map(|e| row(e)).collect();
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::with_capacity(rows.len() * width);
    for r in rows {
        let n = r.len();
        out.extend(r);
        out.extend(std::iter::repeat_n(fill, width - n));
    }
    (out, width)
}

/// The examples' ids `[B, T]` right-padded with `pad_id`, and the attention mask (`None` when
/// nothing is padded).
fn padded_ids(
    examples: &[&Example],
    pad_id: u32,
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let (ids, width) = padded(examples, pad_id, |e| e.ids.clone());
    if width == 0 {
        return Err(PeftError::bad_input(
            "collate",
            "at least one non-empty example",
            "none",
        ));
    }
    let (mask, _) = padded(examples, 0u32, |e| vec![1u32; e.ids.len()]);
    let b = examples.len();
    let all_ones = mask.iter().all(|&m| m == 1);
    Ok((
        Tensor::from_vec(ids, (b, width), device)?,
        if all_ones {
            None
        } else {
            Some(Tensor::from_vec(mask, (b, width), device)?)
        },
    ))
}
