//! `peft-prompt`: prompt tuning for peft-rs, checkpoint-compatible with peft's
//! `PromptTuningConfig` (`peft_type` `PROMPT_TUNING`).
//!
//! Prompt tuning learns `num_virtual_tokens` embeddings that are prepended to every input's
//! token embeddings; the frozen model is otherwise untouched. Initialisation as peft does it:
//! `RANDOM` (normal), `SAMPLE_VOCAB` (rows of the model's embedding for random token ids) or
//! `TEXT` (the embeddings of `prompt_tuning_init_text`, tokenised with the tokenizer in
//! `tokenizer_name_or_path` and repeated or truncated to length). The checkpoint holds the
//! embeddings as `prompt_embeddings`. Core prepends them and extends the attention mask and
//! labels (see `peft_core::prompt`).

pub mod config;

use candle_core::{DType, Tensor};
use peft_core::method::PROMPT_EMBEDDINGS;
use peft_core::{
    AdaptableModel, Init, MethodRegistration, ParamBuilder, PeftError, PromptEncoder, PromptKind,
    PromptLearningConfig, PromptMethod, Result, StoredPrompt, TaskType,
};
use rand_index::random_ids;

pub use config::{PromptTuningConfig, PromptTuningInit};

/// peft's in-memory name of the prompt table (`prompt_encoder.<adapter>.embedding.weight`).
const EMBEDDING: &str = "embedding.weight";

/// The `peft_type` this crate registers.
pub const PEFT_TYPE: &str = "PROMPT_TUNING";

peft_core::register_method!(MethodRegistration {
    peft_type: PEFT_TYPE,
    description: "Prompt tuning: trained virtual-token embeddings prepended to the input",
    crate_name: env!("CARGO_PKG_NAME"),
    parse: config::parse,
});

mod rand_index {
    use peft_core::rand::rngs::StdRng;
    use peft_core::rand::Rng;

    /// `n` token ids drawn uniformly from `0..vocab` (peft's `torch.randint`).
    pub fn random_ids(n: usize, vocab: usize, rng: &mut StdRng) -> Vec<u32> {
        (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
    }
}

/// Token ids of `text` as peft's `tokenizer(text)["input_ids"]` gives them (special tokens
/// added), repeated or truncated to `n`.
pub fn init_token_ids(tokenizer_dir: &str, text: &str, n: usize) -> Result<Vec<u32>> {
    let path = std::path::Path::new(tokenizer_dir);
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    if !file.is_file() {
        return Err(PeftError::io(
            &file,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "tokenizer_name_or_path must be a local folder holding tokenizer.json (or the file itself)",
            ),
        ));
    }
    let tokenizer =
        tokenizers::Tokenizer::from_file(&file).map_err(|e| PeftError::BadCheckpoint {
            path: file.clone(),
            format: "tokenizer.json".into(),
            reason: e.to_string(),
        })?;
    let encoding = tokenizer.encode(text, true).map_err(|e| {
        PeftError::bad_input(
            "prompt_tuning_init_text",
            "text the tokenizer can encode",
            e.to_string(),
        )
    })?;
    let ids = encoding.get_ids();
    if ids.is_empty() {
        return Err(PeftError::config_value(
            "adapter config",
            "prompt_tuning_init_text",
            "text that tokenizes to at least one token",
            "no tokens",
        ));
    }
    Ok(ids.iter().copied().cycle().take(n).collect())
}

impl PromptMethod for PromptTuningConfig {
    fn prepare(&mut self, info: &peft_core::ModelInfo, task_type: Option<TaskType>) -> Result<()> {
        self.prompt.prepare(info, task_type, false)
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
        model: &dyn AdaptableModel,
    ) -> Result<Box<dyn PromptEncoder>> {
        let shape = self.saved_shape();
        let [rows, _] = shape;
        let embed_rows = |ids: Vec<u32>| -> Result<Tensor> {
            let ids = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
            Ok(model.embed_tokens(&ids)?.squeeze(0)?.to_dtype(DType::F32)?)
        };
        let loading =
            params.source_contains(PROMPT_EMBEDDINGS) || params.source_contains(EMBEDDING);
        let embeddings = match (&self.prompt_tuning_init, loading) {
            (_, true) | (PromptTuningInit::Random, _) => {
                // nn.Embedding's default init.
                return Ok(Box::new(StoredPrompt::new(
                    params,
                    EMBEDDING,
                    shape,
                    Init::Normal {
                        mean: 0.0,
                        std: 1.0,
                    },
                )?));
            }
            (PromptTuningInit::SampleVocab, false) => {
                let vocab = model.info().vocab_size;
                params.get_with(&shape, EMBEDDING, |rng| {
                    embed_rows(random_ids(rows, vocab, rng))
                })?
            }
            (PromptTuningInit::Text, false) => {
                let (Some(dir), Some(text)) =
                    (&self.tokenizer_name_or_path, &self.prompt_tuning_init_text)
                else {
                    unreachable!("the config parser requires both for TEXT")
                };
                let ids = init_token_ids(dir, text, rows)?;
                params.get_with(&shape, EMBEDDING, |_| embed_rows(ids.clone()))?
            }
        };
        Ok(Box::new(StoredPrompt::from_tensor(embeddings)))
    }
}
