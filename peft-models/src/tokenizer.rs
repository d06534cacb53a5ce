//! Text tokenizers for the models: a Hugging Face folder's `tokenizer.json` (+
//! `tokenizer_config.json` for the special tokens and chat template), or one rebuilt from a GGUF
//! file's `tokenizer.ggml.*` metadata the way transformers rebuilds it (byte-level BPE with the
//! file's vocabulary and merges, control tokens as special added tokens, user-defined tokens as
//! plain added tokens, the pre-tokenizer split chosen by `tokenizer.ggml.pre`). Chat templates
//! (Jinja) render with minijinja.

use std::collections::HashMap;
use std::path::Path;

use peft_core::{PeftError, Result};
use serde::Serialize;
use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::gguf::GgufFile;

/// One chat message (`role`, `content`), as chat templates expect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A tokenizer with the special tokens and chat template that go with it.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids (generation stops at any of them).
    pub eos_token_ids: Vec<u32>,
    /// Padding token id.
    pub pad_token_id: Option<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
    source: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source)
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos_token_id)
            .field("eos", &self.eos_token_ids)
            .finish()
    }
}

fn tok_err(source: &str, e: impl std::fmt::Display) -> PeftError {
    PeftError::BadCheckpoint {
        path: source.into(),
        format: "tokenizer".into(),
        reason: e.to_string(),
    }
}

/// GPT-2's byte-to-unicode table (printable stand-ins for the 256 byte values).
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\u{FFFD}');
            n += 1;
            c
        };
    }
    table
}

/// A byte-level tokenizer with one token per byte (ids 0..256 in GPT-2's byte order) and the
/// given special tokens after them: no merges, so any text encodes. For demos and tests on
/// random models, and as a fallback when a vocabulary is not at hand.
pub fn byte_tokenizer(specials: &[&str]) -> Result<Tokenizer> {
    let vocab: tokenizers::models::bpe::Vocab = bytes_to_unicode()
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(|e| tok_err("byte tokenizer", e))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(true, true, true)));
    tok.add_special_tokens(
        specials
            .iter()
            .map(|t| AddedToken::from(*t, true).normalized(false)),
    )
    .map_err(|e| tok_err("byte tokenizer", e))?;
    Ok(tok)
}

/// A JSON object file, or `None` when the file does not exist.
fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    peft_core::json::parse_object(&text, &path.display().to_string()).map(Some)
}

/// A token id or a list of them, as config files write `*_token_id`.
fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// `eos_token_id` of `generation_config.json`, else of `config.json`.
fn eos_ids_of(
    gen: &serde_json::Map<String, Value>,
    config: &serde_json::Map<String, Value>,
) -> Vec<u32> {
    let ids = token_ids(gen.get("eos_token_id"));
    if ids.is_empty() {
        token_ids(config.get("eos_token_id"))
    } else {
        ids
    }
}

/// The end-of-sequence ids a model declares without its tokenizer: a folder's
/// `generation_config.json` / `config.json` `eos_token_id`, or a GGUF file's
/// `tokenizer.ggml.eos_token_id`.
pub fn model_eos_token_ids(model: &Path) -> Result<Vec<u32>> {
    if crate::gguf::is_gguf(model) {
        let file = GgufFile::open(model)?;
        return Ok(file
            .opt_u64("tokenizer.ggml.eos_token_id")?
            .map(|v| vec![v as u32])
            .unwrap_or_default());
    }
    let gen = read_json_object(&model.join("generation_config.json"))?.unwrap_or_default();
    let config = read_json_object(&model.join("config.json"))?.unwrap_or_default();
    Ok(eos_ids_of(&gen, &config))
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex transformers uses for a `tokenizer.ggml.pre` value (`None`: GPT-2's own).
fn pre_split(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => Some(QWEN2_SPLIT),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => Some(GPT4O_SPLIT),
        _ => None,
    }
}

fn token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Rebuilds the tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let source = file.path().display().to_string();
        let model = file
            .opt_str("tokenizer.ggml.model")?
            .unwrap_or_default()
            .to_string();
        if model != "gpt2" {
            return Err(PeftError::Unsupported {
                source_name: source,
                key: "tokenizer.ggml.model".into(),
                value: format!("\"{model}\""),
                reason: "only byte-level BPE (\"gpt2\") GGUF tokenizers are rebuilt; pass --tokenizer tokenizer.json".into(),
            });
        }
        let missing = |key: &str, what: &str| PeftError::MissingKey {
            source_name: source.clone(),
            key: key.into(),
            expected: what.into(),
        };
        let tokens = file
            .opt_strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| missing("tokenizer.ggml.tokens", "the vocabulary"))?;
        let merges = file
            .opt_strings("tokenizer.ggml.merges")?
            .ok_or_else(|| missing("tokenizer.ggml.merges", "the BPE merges"))?;
        let types = file
            .opt_ints("tokenizer.ggml.token_type")?
            .unwrap_or_default();
        let table = bytes_to_unicode();
        let alphabet: std::collections::HashSet<char> = table.iter().copied().collect();
        let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            let key = if spelled(t) {
                t.clone()
            } else {
                t.bytes().map(|b| table[b as usize]).collect()
            };
            vocab.insert(key, i as u32);
        }
        let merges: Vec<(String, String)> = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        PeftError::config_value(
                            &source,
                            &format!("tokenizer.ggml.merges[{i}]"),
                            "two tokens separated by a space",
                            m,
                        )
                    })
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .build()
            .map_err(|e| tok_err(&source, e))?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre = file
            .opt_str("tokenizer.ggml.pre")?
            .unwrap_or_default()
            .to_string();
        match pre_split(&pre) {
            Some(regex) => {
                let split = Split::new(
                    SplitPattern::Regex(regex.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| tok_err(&source, e))?;
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    PreTokenizerWrapper::Split(split),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
                ])));
            }
            None => {
                inner.with_pre_tokenizer(Some(byte_level));
            }
        }
        inner.with_decoder(Some(ByteLevel::new(true, true, true)));
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(t, ty)| **ty == 3 && spelled(t))
            .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        inner
            .add_special_tokens(control)
            .map_err(|e| tok_err(&source, e))?;
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(t, ty)| **ty == 4 && spelled(t))
            .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
            .collect();
        inner.add_tokens(user).map_err(|e| tok_err(&source, e))?;

        let id = |key: &str| -> Result<Option<u32>> { Ok(file.opt_u64(key)?.map(|v| v as u32)) };
        let bos_id = id("tokenizer.ggml.bos_token_id")?;
        let eos_id = id("tokenizer.ggml.eos_token_id")?;
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let add_bos = file
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false);
        let add_eos = file
            .opt_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);
        if add_bos || add_eos {
            let mut single = Vec::new();
            let mut specials = Vec::new();
            if let (true, Some(b), Some(i)) = (add_bos, name(bos_id), bos_id) {
                single.push(b.clone());
                specials.push((b, i));
            }
            single.push("$A".to_string());
            if let (true, Some(e), Some(i)) = (add_eos, name(eos_id), eos_id) {
                single.push(e.clone());
                specials.push((e, i));
            }
            let processor = TemplateProcessing::builder()
                .try_single(single.join(" "))
                .map_err(|e| tok_err(&source, e))?
                .special_tokens(specials)
                .build()
                .map_err(|e| tok_err(&source, e))?;
            inner.with_post_processor(Some(processor));
        }
        Ok(TextTokenizer {
            inner,
            bos_token_id: bos_id,
            eos_token_ids: eos_id.into_iter().collect(),
            pad_token_id: id("tokenizer.ggml.padding_token_id")?,
            bos_token: name(bos_id),
            eos_token: name(eos_id),
            chat_template: file.opt_str("tokenizer.chat_template")?.map(str::to_string),
            source,
        })
    }

    /// Loads `tokenizer.json` from a model folder, with the special tokens and chat template of
    /// `tokenizer_config.json` and the ids of `config.json` / `generation_config.json`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let source = path.display().to_string();
        if !path.is_file() {
            return Err(PeftError::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no tokenizer.json in the model folder",
                ),
            ));
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| tok_err(&source, e))?;
        let read = |name: &str| read_json_object(&dir.join(name));
        let tc = read("tokenizer_config.json")?.unwrap_or_default();
        let config = read("config.json")?.unwrap_or_default();
        let gen = read("generation_config.json")?.unwrap_or_default();
        let chat_template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.is_file() {
                    Some(std::fs::read_to_string(&jinja).map_err(|e| PeftError::io(&jinja, e))?)
                } else {
                    None
                }
            }
        };
        let bos_token = tc.get("bos_token").and_then(token_string);
        let eos_token = tc.get("eos_token").and_then(token_string);
        let pad_token = tc.get("pad_token").and_then(token_string);
        let mut eos_token_ids = eos_ids_of(&gen, &config);
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let bos_token_id = bos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| token_ids(config.get("bos_token_id")).first().copied());
        let pad_token_id = pad_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| token_ids(config.get("pad_token_id")).first().copied());
        Ok(TextTokenizer {
            inner,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            bos_token,
            eos_token,
            chat_template,
            source,
        })
    }

    /// Loads the tokenizer that goes with a model path: a GGUF file's own, or a folder's
    /// `tokenizer.json`.
    pub fn for_model(path: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(path) {
            Self::from_gguf(&GgufFile::open(path)?)
        } else {
            Self::from_folder(path)
        }
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` (bos/eos/pad tokens, chat
    /// template) into `dir`, so a folder made from a GGUF file (`peft quantize`) carries the
    /// tokenizer the GGUF embedded.
    pub fn save_folder(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, false)
            .map_err(|e| tok_err(&path.display().to_string(), e))?;
        let mut tc = serde_json::Map::new();
        if let Some(t) = &self.bos_token {
            tc.insert("bos_token".into(), Value::String(t.clone()));
        }
        if let Some(t) = &self.eos_token {
            tc.insert("eos_token".into(), Value::String(t.clone()));
        }
        if let Some(t) = self.pad_token_id.and_then(|id| self.inner.id_to_token(id)) {
            tc.insert("pad_token".into(), Value::String(t));
        }
        if let Some(t) = &self.chat_template {
            tc.insert("chat_template".into(), Value::String(t.clone()));
        }
        let text = peft_core::json::to_python_json(&Value::Object(tc));
        peft_core::checkpoint::write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (BOS/EOS where the
    /// tokenizer adds them), as transformers' `tokenizer(text)` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err(&self.source, e))
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether the tokenizer has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the chat template (`add_generation_prompt` opens the assistant's
    /// turn), as transformers' `apply_chat_template(..., tokenize=False)`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| PeftError::MissingKey {
                source_name: self.source.clone(),
                key: "chat_template".into(),
                expected:
                    "a Jinja chat template (tokenizer_config.json or tokenizer.chat_template)"
                        .into(),
            })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let bad = |e: minijinja::Error| {
            PeftError::config_value(
                &self.source,
                "chat_template",
                "a template that renders",
                e.to_string(),
            )
        };
        env.add_template("chat", template).map_err(bad)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(bad)
    }
}
