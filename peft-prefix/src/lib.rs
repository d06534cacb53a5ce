//! `peft-prefix`: prefix tuning for peft-rs, checkpoint-compatible with peft's
//! `PrefixTuningConfig` (`peft_type` `PREFIX_TUNING`).
//!
//! Prefix tuning learns, for every attention layer, keys and values for `num_virtual_tokens`
//! extra positions that every real token can attend to. They come from an embedding table of
//! width `num_layers * 2 * token_dim` or, with `prefix_projection`, from a smaller embedding
//! through Linear-Tanh-Linear. With grouped-query attention `token_dim` is
//! `head_dim * num_key_value_heads`, as in peft. The checkpoint holds the encoder output
//! (`prompt_embeddings`, `[num_virtual_tokens, num_layers * 2 * token_dim]`); core turns it into
//! a KV cache that is there from the first decoding step on (see `peft_core::prompt`).

pub mod config;

use candle_core::Tensor;
use peft_core::method::PROMPT_EMBEDDINGS;
use peft_core::nn::Linear;
use peft_core::{
    AdaptableModel, Init, MethodRegistration, ModelInfo, ParamBuilder, PromptEncoder, PromptKind,
    PromptLearningConfig, PromptMethod, Result, StoredPrompt, TaskType,
};

pub use config::PrefixTuningConfig;

/// The `peft_type` this crate registers.
pub const PEFT_TYPE: &str = "PREFIX_TUNING";

peft_core::register_method!(MethodRegistration {
    peft_type: PEFT_TYPE,
    description: "Prefix tuning: trained key/value prefixes in every attention layer",
    crate_name: env!("CARGO_PKG_NAME"),
    parse: config::parse,
});

/// peft's `PrefixEncoder` with projection (`embedding.weight`, `transform.0.*`, `transform.2.*`).
#[derive(Debug)]
pub struct ProjectedPrefix {
    embedding: Tensor,
    down: Linear,
    up: Linear,
}

impl PromptEncoder for ProjectedPrefix {
    fn forward(&self, _training: bool) -> Result<Tensor> {
        self.up
            .forward(&self.down.forward(&self.embedding)?.tanh()?)
    }
}

impl PromptMethod for PrefixTuningConfig {
    fn prepare(&mut self, info: &ModelInfo, task_type: Option<TaskType>) -> Result<()> {
        self.prompt.prepare(info, task_type, true)?;
        if self.encoder_hidden_size.is_none() {
            self.encoder_hidden_size = self.prompt.token_dim;
        }
        Ok(())
    }

    fn prompt_config(&self) -> &PromptLearningConfig {
        &self.prompt
    }

    fn prompt_config_mut(&mut self) -> &mut PromptLearningConfig {
        &mut self.prompt
    }

    fn kind(&self) -> PromptKind {
        let heads = self.prompt.num_attention_heads.unwrap_or(1).max(1);
        PromptKind::Prefix {
            num_layers: self.prompt.num_layers.unwrap_or(0),
            num_heads: heads,
            head_dim: self.prompt.token_dim.unwrap_or(0) / heads,
            submodules: self.prompt.num_transformer_submodules.unwrap_or(1),
        }
    }

    fn saved_shape(&self) -> [usize; 2] {
        let width = self.prompt.num_layers.unwrap_or(0) * 2 * self.prompt.token_dim.unwrap_or(0);
        [self.prompt.num_virtual_tokens, width]
    }

    fn build(
        &self,
        params: &ParamBuilder,
        _model: &dyn AdaptableModel,
    ) -> Result<Box<dyn PromptEncoder>> {
        let shape = self.saved_shape();
        let init = if self.init_zero {
            Init::Zeros
        } else {
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            }
        };
        if params.source_contains(PROMPT_EMBEDDINGS) || !self.prefix_projection {
            return Ok(Box::new(StoredPrompt::new(
                params,
                "embedding.weight",
                shape,
                init,
            )?));
        }
        let token_dim = self.prompt.token_dim()?;
        let hidden = self.encoder_hidden_size.unwrap_or(token_dim);
        let transform = params.pp("transform");
        let up = if self.init_zero {
            Linear::with_init(&transform.pp("2"), hidden, shape[1], true, Init::Zeros)?
        } else {
            Linear::new(&transform.pp("2"), hidden, shape[1], true)?
        };
        Ok(Box::new(ProjectedPrefix {
            embedding: params.pp("embedding").get(
                &[shape[0], token_dim],
                "weight",
                Init::Normal {
                    mean: 0.0,
                    std: 1.0,
                },
            )?,
            down: Linear::new(&transform.pp("0"), token_dim, hidden, true)?,
            up,
        }))
    }
}
