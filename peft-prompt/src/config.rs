//! `PromptTuningConfig`: peft 0.21's prompt-tuning fields.

use peft_core::json::{write_derived, ConfigFields};
use peft_core::{CommonConfig, MethodConfig, PeftError, PromptLearningConfig, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `prompt_tuning_init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PromptTuningInit {
    /// `RANDOM`: normal with std 1 (`nn.Embedding`'s default).
    #[default]
    Random,
    /// `SAMPLE_VOCAB`: embeddings of random vocabulary tokens.
    SampleVocab,
    /// `TEXT`: embeddings of `prompt_tuning_init_text`.
    Text,
}

/// The prompt-tuning configuration (peft's `PromptTuningConfig`); every field but the shared
/// ones is read and written by serde.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptTuningConfig {
    /// The shared prompt-learning fields.
    #[serde(skip)]
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
    let config = PromptTuningConfig {
        prompt: PromptLearningConfig::take(fields)?,
        ..fields.take_derived()?
    };
    let kwargs = &config.tokenizer_kwargs;
    if config.prompt_tuning_init == PromptTuningInit::Text {
        for (key, present) in [
            (
                "tokenizer_name_or_path",
                config.tokenizer_name_or_path.is_some(),
            ),
            (
                "prompt_tuning_init_text",
                config.prompt_tuning_init_text.is_some(),
            ),
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
    Ok(Box::new(config))
}

impl MethodConfig for PromptTuningConfig {
    fn peft_type(&self) -> &'static str {
        crate::PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        self.prompt.write(&mut out);
        write_derived(self, &mut out);
        out
    }

    peft_core::prompt_method_casts!();
}
