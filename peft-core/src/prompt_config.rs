//! The fields every prompt-learning method shares (peft's `PromptLearningConfig`), and their
//! completion from the model (peft's `_prepare_prompt_learning_config`). Prompt tuning,
//! p-tuning and prefix tuning each embed this struct in their own config.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::TaskType;
use crate::error::{PeftError, Result};
use crate::json::ConfigFields;
use crate::model::ModelInfo;

/// peft's `PromptLearningConfig` fields.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptLearningConfig {
    /// `num_virtual_tokens` (required, at least 1).
    pub num_virtual_tokens: usize,
    /// `token_dim`: the width of one virtual token (null: the model's hidden size; for prefix
    /// tuning, `head_dim * num_key_value_heads`).
    pub token_dim: Option<usize>,
    /// `num_transformer_submodules`: 1 for decoder-only models, 2 for encoder-decoders.
    pub num_transformer_submodules: Option<usize>,
    /// `num_attention_heads` (for prefix tuning: the key/value heads).
    pub num_attention_heads: Option<usize>,
    /// `num_layers`.
    pub num_layers: Option<usize>,
    /// `modules_to_save`: modules trained and saved in full beside the prompt (classifier heads).
    pub modules_to_save: Option<Vec<String>>,
}

const SOURCE: &str = "adapter config";

impl PromptLearningConfig {
    /// A config with `num_virtual_tokens` and every model-dependent field left to the model.
    pub fn new(num_virtual_tokens: usize) -> Self {
        PromptLearningConfig {
            num_virtual_tokens,
            token_dim: None,
            num_transformer_submodules: None,
            num_attention_heads: None,
            num_layers: None,
            modules_to_save: None,
        }
    }

    /// Takes the shared fields from an `adapter_config.json` object.
    pub fn take(fields: &mut ConfigFields) -> Result<Self> {
        if fields.peek("num_virtual_tokens").is_none_or(Value::is_null) {
            return Err(PeftError::MissingKey {
                source_name: fields.source_name().to_string(),
                key: "num_virtual_tokens".into(),
                expected: "the number of virtual tokens (a positive integer)".into(),
            });
        }
        let out: PromptLearningConfig = fields.take_derived()?;
        if out.num_virtual_tokens == 0 {
            return Err(PeftError::config_value(
                fields.source_name(),
                "num_virtual_tokens",
                "a positive integer",
                0,
            ));
        }
        for (key, v) in [
            ("token_dim", out.token_dim),
            ("num_transformer_submodules", out.num_transformer_submodules),
            ("num_attention_heads", out.num_attention_heads),
            ("num_layers", out.num_layers),
        ] {
            if v == Some(0) {
                return Err(PeftError::config_value(
                    fields.source_name(),
                    key,
                    "a positive integer or null",
                    0,
                ));
            }
        }
        Ok(out)
    }

    /// Writes the shared fields.
    pub fn write(&self, out: &mut Map<String, Value>) {
        crate::json::write_derived(self, out);
    }

    /// Fills the null fields from the model and checks the rest against it. With `prefix`,
    /// `token_dim` and `num_attention_heads` become the key/value width and heads (peft does
    /// this for grouped-query attention, overriding any value given).
    pub fn prepare(
        &mut self,
        info: &ModelInfo,
        task_type: Option<TaskType>,
        prefix: bool,
    ) -> Result<()> {
        let submodules = *self.num_transformer_submodules.get_or_insert(
            if task_type == Some(TaskType::Seq2SeqLm) {
                2
            } else {
                1
            },
        );
        let allowed = if info.is_encoder_decoder {
            1..=2
        } else {
            1..=1
        };
        if !allowed.contains(&submodules) {
            let expected = if info.is_encoder_decoder {
                "1 or 2 for an encoder-decoder".to_string()
            } else {
                format!("1 for the decoder-only model `{}`", info.model_type)
            };
            return Err(PeftError::config_value(
                SOURCE,
                "num_transformer_submodules",
                expected,
                submodules,
            ));
        }
        let layers = *self.num_layers.get_or_insert(info.num_layers);
        let token_dim = *self.token_dim.get_or_insert(info.hidden_size);
        self.num_attention_heads
            .get_or_insert(info.num_attention_heads);
        if prefix {
            if layers != info.num_layers {
                return Err(PeftError::config_value(
                    SOURCE,
                    "num_layers",
                    format!("the model's {} layers", info.num_layers),
                    layers,
                ));
            }
            self.token_dim = Some(info.head_dim * info.num_key_value_heads);
            self.num_attention_heads = Some(info.num_key_value_heads);
        } else if token_dim != info.hidden_size {
            return Err(PeftError::config_value(
                SOURCE,
                "token_dim",
                format!("the model's hidden size {}", info.hidden_size),
                token_dim,
            ));
        }
        Ok(())
    }

    /// `num_virtual_tokens * num_transformer_submodules`.
    pub fn total_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens * self.num_transformer_submodules.unwrap_or(1)
    }

    /// `token_dim`, after [`PromptLearningConfig::prepare`].
    pub fn token_dim(&self) -> Result<usize> {
        self.token_dim.ok_or_else(|| {
            PeftError::InvalidState("token_dim is unknown before the config is prepared".into())
        })
    }
}
