//! `PromptEncoderConfig`: peft 0.21's p-tuning fields.

use peft_core::json::ConfigFields;
use peft_core::{
    CommonConfig, MethodConfig, PeftError, PromptLearningConfig, PromptMethod, Result,
};
use serde_json::{Map, Number, Value};

/// `encoder_reparameterization_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderType {
    /// `MLP`: Linear-ReLU-Linear-ReLU-Linear.
    Mlp,
    /// `LSTM`: a bidirectional LSTM, then Linear-ReLU-Linear.
    Lstm,
}

/// The p-tuning configuration (peft's `PromptEncoderConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptEncoderConfig {
    /// The shared prompt-learning fields.
    pub prompt: PromptLearningConfig,
    /// `encoder_reparameterization_type`.
    pub encoder_type: EncoderType,
    /// `encoder_hidden_size` (null: `token_dim`).
    pub encoder_hidden_size: Option<usize>,
    /// `encoder_num_layers` (LSTM layers; the MLP always has 3 linear layers).
    pub encoder_num_layers: usize,
    /// `encoder_dropout` (between LSTM layers, in training).
    pub encoder_dropout: f64,
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
    let prompt = PromptLearningConfig::take(fields)?;
    let encoder_type = match fields
        .take_opt_string("encoder_reparameterization_type")?
        .as_deref()
    {
        None | Some("MLP") => EncoderType::Mlp,
        Some("LSTM") => EncoderType::Lstm,
        Some(other) => {
            return Err(PeftError::config_value(
                fields.source_name(),
                "encoder_reparameterization_type",
                "MLP or LSTM",
                format!("\"{other}\""),
            ))
        }
    };
    let encoder_hidden_size = match fields.peek("encoder_hidden_size") {
        None | Some(Value::Null) => {
            fields.take_raw("encoder_hidden_size");
            None
        }
        Some(_) => {
            let hidden = fields.take_usize("encoder_hidden_size", 0)?;
            if hidden == 0 {
                return Err(PeftError::config_value(
                    fields.source_name(),
                    "encoder_hidden_size",
                    "a positive integer or null",
                    0,
                ));
            }
            Some(hidden)
        }
    };
    let encoder_num_layers = fields.take_usize("encoder_num_layers", 2)?;
    if encoder_num_layers == 0 {
        return Err(PeftError::config_value(
            fields.source_name(),
            "encoder_num_layers",
            "a positive integer",
            0,
        ));
    }
    if encoder_type == EncoderType::Mlp && encoder_num_layers != 2 {
        tracing::warn!(
            "for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used."
        );
    }
    let encoder_dropout = fields.take_f64("encoder_dropout", 0.0)?;
    if !(0.0..1.0).contains(&encoder_dropout) {
        return Err(PeftError::config_value(
            fields.source_name(),
            "encoder_dropout",
            "a probability in [0, 1)",
            encoder_dropout,
        ));
    }
    Ok(Box::new(PromptEncoderConfig {
        prompt,
        encoder_type,
        encoder_hidden_size,
        encoder_num_layers,
        encoder_dropout,
    }))
}

impl MethodConfig for PromptEncoderConfig {
    fn peft_type(&self) -> &'static str {
        crate::PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        self.prompt.write(&mut out);
        out.insert(
            "encoder_reparameterization_type".into(),
            Value::from(match self.encoder_type {
                EncoderType::Mlp => "MLP",
                EncoderType::Lstm => "LSTM",
            }),
        );
        out.insert(
            "encoder_hidden_size".into(),
            self.encoder_hidden_size.map_or(Value::Null, Value::from),
        );
        out.insert(
            "encoder_num_layers".into(),
            Value::from(self.encoder_num_layers),
        );
        out.insert(
            "encoder_dropout".into(),
            Value::Number(
                Number::from_f64(self.encoder_dropout).unwrap_or_else(|| Number::from(0)),
            ),
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
