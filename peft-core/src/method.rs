//! What a method supplies to core. A layer method (LoRA, IA3, ...) says which modules it
//! targets by default and how to build its per-layer adapter; a prompt-learning method (prompt
//! tuning, p-tuning, prefix tuning) builds an encoder that produces virtual-token embeddings or
//! key/value prefixes. Core does the rest: target matching, the walk over the model, injecting
//! prompts, counting, saving, loading, merging.

use std::collections::BTreeMap;
use std::fmt::Debug;

use candle_core::Tensor;

use crate::combine::{Combination, CombinePart};
use crate::config::{MethodConfig, TaskType};
use crate::error::{PeftError, Result};
use crate::layers::{EmbeddingLike, LinearLike};
use crate::model::{AdaptableModel, ModelInfo};
use crate::prompt_config::PromptLearningConfig;
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
    /// `base` is the layer the adapters run on (the frozen base, or the base with other
    /// adapters merged into it), for adapters whose output depends on its weights (DoRA).
    /// By default the output is unchanged (adapters that only transform the input: HRA, OFT).
    fn adapt_output(
        &self,
        _base: &dyn LinearLike,
        _x: &Tensor,
        y: Tensor,
        _training: bool,
    ) -> Result<Tensor> {
        Ok(y)
    }
    /// The base layer's output and this adapter's in one fused computation, when this adapter
    /// is the only one running on the layer and can do better than base-then-adapt (LoRA on a
    /// dense f32 CPU layer); `None` to take the general path. Must equal
    /// `adapt_output(base, x, base.forward(x), training)`.
    fn fused_forward(
        &self,
        _base: &dyn LinearLike,
        _x: &Tensor,
        _training: bool,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Whether [`LinearAdapter::merge`] can fold this adapter into the base weights. A method
    /// that cannot merge says `false` (its `merge` is then never called), and merging refuses
    /// with the layer's path before any layer changes.
    fn mergeable(&self) -> bool {
        true
    }
    /// Folds the adapter into an f32 weight laid out `[out, in]` and its bias. With several
    /// adapters merged in turn, `weight` already holds the earlier ones; `base_weight` is the
    /// layer's own weight (f32, `[out, in]`) for adapters whose update depends on it (DoRA's
    /// weight norm, as peft computes it from the unmerged weight).
    fn merge(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        base_weight: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)>;
    /// After a hot-swap wrote new values into this adapter's parameters
    /// ([`crate::PeftModel::hotswap_adapter`]): take the settings that are not parameters for
    /// the module `path` from the new `config` (LoRA's scaling from its rank and alpha there).
    fn hotswap_settings(&self, _path: &str, _config: &dyn MethodConfig) -> Result<()> {
        Ok(())
    }
    /// A new weight for the base layer that this adapter's initialisation computed (LoRA's
    /// PiSSA and OLoRA move the leading part of the weight into the adapter and leave the
    /// residual), in the layer's stored layout, f32. Core writes it into the base layer when it
    /// attaches the adapter (quantized layers are requantized), once: the first call hands the
    /// weight over, later calls return `None`. The base stays rewritten when the adapter is
    /// disabled or deleted, as in peft.
    fn take_rewritten_base(&self) -> Option<Tensor> {
        None
    }
    /// A layer that replaces the base layer outright while this adapter is active (a
    /// `modules_to_save` copy); `None` for adapters that modify the base layer's computation.
    fn replacement(&self) -> Option<&(dyn LinearLike + 'static)> {
        None
    }
}

/// The adapter a layer method attaches to one embedding table.
pub trait EmbeddingAdapter: Send + Sync + Debug {
    /// Returns the adapted output given the token ids and the lookup so far; `base` is the
    /// table the adapters run on (see [`LinearAdapter::adapt_output`]).
    fn adapt_output(
        &self,
        base: &dyn EmbeddingLike,
        ids: &Tensor,
        y: Tensor,
        training: bool,
    ) -> Result<Tensor>;
    /// Whether [`EmbeddingAdapter::merge`] can fold this adapter into the table (see
    /// [`LinearAdapter::mergeable`]).
    fn mergeable(&self) -> bool {
        true
    }
    /// Folds the adapter into an f32 table `[num_embeddings, dim]`; `base_weight` is the
    /// table's own (unmerged) weight in f32 (see [`LinearAdapter::merge`]).
    fn merge(&self, weight: &Tensor, base_weight: &Tensor) -> Result<Tensor>;
    /// See [`LinearAdapter::hotswap_settings`].
    fn hotswap_settings(&self, _path: &str, _config: &dyn MethodConfig) -> Result<()> {
        Ok(())
    }
    /// A table that replaces the base table while this adapter is active (`modules_to_save`).
    fn replacement(&self) -> Option<&(dyn EmbeddingLike + 'static)> {
        None
    }
}

/// Which of the base model's biases an adapter trains and saves with itself (peft's `bias`
/// field: `"none"`, `"all"`, `"<method>_only"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrainedBiases {
    /// None (`"none"`).
    #[default]
    None,
    /// Every bias of the model (`"all"`): linear layers' and norms', saved under their own
    /// names (`<path>.base_layer.bias` for a layer an adapter wraps).
    All,
    /// The biases of the layers this adapter targets (`"lora_only"` and the like).
    TargetsOnly,
}

impl TrainedBiases {
    /// Reads peft's `bias` field (`"none"` when absent or null): `"none"`, `"all"`, or a value
    /// ending in `_only` (the method's own `only`, `"hra_only"`, `"boft_only"`, ...: peft's
    /// generic `_mark_only_adapters_as_trainable` takes any `*_only` for the adapted layers'
    /// biases; it is written back as `only`).
    pub fn take(fields: &mut crate::json::ConfigFields, only: &str) -> Result<Self> {
        match fields.take_opt_string("bias")?.as_deref() {
            None | Some("none") => Ok(TrainedBiases::None),
            Some("all") => Ok(TrainedBiases::All),
            Some(s) if s.ends_with("_only") => Ok(TrainedBiases::TargetsOnly),
            Some(s) => Err(PeftError::config_value(
                fields.source_name(),
                "bias",
                format!("\"none\", \"all\" or \"{only}\""),
                format!("\"{s}\""),
            )),
        }
    }

    /// The `bias` value peft writes, `only` naming [`TrainedBiases::TargetsOnly`].
    pub fn as_str(self, only: &str) -> String {
        match self {
            TrainedBiases::None => "none".into(),
            TrainedBiases::All => "all".into(),
            TrainedBiases::TargetsOnly => only.into(),
        }
    }
}

/// An adapter converted by [`LayerMethod::convert_from_initial`]: its config and checkpoint
/// tensors.
pub type ConvertedAdapter = (Box<dyn MethodConfig>, Vec<(String, Tensor)>);

/// The layer-method interface of a [`MethodConfig`].
pub trait LayerMethod: MethodConfig {
    /// Which modules the config selects.
    fn target_spec(&self) -> &TargetSpec;

    /// Mutable access to the selection; core writes the resolved `target_modules` back (the
    /// architecture's defaults, the expansion of `all-linear`), as peft does before saving.
    fn target_spec_mut(&mut self) -> &mut TargetSpec;

    /// Called with the weight layout of each targeted linear layer (`true`: stored `[in, out]`,
    /// GPT-2's Conv1D) before any is wrapped, so a method can record it (peft rewrites
    /// `fan_in_fan_out` to match, with a warning).
    fn observe_weight_layout(&mut self, _transposed: bool) {}

    /// Called with `(in_features, out_features)` of each targeted linear layer before any is
    /// wrapped, so a method with state shared across layers can size it (VeRA's projections
    /// span the largest input and output).
    fn observe_target_shape(&mut self, _in_features: usize, _out_features: usize) {}

    /// Whether a long target list (20 entries or more) may be condensed to the shortest
    /// suffixes that select the same modules, as peft does for every method except IA3.
    fn condense_long_target_lists(&self) -> bool {
        true
    }

    /// The method's default targets for an architecture (`model_type`), used when
    /// `target_modules` is null. `None` when the method knows no default for it.
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules>;

    /// Completes and checks the config for a model before anything is built (peft's
    /// `_prepare_adapter_config`: model-dependent defaults such as IA3's feed-forward modules).
    fn prepare(&mut self, _info: &ModelInfo, _task_type: Option<TaskType>) -> Result<()> {
        Ok(())
    }

    /// Which base biases the adapter trains (peft's `bias`); they live in the base model, so
    /// the last adapter loaded sets them, as in peft, and disabling an adapter keeps them.
    fn trained_biases(&self) -> TrainedBiases {
        TrainedBiases::None
    }

    /// The config of an adapter combining adapters of this method whose configs are `inputs`
    /// (this one first), for [`crate::PeftModel::add_weighted_adapter`]: resolve
    /// `how.kind` (the method's default when `None`), check the inputs can be combined that
    /// way, and return the new config (ranks, targets: peft's `_check_add_weighted_adapter`).
    /// By default the method cannot combine.
    fn combined_config(
        &self,
        _inputs: &[&dyn MethodConfig],
        _how: &mut Combination,
    ) -> Result<Box<dyn MethodConfig>> {
        Err(PeftError::InvalidState(format!(
            "{} adapters cannot be combined (the method has no weighted combination)",
            self.peft_type()
        )))
    }

    /// The combined adapter's values at the module `path`, called on the combined config:
    /// `parts` are the inputs that adapt the module, `target` the new adapter's parameters
    /// there as injected (by name relative to the module). Returns new values for some or all
    /// of them, shaped as in `target`.
    fn combine_module(
        &self,
        path: &str,
        _parts: &[CombinePart<'_>],
        _target: &BTreeMap<String, Tensor>,
        _how: &Combination,
    ) -> Result<BTreeMap<String, Tensor>> {
        Err(PeftError::InvalidState(format!(
            "{path}: {} adapters cannot be combined",
            self.peft_type()
        )))
    }

    /// The name of peft's tuner model class for this method (`get_model_status`'s
    /// `adapter_model_type`): `<PEFT_TYPE>Model` by default (`IA3Model`).
    fn tuner_class_name(&self) -> String {
        format!("{}Model", self.peft_type())
    }

    /// peft's layer class as `get_layer_status` reports it (`module_type`, the start of the
    /// layer's repr): `Linear` / `Embedding` by default (IA3's layers print so); LoRA's print
    /// `lora.Linear` / `lora.Embedding`.
    fn layer_class_name(&self, embedding: bool) -> String {
        if embedding { "Embedding" } else { "Linear" }.to_string()
    }

    /// Whether an adapter of this config can be hot-swapped for one of config `new`
    /// ([`crate::PeftModel::hotswap_adapter`]; peft's `check_hotswap_configs_compatible`: the
    /// settings that change outputs besides the weights must agree). `resized` lists the
    /// modules whose new parameters were zero-padded (a smaller rank) or zero-filled (absent)
    /// to the loaded shapes. Returns the config the swapped adapter is saved with: one that
    /// reloads to the same outputs (LoRA: the loaded rank and an alpha that keeps the new
    /// scaling on resized modules). By default the method cannot be hot-swapped.
    fn hotswap_config(
        &self,
        _new: &dyn MethodConfig,
        _resized: &[String],
    ) -> Result<Box<dyn MethodConfig>> {
        Err(PeftError::InvalidState(format!(
            "hot-swapping supports LoRA adapters only (as in peft), not {}",
            self.peft_type()
        )))
    }

    /// For [`crate::PeftModel::save_adapter_converted`] (peft's `save_pretrained(...,
    /// path_initial_model_for_weight_conversion=...)`): this config with the initialisation
    /// reset to the one that leaves the base alone (LoRA: `init_lora_weights=true`), as peft
    /// writes it to the initial adapter's folder. By default the method cannot be converted.
    fn conversion_initial_config(&self) -> Result<Box<dyn MethodConfig>> {
        Err(PeftError::InvalidState(format!(
            "{} adapters cannot be converted against an initial adapter (peft converts \
             PiSSA/OLoRA LoRA adapters only)",
            self.peft_type()
        )))
    }

    /// Converts an adapter trained over a base its initialisation rewrote (PiSSA, OLoRA) into
    /// one over the original base: `trained` are the adapter's checkpoint tensors (peft's
    /// keys), `initial` those saved right after initialisation. Returns the converted
    /// adapter's config and tensors (LoRA: `ΔW = B A - B₀ A₀ = [B | -B₀] [A ; A₀]`, rank and
    /// alpha doubled).
    fn convert_from_initial(
        &self,
        _trained: &[(String, Tensor)],
        _initial: &[(String, Tensor)],
    ) -> Result<ConvertedAdapter> {
        Err(PeftError::InvalidState(format!(
            "{} adapters cannot be converted against an initial adapter",
            self.peft_type()
        )))
    }

    /// Builds the adapter for the linear layer at `path`. Parameters come from `params`
    /// (names relative to the module, e.g. `lora_A.weight`), which either initialises them or
    /// loads them from a checkpoint.
    fn wrap_linear(
        &self,
        path: &str,
        base: &dyn LinearLike,
        params: &ParamBuilder,
    ) -> Result<Box<dyn LinearAdapter>>;

    /// With `ensure_weight_tying`: builds the adapter of the output head at `path` whose weight
    /// is the input embedding `embedding`'s table, tied to the embedding's adapter (which core
    /// builds too, under `root.pp(embedding)`): it reads the embedding adapter's parameters and
    /// registers its own names as aliases ([`ParamBuilder::alias`]), as peft's tied LoRA
    /// (`lora_A = lora_embedding_Bᵀ`, `lora_B = lora_embedding_Aᵀ`). By default the method
    /// cannot tie.
    fn wrap_tied_linear(
        &self,
        path: &str,
        _base: &dyn LinearLike,
        _embedding: &str,
        _root: &ParamBuilder,
    ) -> Result<Box<dyn LinearAdapter>> {
        Err(PeftError::UnsupportedModule {
            path: path.to_string(),
            kind: "an output head tied to the input embedding".into(),
            method: format!("{} with ensure_weight_tying=true", self.peft_type()),
            supported: "untied layers (the method cannot tie adapters)".into(),
        })
    }

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

/// How a prompt-learning method's output reaches the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    /// Virtual-token embeddings `[num_virtual_tokens, hidden]` prepended to the input
    /// embeddings (prompt tuning, p-tuning); causal-LM logits include their positions.
    Prepend,
    /// Per-layer key/value prefixes, `[num_virtual_tokens, num_layers * 2 * heads * head_dim]`
    /// laid out as peft's prefix encoder output; fed to attention as cached positions.
    Prefix {
        /// Layers the prefix covers.
        num_layers: usize,
        /// Key/value heads of one layer's prefix.
        num_heads: usize,
        /// Width of one head.
        head_dim: usize,
        /// `num_transformer_submodules` (2 for encoder-decoders, whose decoder gets the
        /// prefixes in peft's interleaved order).
        submodules: usize,
    },
}

/// A prompt-learning method's encoder: produces what peft saves as `prompt_embeddings`.
pub trait PromptEncoder: Send + Sync + Debug {
    /// The encoder output for every virtual token, `[rows, width]` (f32). `training` switches
    /// dropout inside the encoder.
    fn forward(&self, training: bool) -> Result<Tensor>;
}

/// The prompt-learning interface of a [`MethodConfig`].
pub trait PromptMethod: MethodConfig {
    /// Fills the model-dependent fields left null (`num_layers`, `token_dim`,
    /// `num_attention_heads`, `num_transformer_submodules`, ...) as peft's
    /// `_prepare_prompt_learning_config` does, and checks the result against the model.
    fn prepare(&mut self, info: &ModelInfo, task_type: Option<TaskType>) -> Result<()>;

    /// The shared prompt-learning fields.
    fn prompt_config(&self) -> &PromptLearningConfig;

    /// Mutable access to the shared fields (core records `modules_to_save` through it).
    fn prompt_config_mut(&mut self) -> &mut PromptLearningConfig;

    /// Virtual tokens per transformer submodule.
    fn num_virtual_tokens(&self) -> usize {
        self.prompt_config().num_virtual_tokens
    }

    /// How the output reaches the model.
    fn kind(&self) -> PromptKind;

    /// `[rows, width]` of `prompt_embeddings` as saved.
    fn saved_shape(&self) -> [usize; 2];

    /// Builds the encoder. Its parameters come from `params`: freshly initialised, or loaded.
    /// When a checkpoint holds `prompt_embeddings` (what peft saves), the encoder must use that
    /// tensor directly, as peft does in inference mode.
    fn build(
        &self,
        params: &ParamBuilder,
        model: &dyn AdaptableModel,
    ) -> Result<Box<dyn PromptEncoder>>;
}

/// The parameter name of peft's saved prompt tensor.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// An encoder that returns one stored tensor: what every prompt method becomes when loaded
/// from a peft checkpoint (the saved `prompt_embeddings`, trainable if the adapter is).
#[derive(Debug)]
pub struct StoredPrompt {
    embeddings: Tensor,
}

impl StoredPrompt {
    /// The `prompt_embeddings` of a peft checkpoint if `params` is loading one; otherwise the
    /// parameter `name` (peft's in-memory name, e.g. `embedding.weight`), loaded or created
    /// with `init`.
    pub fn new(
        params: &ParamBuilder,
        name: &str,
        shape: [usize; 2],
        init: crate::vars::Init,
    ) -> Result<Self> {
        let name = if params.source_contains(PROMPT_EMBEDDINGS) {
            PROMPT_EMBEDDINGS
        } else {
            name
        };
        Ok(StoredPrompt {
            embeddings: params.get(&shape, name, init)?,
        })
    }

    /// Wraps a parameter obtained elsewhere (for example from [`ParamBuilder::get_with`]).
    pub fn from_tensor(embeddings: Tensor) -> Self {
        StoredPrompt { embeddings }
    }
}

impl PromptEncoder for StoredPrompt {
    fn forward(&self, _training: bool) -> Result<Tensor> {
        Ok(self.embeddings.clone())
    }
}
