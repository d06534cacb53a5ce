//! `PromptTuningConfig`: peft 0.21's prompt-tuning fields.

use peft_core::json::ConfigFields;
use peft_core::{
    CommonConfig, MethodConfig, PeftError, PromptLearningConfig, PromptMethod, Result,
};
use serde_json::{Map, Value};

/// `prompt_tuning_init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptTuningInit {
    /// `RANDOM`: normal with std 1 (`nn.Embedding`'s default).
    Random,
    /// `SAMPLE_VOCAB`: embeddings of random vocabulary tokens.
    SampleVocab,
    /// `TEXT`: embeddings of `prompt_tuning_init_text`.
    Text,
}

impl PromptTuningInit {
    fn as_str(self) -> &'static str {
        match self {
            PromptTuningInit::Random => "RANDOM",
            PromptTuningInit::SampleVocab => "SAMPLE_VOCAB",
            PromptTuningInit::Text => "TEXT",
        }
    }
}

/// The prompt-tuning configuration (peft's `PromptTuningConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTuningConfig {
    /// The shared prompt-learning fields.
    pub prompt: PromptLearningConfig,
    /// `prompt_tuning_init`.
    pub prompt_tuning_init: PromptTuningInit,
    /// `prompt_tuning_init_text` (for `TEXT`).
    pub prompt_tuning_init_text: Option<String>,
    /// `tokenizer_name_or_path` (for `TEXT`): a local folder holding `tokenizer.json`.
    pub tokenizer_name_or_path: Option<String>,
    /// `tokenizer_kwargs` (kept as written; only valid with `TEXT`).
    pub tokenizer_kwargs: Option<Value>,
}

impl PromptTuningConfig {
    /// A config with `num_virtual_tokens` and random initialisation.
    pub fn new(num_virtual_tokens: usize) -> Self {
        PromptTuningConfig {
            prompt: PromptLearningConfig::new(num_virtual_tokens),
            prompt_tuning_init: PromptTuningInit::Random,
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
            tokenizer_kwargs: None,
        }
    }

    /// Initialises from the embeddings of `text`, tokenised with the tokenizer in `tokenizer`.
    pub fn with_text_init(mut self, text: impl Into<String>, tokenizer: impl Into<String>) -> Self {
        self.prompt_tuning_init = PromptTuningInit::Text;
        self.prompt_tuning_init_text = Some(text.into());
        self.tokenizer_name_or_path = Some(tokenizer.into());
        self
    }
}

/// Parses a prompt-tuning config (the registry's parse function).
pub fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    let prompt = PromptLearningConfig::take(fields)?;
    let init = match fields.take_opt_string("prompt_tuning_init")?.as_deref() {
        None | Some("RANDOM") => PromptTuningInit::Random,
        Some("SAMPLE_VOCAB") => PromptTuningInit::SampleVocab,
        Some("TEXT") => PromptTuningInit::Text,
        Some(other) => {
            return Err(PeftError::config_value(
                fields.source_name(),
                "prompt_tuning_init",
                "RANDOM, SAMPLE_VOCAB or TEXT",
                format!("\"{other}\""),
            ))
        }
    };
    let text = fields.take_opt_string("prompt_tuning_init_text")?;
    let tokenizer = fields.take_opt_string("tokenizer_name_or_path")?;
    let kwargs = match fields.take_raw("tokenizer_kwargs") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v),
    };
    if init == PromptTuningInit::Text {
        for (key, present) in [
            ("tokenizer_name_or_path", tokenizer.is_some()),
            ("prompt_tuning_init_text", text.is_some()),
        ] {
            if !present {
                return Err(PeftError::MissingKey {
                    source_name: fields.source_name().to_string(),
                    key: key.into(),
                    expected: "a value when prompt_tuning_init is TEXT".into(),
                });
            }
        }
    } else if kwargs
        .as_ref()
        .is_some_and(|k| k.as_object().is_none_or(|o| !o.is_empty()))
    {
        return Err(PeftError::config_value(
            fields.source_name(),
            "tokenizer_kwargs",
            "null unless prompt_tuning_init is TEXT",
            kwargs.as_ref().map(|k| k.to_string()).unwrap_or_default(),
        ));
    }
    Ok(Box::new(PromptTuningConfig {
        prompt,
        prompt_tuning_init: init,
        prompt_tuning_init_text: text,
        tokenizer_name_or_path: tokenizer,
        tokenizer_kwargs: kwargs,
    }))
}

impl MethodConfig for PromptTuningConfig {
    fn peft_type(&self) -> &'static str {
        crate::PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        self.prompt.write(&mut out);
        out.insert(
            "prompt_tuning_init".into(),
            Value::from(self.prompt_tuning_init.as_str()),
        );
        out.insert(
            "prompt_tuning_init_text".into(),
            self.prompt_tuning_init_text
                .clone()
                .map_or(Value::Null, Value::from),
        );
        out.insert(
            "tokenizer_name_or_path".into(),
            self.tokenizer_name_or_path
                .clone()
                .map_or(Value::Null, Value::from),
        );
        out.insert(
            "tokenizer_kwargs".into(),
            self.tokenizer_kwargs.clone().unwrap_or(Value::Null),
        );
        out
    }

    fn as_prompt_method(&self) -> Option<&dyn PromptMethod> {
        Some(self)
    }

    fn as_prompt_method_mut(&mut self) -> Option<&mut dyn PromptMethod> {
        Some(self)
    }
}
