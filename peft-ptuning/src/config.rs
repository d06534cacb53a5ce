//! `PromptEncoderConfig`: peft 0.21's p-tuning fields.

use peft_core::json::{write_derived, ConfigFields};
use peft_core::{CommonConfig, MethodConfig, PeftError, PromptLearningConfig, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `encoder_reparameterization_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EncoderType {
    /// `MLP`: Linear-ReLU-Linear-ReLU-Linear.
    #[default]
    Mlp,
    /// `LSTM`: a bidirectional LSTM, then Linear-ReLU-Linear.
    Lstm,
}

/// The p-tuning configuration (peft's `PromptEncoderConfig`); every field but the shared ones
/// is read and written by serde.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptEncoderConfig {
    /// The shared prompt-learning fields.
    #[serde(skip)]
    pub prompt: PromptLearningConfig,
    /// `encoder_reparameterization_type`.
    #[serde(rename = "encoder_reparameterization_type")]
    pub encoder_type: EncoderType,
    /// `encoder_hidden_size` (null: `token_dim`).
    pub encoder_hidden_size: Option<usize>,
    /// `encoder_num_layers` (LSTM layers; the MLP always has 3 linear layers).
    pub encoder_num_layers: usize,
    /// `encoder_dropout` (between LSTM layers, in training).
    pub encoder_dropout: f64,
}

impl Default for PromptEncoderConfig {
    fn default() -> Self {
        PromptEncoderConfig::new(0, EncoderType::Mlp, None)
    }
}

impl PromptEncoderConfig {
    /// A config with `num_virtual_tokens` and an MLP encoder of `hidden` units.
    pub fn new(
        num_virtual_tokens: usize,
        encoder_type: EncoderType,
        hidden: Option<usize>,
    ) -> Self {
        PromptEncoderConfig {
            prompt: PromptLearningConfig::new(num_virtual_tokens),
            encoder_type,
            encoder_hidden_size: hidden,
            encoder_num_layers: 2,
            encoder_dropout: 0.0,
        }
    }
}

/// Parses a p-tuning config (the registry's parse function).
pub fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    let config = PromptEncoderConfig {
        prompt: PromptLearningConfig::take(fields)?,
        ..fields.take_derived()?
    };
    let zero =
        |key: &str, expected: &str| PeftError::config_value(fields.source_name(), key, expected, 0);
    if config.encoder_hidden_size == Some(0) {
        return Err(zero("encoder_hidden_size", "a positive integer or null"));
    }
    if config.encoder_num_layers == 0 {
        return Err(zero("encoder_num_layers", "a positive integer"));
    }
    if config.encoder_type == EncoderType::Mlp && config.encoder_num_layers != 2 {
        tracing::warn!(
            "for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used."
        );
    }
    if !(0.0..1.0).contains(&config.encoder_dropout) {
        return Err(PeftError::config_value(
            fields.source_name(),
            "encoder_dropout",
            "a probability in [0, 1)",
            config.encoder_dropout,
        ));
    }
    Ok(Box::new(config))
}

impl MethodConfig for PromptEncoderConfig {
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
