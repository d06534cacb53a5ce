//! `PrefixTuningConfig`: peft 0.21's prefix-tuning fields.

use peft_core::json::{write_derived, ConfigFields};
use peft_core::{CommonConfig, MethodConfig, PeftError, PromptLearningConfig, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The prefix-tuning configuration (peft's `PrefixTuningConfig`); the plain fields are read
/// and written by serde.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PrefixTuningConfig {
    /// The shared prompt-learning fields.
    #[serde(skip)]
    pub prompt: PromptLearningConfig,
    /// `encoder_hidden_size` of the projection MLP (null: `token_dim`).
    pub encoder_hidden_size: Option<usize>,
    /// `prefix_projection`: produce the prefixes through Linear-Tanh-Linear.
    pub prefix_projection: bool,
    /// `init_weights`: null (random) or `"zero"` (the prefixes start at zero).
    #[serde(skip)]
    pub init_zero: bool,
}

impl PrefixTuningConfig {
    /// A config with `num_virtual_tokens`, without projection.
    pub fn new(num_virtual_tokens: usize) -> Self {
        PrefixTuningConfig {
            prompt: PromptLearningConfig::new(num_virtual_tokens),
            encoder_hidden_size: None,
            prefix_projection: false,
            init_zero: false,
        }
    }

    /// Enables the projection MLP with `hidden` units (null: `token_dim`).
    pub fn with_projection(mut self, hidden: Option<usize>) -> Self {
        self.prefix_projection = true;
        self.encoder_hidden_size = hidden;
        self
    }
}

/// Parses a prefix-tuning config (the registry's parse function).
pub fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    let prompt = PromptLearningConfig::take(fields)?;
    let plain: PrefixTuningConfig = fields.take_derived()?;
    if plain.encoder_hidden_size == Some(0) {
        return Err(PeftError::config_value(
            fields.source_name(),
            "encoder_hidden_size",
            "a positive integer or null",
            0,
        ));
    }
    let init_zero = match fields.take_opt_string("init_weights")?.as_deref() {
        None => false,
        Some("zero") => true,
        Some(other) => {
            return Err(PeftError::config_value(
                fields.source_name(),
                "init_weights",
                "null or \"zero\"",
                format!("\"{other}\""),
            ))
        }
    };
    Ok(Box::new(PrefixTuningConfig {
        prompt,
        init_zero,
        ..plain
    }))
}

impl MethodConfig for PrefixTuningConfig {
    fn peft_type(&self) -> &'static str {
        crate::PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        self.prompt.write(&mut out);
        write_derived(self, &mut out);
        out.insert(
            "init_weights".into(),
            if self.init_zero {
                Value::from("zero")
            } else {
                Value::Null
            },
        );
        out
    }

    peft_core::prompt_method_casts!();
}
