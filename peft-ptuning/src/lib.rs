//! `peft-ptuning`: p-tuning for peft-rs, checkpoint-compatible with peft's
//! `PromptEncoderConfig` (`peft_type` `P_TUNING`).
//!
//! P-tuning learns virtual-token embeddings through a small encoder trained end to end: an
//! MLP (Linear-ReLU-Linear-ReLU-Linear) or a bidirectional LSTM followed by Linear-ReLU-Linear,
//! over an embedding table of `num_virtual_tokens` rows. As in peft, the checkpoint holds only
//! the encoder's output (`prompt_embeddings`); an adapter loaded from a checkpoint uses that
//! tensor directly (trainable if asked, rather than feeding it through a fresh encoder).

pub mod config;
pub mod lstm;

use candle_core::Tensor;
use peft_core::method::PROMPT_EMBEDDINGS;
use peft_core::nn::Linear;
use peft_core::{
    AdaptableModel, Init, MethodRegistration, ModelInfo, ParamBuilder, PromptEncoder, PromptKind,
    PromptLearningConfig, PromptMethod, Result, StoredPrompt, TaskType,
};

pub use config::{EncoderType, PromptEncoderConfig};
use lstm::BiLstm;

/// The `peft_type` this crate registers.
pub const PEFT_TYPE: &str = "P_TUNING";

peft_core::register_method!(MethodRegistration {
    peft_type: PEFT_TYPE,
    description: "P-tuning: virtual tokens produced by a trained MLP or LSTM prompt encoder",
    crate_name: env!("CARGO_PKG_NAME"),
    parse: config::parse,
});

#[derive(Debug)]
enum Head {
    Mlp([Linear; 3]),
    Lstm(Box<BiLstm>, [Linear; 2]),
}

/// peft's `PromptEncoder` with its parameter names (`embedding.weight`, `mlp_head.0.weight`,
/// `lstm_head.weight_ih_l0`, ...).
#[derive(Debug)]
pub struct PTuningEncoder {
    embedding: Tensor,
    head: Head,
}

impl PTuningEncoder {
    /// Builds (or loads) the encoder for `rows` virtual tokens of width `dim`.
    pub fn new(
        params: &ParamBuilder,
        cfg: &PromptEncoderConfig,
        rows: usize,
        dim: usize,
    ) -> Result<Self> {
        let hidden = cfg.encoder_hidden_size.unwrap_or(dim);
        let embedding = params.pp("embedding").get(
            &[rows, dim],
            "weight",
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
        )?;
        let mlp = params.pp("mlp_head");
        let head = match cfg.encoder_type {
            EncoderType::Mlp => Head::Mlp([
                Linear::new(&mlp.pp("0"), dim, hidden, true)?,
                Linear::new(&mlp.pp("2"), hidden, hidden, true)?,
                Linear::new(&mlp.pp("4"), hidden, dim, true)?,
            ]),
            EncoderType::Lstm => Head::Lstm(
                Box::new(BiLstm::new(
                    &params.pp("lstm_head"),
                    dim,
                    hidden,
                    cfg.encoder_num_layers,
                    cfg.encoder_dropout,
                )?),
                [
                    Linear::new(&mlp.pp("0"), 2 * hidden, 2 * hidden, true)?,
                    Linear::new(&mlp.pp("2"), 2 * hidden, dim, true)?,
                ],
            ),
        };
        Ok(PTuningEncoder { embedding, head })
    }
}

impl PromptEncoder for PTuningEncoder {
    fn forward(&self, training: bool) -> Result<Tensor> {
        match &self.head {
            Head::Mlp([a, b, c]) => {
                let h = a.forward(&self.embedding)?.relu()?;
                let h = b.forward(&h)?.relu()?;
                c.forward(&h)
            }
            Head::Lstm(lstm, [a, b]) => {
                let h = lstm.forward(&self.embedding, training)?;
                b.forward(&a.forward(&h)?.relu()?)
            }
        }
    }
}

impl PromptMethod for PromptEncoderConfig {
    fn prepare(&mut self, info: &ModelInfo, task_type: Option<TaskType>) -> Result<()> {
        self.prompt.prepare(info, task_type, false)?;
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
        PromptKind::Prepend
    }

    fn saved_shape(&self) -> [usize; 2] {
        [
            self.prompt.total_virtual_tokens(),
            self.prompt.token_dim.unwrap_or(0),
        ]
    }

    fn build(
        &self,
        params: &ParamBuilder,
        _model: &dyn AdaptableModel,
    ) -> Result<Box<dyn PromptEncoder>> {
        let [rows, dim] = self.saved_shape();
        if params.source_contains(PROMPT_EMBEDDINGS) {
            return Ok(Box::new(StoredPrompt::new(
                params,
                PROMPT_EMBEDDINGS,
                [rows, dim],
                Init::Zeros,
            )?));
        }
        Ok(Box::new(PTuningEncoder::new(params, self, rows, dim)?))
    }
}
