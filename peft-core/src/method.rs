//! What a layer method (LoRA, IA3, ...) supplies to core: which modules it targets by
//! default, and how to build its per-layer adapter. Core does the rest: target matching, the
//! walk over the model, counting, saving, loading, merging.

use std::fmt::Debug;

use candle_core::Tensor;

use crate::config::{MethodConfig, TaskType};
use crate::error::{PeftError, Result};
use crate::layers::{EmbeddingLike, LinearLike};
use crate::model::ModelInfo;
use crate::targets::{TargetModules, TargetSpec};
use crate::vars::ParamBuilder;

/// The adapter a layer method attaches to one linear layer.
///
/// Forward with several active adapters: every adapter's [`LinearAdapter::adapt_input`] runs
/// first (in adapter order), then the base layer, then every [`LinearAdapter::adapt_output`].
pub trait LinearAdapter: Send + Sync + Debug {
    /// Transforms the input before the base layer (IA3 on feed-forward layers); `None` for
    /// no change.
    fn adapt_input(&self, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Returns the adapted output given the layer's original input `x` and the output so far.
    fn adapt_output(&self, x: &Tensor, y: Tensor, training: bool) -> Result<Tensor>;
    /// Folds the adapter into an f32 weight laid out `[out, in]` and its bias.
    fn merge(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)>;
}

/// The adapter a layer method attaches to one embedding table.
pub trait EmbeddingAdapter: Send + Sync + Debug {
    /// Returns the adapted output given the token ids and the base lookup.
    fn adapt_output(&self, ids: &Tensor, y: Tensor, training: bool) -> Result<Tensor>;
    /// Folds the adapter into an f32 table `[num_embeddings, dim]`.
    fn merge(&self, weight: &Tensor) -> Result<Tensor>;
}

/// The layer-method interface of a [`MethodConfig`].
pub trait LayerMethod: MethodConfig {
    /// Which modules the config selects.
    fn target_spec(&self) -> &TargetSpec;

    /// Mutable access to the selection; core writes the resolved `target_modules` back (the
    /// architecture's defaults, the expansion of `all-linear`), as peft does before saving.
    fn target_spec_mut(&mut self) -> &mut TargetSpec;

    /// Whether a long target list (20 entries or more) may be condensed to the shortest
    /// suffixes that select the same modules, as peft does for every method except IA3.
    fn condense_long_target_lists(&self) -> bool {
        true
    }

    /// The method's default targets for an architecture (`model_type`), used when
    /// `target_modules` is null. `None` when the method knows no default for it.
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules>;

    /// Checks the config against the model before anything is built.
    fn check_model(&self, _info: &ModelInfo, _task_type: Option<TaskType>) -> Result<()> {
        Ok(())
    }

    /// Builds the adapter for the linear layer at `path`. Parameters come from `params`
    /// (names relative to the module, e.g. `lora_A.weight`), which either initialises them or
    /// loads them from a checkpoint.
    fn wrap_linear(&self, path: &str, base: &dyn LinearLike, params: &ParamBuilder) -> Result<Box<dyn LinearAdapter>>;

    /// Builds the adapter for the embedding at `path`; by default the method cannot.
    fn wrap_embedding(
        &self,
        path: &str,
        _base: &dyn EmbeddingLike,
        _params: &ParamBuilder,
    ) -> Result<Box<dyn EmbeddingAdapter>> {
        Err(PeftError::UnsupportedModule {
            path: path.to_string(),
            kind: "an embedding".into(),
            method: self.peft_type().to_string(),
            supported: "linear layers".into(),
        })
    }
}
