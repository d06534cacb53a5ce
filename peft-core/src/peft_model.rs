//! [`PeftModel`]: a frozen base model plus named adapters, the equivalent of peft's
//! `PeftModel`. It injects adapters (`get_peft_model`, `add_adapter`, `load_adapter`), switches
//! and disables them, merges them into the base weights, counts parameters, hands trainable
//! `Var`s to an optimizer and saves checkpoints in peft's layout.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use crate::adapted::{AdaptedEmbedding, AdaptedLinear, RuntimeState};
use crate::checkpoint;
use crate::config::{AdapterConfig, TaskType, CONFIG_NAME};
use crate::error::{PeftError, Result};
use crate::inject::Source;
use crate::layers::{EmbeddingSlot, LinearSlot};
use crate::method::{PromptKind, PROMPT_EMBEDDINGS};
use crate::model::{AdaptableModel, KvCache, ModelInputs};
use crate::prompt::{forward_with_prompt, PromptState};
use crate::vars::ParamStore;

/// The name peft gives the first adapter.
pub const DEFAULT_ADAPTER: &str = "default";

/// One named adapter: its config, its parameters and the modules it adapts.
#[derive(Debug)]
pub struct Adapter {
    pub(crate) config: AdapterConfig,
    pub(crate) params: Arc<ParamStore>,
    /// A prompt adapter's `modules_to_save` copies (layer methods keep them in `params`).
    pub(crate) saved: Option<Arc<ParamStore>>,
    /// The base biases it trains (peft's `bias="all"` / `"lora_only"`), keyed as peft saves
    /// them; base parameters, so not counted among the adapter's own.
    pub(crate) biases: Option<Arc<ParamStore>>,
    pub(crate) targets: Vec<String>,
    pub(crate) saved_modules: Vec<String>,
    pub(crate) trainable: bool,
    pub(crate) prompt: Option<PromptState>,
}

impl Adapter {
    /// The adapter's config.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }
    /// Its parameters, sorted by path (a prompt adapter's `modules_to_save` copies last).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut vars = self.params.vars();
        vars.extend(self.saved.iter().flat_map(|s| s.vars()));
        vars.extend(self.biases.iter().flat_map(|s| s.vars()));
        vars
    }
    /// The module paths it adapts, in model order.
    pub fn targets(&self) -> &[String] {
        &self.targets
    }
    /// The modules it trains and saves in full (`modules_to_save`).
    pub fn saved_modules(&self) -> &[String] {
        &self.saved_modules
    }
    /// Whether its parameters are trained (false for adapters loaded for inference).
    pub fn is_trainable(&self) -> bool {
        self.trainable
    }
    /// Number of parameter values.
    pub fn num_params(&self) -> usize {
        self.params.num_params() + self.saved.as_ref().map_or(0, |s| s.num_params())
    }
    /// The adapted module a parameter path belongs to (the longest target it starts with).
    pub(crate) fn module_of(&self, param: &str) -> Option<&str> {
        self.targets
            .iter()
            .filter(|t| {
                param
                    .strip_prefix(t.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
            })
            .max_by_key(|t| t.len())
            .map(String::as_str)
    }
    /// Its parameters grouped by adapted module, each by name relative to the module
    /// (`lora_A.weight`).
    pub(crate) fn params_by_module(&self) -> BTreeMap<String, BTreeMap<String, Tensor>> {
        let mut out: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
        for (path, var) in self.params.vars() {
            if let Some(module) = self.module_of(&path) {
                let name = path[module.len() + 1..].to_string();
                out.entry(module.to_string())
                    .or_default()
                    .insert(name, var.as_tensor().clone());
            }
        }
        out
    }
    /// Whether this is a prompt-learning adapter (prompt tuning, p-tuning, prefix tuning).
    pub fn is_prompt_learning(&self) -> bool {
        self.prompt.is_some()
    }
    /// Tensors as saved in `adapter_model.safetensors` (peft's keys, F32): a layer method's
    /// parameters, or a prompt method's encoder output as `prompt_embeddings`.
    pub fn checkpoint_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut tensors = match &self.prompt {
            Some(p) => vec![(
                PROMPT_EMBEDDINGS.to_string(),
                p.encoder.forward(false)?.to_dtype(DType::F32)?,
            )],
            None => self.params.checkpoint_tensors()?,
        };
        if let Some(saved) = &self.saved {
            tensors.extend(saved.checkpoint_tensors()?);
        }
        if let Some(biases) = &self.biases {
            tensors.extend(biases.checkpoint_tensors()?);
        }
        Ok(tensors)
    }
}

/// What loading an adapter found besides what it needed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Keys in the weights file that no parameter used (peft warns about these too).
    pub unexpected_keys: Vec<String>,
}

/// A frozen base model with named adapters.
pub struct PeftModel {
    pub(crate) base: Box<dyn AdaptableModel>,
    pub(crate) adapters: BTreeMap<String, Adapter>,
    pub(crate) state: Arc<RuntimeState>,
    pub(crate) merged: Vec<String>,
    /// The layer replication applied to the base (`layer_replication`), if any.
    pub(crate) replicated: Option<Vec<(usize, usize)>>,
}

impl std::fmt::Debug for PeftModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeftModel")
            .field("model_type", &self.base.info().model_type)
            .field("adapters", &self.adapters.keys().collect::<Vec<_>>())
            .field("active", &self.state.active())
            .field("merged", &self.merged)
            .finish()
    }
}

/// Wraps `base` with a fresh adapter named `default` built from `config`, like peft's
/// `get_peft_model`. `seed` makes the initialisation reproducible.
pub fn get_peft_model(
    base: Box<dyn AdaptableModel>,
    config: AdapterConfig,
    seed: u64,
) -> Result<PeftModel> {
    let mut model = PeftModel::new(base);
    model.add_adapter(DEFAULT_ADAPTER, config, seed)?;
    Ok(model)
}

/// Restores the adapters on drop; see [`PeftModel::disable_adapters`].
#[derive(Debug)]
pub struct DisabledAdapters<'a> {
    model: &'a PeftModel,
    previous: bool,
}

impl Deref for DisabledAdapters<'_> {
    type Target = PeftModel;
    fn deref(&self) -> &PeftModel {
        self.model
    }
}

impl Drop for DisabledAdapters<'_> {
    fn drop(&mut self) {
        self.model.state.set_disabled(self.previous);
    }
}

/// Runs each batch row with its own adapter until dropped; see [`PeftModel::mixed_batch`].
#[derive(Debug)]
pub struct MixedBatch<'a> {
    model: &'a PeftModel,
    previous: Option<Arc<crate::adapted::RowAdapters>>,
}

impl Deref for MixedBatch<'_> {
    type Target = PeftModel;
    fn deref(&self) -> &PeftModel {
        self.model
    }
}

impl Drop for MixedBatch<'_> {
    fn drop(&mut self) {
        self.model.state.set_row_adapters(self.previous.take());
    }
}

/// Formats an integer with thousands separators, as Python's `{:,}`.
pub fn group_thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// peft's `print_trainable_parameters` line.
pub fn parameter_line(trainable: usize, all: usize) -> String {
    let pct = if all == 0 {
        0.0
    } else {
        100.0 * trainable as f64 / all as f64
    };
    format!(
        "trainable params: {} || all params: {} || trainable%: {pct:.4}",
        group_thousands(trainable),
        group_thousands(all)
    )
}

impl PeftModel {
    /// A model with no adapters yet.
    pub fn new(base: Box<dyn AdaptableModel>) -> Self {
        PeftModel {
            base,
            adapters: BTreeMap::new(),
            state: Arc::new(RuntimeState::default()),
            merged: Vec::new(),
            replicated: None,
        }
    }

    /// Loads the adapter saved in `dir` as `default` onto `base` (peft's
    /// `PeftModel.from_pretrained`). With `is_trainable` false it is frozen.
    pub fn from_pretrained(
        base: Box<dyn AdaptableModel>,
        dir: &Path,
        is_trainable: bool,
    ) -> Result<Self> {
        let mut model = PeftModel::new(base);
        model.load_adapter(dir, DEFAULT_ADAPTER, is_trainable)?;
        Ok(model)
    }

    /// The base model (with adapters attached to its slots).
    pub fn base_model(&self) -> &dyn AdaptableModel {
        self.base.as_ref()
    }

    /// Adapter names, sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.keys().cloned().collect()
    }

    /// One adapter.
    pub fn adapter(&self, name: &str) -> Result<&Adapter> {
        self.adapters.get(name).ok_or_else(|| self.unknown(name))
    }

    fn unknown(&self, name: &str) -> PeftError {
        PeftError::UnknownAdapter {
            name: name.to_string(),
            available: self.adapter_names().join(", "),
        }
    }

    /// The active adapters.
    pub fn active_adapters(&self) -> Vec<String> {
        self.state.active()
    }

    /// Adds a freshly initialised adapter. The first adapter becomes active; later ones are
    /// added inactive, as in peft (use [`PeftModel::set_adapter`]).
    pub fn add_adapter(&mut self, name: &str, config: AdapterConfig, seed: u64) -> Result<()> {
        let trainable = !config.common.inference_mode;
        self.inject(name, config, Source::Fresh(seed), trainable)?;
        Ok(())
    }

    /// Loads an adapter saved by peft or by this library from `dir` under `name`.
    pub fn load_adapter(
        &mut self,
        dir: &Path,
        name: &str,
        is_trainable: bool,
    ) -> Result<LoadReport> {
        let mut config = AdapterConfig::from_path(dir)?;
        config.common.inference_mode = !is_trainable;
        let weights = checkpoint::adapter_weights_file(dir)?;
        let tensors = checkpoint::read_adapter_weights(&weights, self.base.device())?;
        let unexpected_keys = self.inject(
            name,
            config,
            Source::File(weights.clone(), tensors),
            is_trainable,
        )?;
        if !unexpected_keys.is_empty() {
            tracing::warn!(
                "{}: unexpected keys not used by adapter `{name}`: {unexpected_keys:?}",
                weights.display()
            );
        }
        Ok(LoadReport { unexpected_keys })
    }

    /// Makes `name` the one active adapter.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.set_adapters(&[name])
    }

    /// Makes several adapters active at once (their effects add up, in order).
    pub fn set_adapters(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            if self.adapter(n)?.is_prompt_learning() && names.len() > 1 {
                return Err(PeftError::InvalidState(format!(
                    "prompt-learning adapter `{n}` cannot be active together with other adapters"
                )));
            }
        }
        if !self.merged.is_empty() {
            tracing::warn!("changing the active adapter of a merged model: unmerging first");
            self.unmerge_adapter()?;
        }
        self.state
            .set_active(names.iter().map(|s| s.to_string()).collect());
        Ok(())
    }

    /// peft's `set_adapter(names, inference_mode)`: activates `names` and, as peft does, makes
    /// exactly them trainable (frozen with `inference_mode`), every other adapter frozen.
    /// [`PeftModel::set_adapters`] activates without changing which adapters train.
    pub fn set_adapters_with_mode(&mut self, names: &[&str], inference_mode: bool) -> Result<()> {
        self.set_adapters(names)?;
        for (name, adapter) in self.adapters.iter_mut() {
            adapter.trainable = !inference_mode && names.contains(&name.as_str());
        }
        Ok(())
    }

    /// peft's `set_requires_grad(adapter_names, requires_grad)`: makes the adapters `names`
    /// trainable or frozen, the others unchanged. Like peft, refused for prompt-learning
    /// adapters.
    pub fn set_requires_grad(&mut self, names: &[&str], requires_grad: bool) -> Result<()> {
        for n in names {
            let adapter = self.adapter(n)?;
            if adapter.is_prompt_learning() {
                return Err(PeftError::InvalidState(format!(
                    "Setting `requires_grad` is not supported for prompt learning methods like {} \
                     (adapter `{n}`)",
                    adapter.config.peft_type()
                )));
            }
        }
        for n in names {
            if let Some(a) = self.adapters.get_mut(*n) {
                a.trainable = requires_grad;
            }
        }
        Ok(())
    }

    /// Runs with every adapter bypassed until the returned guard is dropped
    /// (peft's `with model.disable_adapter():`).
    pub fn disable_adapters(&self) -> DisabledAdapters<'_> {
        let previous = self.state.set_disabled(true);
        DisabledAdapters {
            model: self,
            previous,
        }
    }

    /// Runs each row of the batches that follow with its own adapter until the returned guard
    /// is dropped (peft's `adapter_names=` on `forward` and `generate`): `names` has one entry
    /// per row, an adapter's name or `"__base__"` for the base model alone. Every adapted layer
    /// runs its base once on the whole batch and each adapter once on its own rows; the active
    /// adapters do not matter meanwhile. Forward passes, the losses and generation all follow
    /// it; a batch with another number of rows is an error.
    ///
    /// As in peft: not in training mode, not while adapters are merged, only names of loaded
    /// adapters. Prompt-learning adapters cannot take part (they change the sequence, not a
    /// layer), nor can one be active. DoRA adapters can, unlike in peft.
    pub fn mixed_batch<S: AsRef<str>>(&self, names: &[S]) -> Result<MixedBatch<'_>> {
        let bad = |msg: String| Err(PeftError::InvalidState(msg));
        if names.is_empty() {
            return bad("adapter_names is empty: give one name per batch row".into());
        }
        if self.state.training() {
            return bad("cannot pass adapter_names when the model is in training mode (call set_training(false))".into());
        }
        if !self.merged.is_empty() {
            return bad(format!(
                "cannot pass adapter_names while adapters are merged ({}); call unmerge_adapter first",
                self.merged.join(", ")
            ));
        }
        if let Some(active) = self.state.active().iter().find(|n| {
            self.adapters
                .get(*n)
                .is_some_and(Adapter::is_prompt_learning)
        }) {
            return bad(format!(
                "the active adapter `{active}` is prompt-learning, which mixed batches cannot apply per row; activate a layer adapter"
            ));
        }
        let names: Vec<String> = names.iter().map(|n| n.as_ref().to_string()).collect();
        for name in &names {
            if name == crate::adapted::BASE_ROWS {
                continue;
            }
            match self.adapters.get(name) {
                None => {
                    return Err(PeftError::UnknownAdapter {
                        name: name.clone(),
                        available: format!("{}, {}", self.adapter_names().join(", "), crate::adapted::BASE_ROWS),
                    })
                }
                Some(a) if a.is_prompt_learning() => {
                    return bad(format!(
                        "adapter `{name}` is prompt-learning; mixed batches take layer adapters (LoRA, IA3, ...) only"
                    ))
                }
                Some(_) => {}
            }
        }
        let rows = crate::adapted::RowAdapters::new(&names, self.base.device())?;
        let previous = self.state.set_row_adapters(Some(Arc::new(rows)));
        Ok(MixedBatch {
            model: self,
            previous,
        })
    }

    /// Replaces every adapted slot with what `linear`/`embedding` make of it.
    /// Replaces every adapted layer with what `linear` / `embedding` make of it, in two
    /// phases: every replacement is computed first, then all are swapped in, so a failure
    /// (a layer that cannot merge, a shape that cannot be re-quantized) leaves the model as it
    /// was. Errors name the layer.
    fn rewrite_adapted(
        &mut self,
        linear: &mut dyn FnMut(&AdaptedLinear) -> Result<LinearSlot>,
        embedding: &mut dyn FnMut(&AdaptedEmbedding) -> Result<EmbeddingSlot>,
    ) -> Result<()> {
        let at = |path: &str, e: PeftError| PeftError::InvalidState(format!("{path}: {e}"));
        let mut linears = Vec::new();
        self.base.visit_linears(&mut |path, slot| {
            if let Some(a) = AdaptedLinear::from_slot(slot) {
                linears.push(linear(a).map_err(|e| at(path, e))?);
            }
            Ok(())
        })?;
        let mut embeddings = Vec::new();
        self.base.visit_embeddings(&mut |path, slot| {
            if let Some(a) = AdaptedEmbedding::from_slot(slot) {
                embeddings.push(embedding(a).map_err(|e| at(path, e))?);
            }
            Ok(())
        })?;
        let (mut linears, mut embeddings) = (linears.into_iter(), embeddings.into_iter());
        self.base.visit_linears(&mut |_, slot| {
            if AdaptedLinear::from_slot(slot).is_some() {
                *slot = linears
                    .next()
                    .expect("the same adapted layers as the first pass");
            }
            Ok(())
        })?;
        self.base.visit_embeddings(&mut |_, slot| {
            if AdaptedEmbedding::from_slot(slot).is_some() {
                *slot = embeddings
                    .next()
                    .expect("the same adapted layers as the first pass");
            }
            Ok(())
        })
    }

    /// Removes an adapter and its layers. If it was active, the first remaining adapter
    /// (if any) becomes active.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.adapter(name)?;
        if !self.merged.is_empty() {
            self.unmerge_adapter()?;
        }
        self.rewrite_adapted(&mut |a| Ok(a.detach(name)), &mut |a| Ok(a.detach(name)))?;
        self.adapters.remove(name);
        let mut active = self.state.active();
        active.retain(|n| n != name);
        if active.is_empty() {
            active.extend(self.adapters.keys().next().cloned());
        }
        self.state.set_active(active);
        Ok(())
    }

    /// Folds the active adapters into the base weights (peft's `merge_adapter`). Outputs stay
    /// the same up to rounding; forward passes then cost what the bare model costs.
    pub fn merge_adapter(&mut self) -> Result<()> {
        self.refuse_prompt_merge()?;
        let active = self.state.active();
        self.rewrite_adapted(&mut |a| a.with_merged(&active), &mut |a| {
            a.with_merged(&active)
        })?;
        self.merged = active;
        Ok(())
    }

    fn refuse_prompt_merge(&self) -> Result<()> {
        match self.active_prompt() {
            Some(_) => Err(PeftError::InvalidState(
                "prompt-learning adapters have no weights to merge into the base model".into(),
            )),
            None => Ok(()),
        }
    }

    /// The active prompt-learning adapter, unless adapters are disabled.
    fn active_prompt(&self) -> Option<&PromptState> {
        if self.state.disabled() {
            return None;
        }
        let active = self.state.active();
        active
            .iter()
            .find_map(|n| self.adapters.get(n).and_then(|a| a.prompt.as_ref()))
    }

    /// Virtual-token positions the active adapter adds to the logits (prompt tuning and
    /// p-tuning on a causal LM); labels need as many `-100` in front.
    pub fn virtual_tokens_in_output(&self) -> usize {
        match self.active_prompt() {
            Some(p)
                if p.kind == PromptKind::Prepend
                    && self.base.info().task_type == TaskType::CausalLm =>
            {
                p.num_virtual_tokens
            }
            _ => 0,
        }
    }

    /// Restores the unmerged base weights exactly (the originals are kept while merged).
    pub fn unmerge_adapter(&mut self) -> Result<()> {
        self.rewrite_adapted(&mut |a| Ok(a.unmerged()), &mut |a| Ok(a.unmerged()))?;
        self.merged.clear();
        Ok(())
    }

    /// The adapters currently merged into the base weights.
    pub fn merged_adapters(&self) -> &[String] {
        &self.merged
    }

    /// Merges the active adapters and returns the plain base model with every adapter layer
    /// removed (peft's `merge_and_unload`).
    pub fn merge_and_unload(mut self) -> Result<Box<dyn AdaptableModel>> {
        self.refuse_prompt_merge()?;
        let active = self.state.active();
        self.rewrite_adapted(&mut |a| a.merged_base(&active), &mut |a| {
            a.merged_base(&active)
        })?;
        Ok(self.base)
    }

    /// Removes every adapter layer without merging and returns the base model (peft's `unload`).
    pub fn unload(mut self) -> Result<Box<dyn AdaptableModel>> {
        self.rewrite_adapted(&mut |a| Ok(Arc::clone(a.original())), &mut |a| {
            Ok(Arc::clone(a.original()))
        })?;
        Ok(self.base)
    }

    /// Switches training mode (dropout on) or evaluation mode.
    pub fn set_training(&self, training: bool) {
        self.state.set_training(training);
    }

    /// Turns gradient checkpointing of the base model's blocks on or off (transformers'
    /// `gradient_checkpointing_enable()`, [`crate::recompute`]): training keeps one hidden state
    /// per layer instead of every activation and recomputes each block in the backward pass.
    /// Gradients are the same either way; backward passes must go through
    /// [`crate::recompute::backward`] (the trainers' steps do). Fails for an architecture whose
    /// forward pass does not checkpoint.
    pub fn set_gradient_checkpointing(&mut self, enabled: bool) -> Result<()> {
        if enabled && !self.base.supports_gradient_checkpointing() {
            return Err(PeftError::InvalidState(format!(
                "{} does not support gradient checkpointing",
                self.base.info().architecture
            )));
        }
        self.base.core_mut().gradient_checkpointing = enabled;
        Ok(())
    }

    /// Whether gradient checkpointing is on ([`PeftModel::set_gradient_checkpointing`]).
    pub fn gradient_checkpointing(&self) -> bool {
        self.base.core().gradient_checkpointing
    }

    /// Whether the model is in training mode.
    pub fn is_training(&self) -> bool {
        self.state.training()
    }

    /// The `Var`s an optimizer should update: those of the active, trainable adapters.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.trainable_named_vars()
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// [`PeftModel::trainable_vars`] with their parameter paths (`<adapter>:<path>`).
    pub fn trainable_named_vars(&self) -> Vec<(String, Var)> {
        let active = self.state.active();
        self.adapters
            .iter()
            .filter(|(name, a)| a.trainable && active.contains(name))
            .flat_map(|(name, a)| {
                a.vars()
                    .into_iter()
                    .map(move |(p, v)| (format!("{name}:{p}"), v))
            })
            .collect()
    }

    /// `(trainable, all)` parameter counts as peft computes them: all = base + every adapter.
    pub fn parameter_counts(&self) -> (usize, usize) {
        let active = self.state.active();
        // Tied adapters' aliases count as trainable too, as peft counts both layers' factors.
        let aliases: usize = self
            .adapters
            .iter()
            .filter(|(name, a)| a.trainable && active.contains(name))
            .map(|(_, a)| a.params.alias_params())
            .sum();
        let trainable: usize = self
            .trainable_vars()
            .iter()
            .map(|v| v.elem_count())
            .sum::<usize>()
            + aliases;
        let adapters: usize = self.adapters.values().map(Adapter::num_params).sum();
        (trainable, self.base.num_parameters() + adapters)
    }

    /// peft's `print_trainable_parameters` line:
    /// `trainable params: 28,672 || all params: 3,442,944 || trainable%: 0.8328`.
    pub fn parameter_line(&self) -> String {
        let (t, a) = self.parameter_counts();
        parameter_line(t, a)
    }

    /// Runs the model with the active adapters.
    pub fn forward(&self, inputs: &ModelInputs) -> Result<Tensor> {
        match self.active_prompt() {
            Some(p) => forward_with_prompt(
                self.base.as_ref(),
                p,
                inputs,
                None,
                self.state.training(),
                None,
            ),
            None => self.base.forward(inputs, None),
        }
    }

    /// transformers' causal-LM loss of [`PeftModel::forward`] against `labels` `[B, T]` (the
    /// inputs' shape; `-100` ignored; shifted inside), as peft's `forward(..., labels=)`
    /// computes it: positions a prompt adds in front are ignored. The same value and gradients
    /// as [`crate::loss::causal_lm_loss`] of the logits, without holding the `[B, T, V]` logits
    /// where the model's head allows it ([`crate::loss::head_cross_entropy`]).
    pub fn causal_lm_loss(&self, inputs: &ModelInputs, labels: &Tensor) -> Result<Tensor> {
        let (b, t) = inputs.batch_and_len()?;
        crate::loss::check_labels(labels, b, t)?;
        let virtual_tokens = self.virtual_tokens_in_output();
        let labels = if virtual_tokens > 0 {
            let ignore = Tensor::full(
                crate::loss::IGNORE_INDEX,
                (b, virtual_tokens),
                labels.device(),
            )?;
            Tensor::cat(&[&ignore, &labels.to_dtype(DType::I64)?], 1)?
        } else {
            labels.clone()
        };
        self.token_loss(inputs, &crate::loss::causal_lm_targets(&labels)?)
    }

    /// The sequence-to-sequence loss of [`PeftModel::forward`]: the decoder's logits
    /// `[B, T_dec, V]` against `labels` `[B, T_dec]` (`-100` ignored; the decoder inputs are
    /// the caller's, usually `labels` shifted right), without holding the logits where the
    /// model's head allows it.
    pub fn seq2seq_loss(&self, inputs: &ModelInputs, labels: &Tensor) -> Result<Tensor> {
        let decoder = inputs
            .decoder_input_ids
            .as_ref()
            .or(inputs.decoder_inputs_embeds.as_ref());
        let Some(decoder) = decoder else {
            return Err(PeftError::bad_input(
                "seq2seq_loss inputs",
                "decoder_input_ids or decoder_inputs_embeds",
                "neither",
            ));
        };
        let (b, t) = (decoder.dim(0)?, decoder.dim(1)?);
        crate::loss::check_labels(labels, b, t)?;
        self.token_loss(inputs, &labels.to_dtype(DType::I64)?.reshape(b * t)?)
    }

    /// Mean token cross-entropy of [`PeftModel::forward`]'s logits (`[B, T, V]` rows) against
    /// `targets [B * T]` (I64, `-100` ignored), with the active prompt applied: the common
    /// ground of [`PeftModel::causal_lm_loss`] and [`PeftModel::seq2seq_loss`].
    pub fn token_loss(&self, inputs: &ModelInputs, targets: &Tensor) -> Result<Tensor> {
        match self.active_prompt() {
            Some(p) => forward_with_prompt(
                self.base.as_ref(),
                p,
                inputs,
                None,
                self.state.training(),
                Some(targets),
            ),
            None => self.base.token_loss(inputs, None, targets),
        }
    }

    /// Runs the model with a KV cache (incremental decoding).
    pub fn forward_with_cache(&self, inputs: &ModelInputs, cache: &mut KvCache) -> Result<Tensor> {
        match self.active_prompt() {
            Some(p) => forward_with_prompt(
                self.base.as_ref(),
                p,
                inputs,
                Some(cache),
                self.state.training(),
                None,
            ),
            None => self.base.forward(inputs, Some(cache)),
        }
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        self.base.new_cache()
    }

    /// Saves every adapter in peft's layout: `default` in `dir`, others in `dir/<name>/`.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        for name in self.adapters.keys() {
            let sub = if name == DEFAULT_ADAPTER {
                dir.to_path_buf()
            } else {
                dir.join(name)
            };
            self.save_adapter(name, &sub)?;
        }
        Ok(())
    }

    /// Saves one adapter into `dir` (`adapter_config.json` + `adapter_model.safetensors`).
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        let adapter = self.adapter(name)?;
        let mut tensors = adapter.checkpoint_tensors()?;
        tensors.extend(self.embedding_base_tensors(adapter)?);
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let config = adapter
            .config
            .for_saving(self.base.info().name_or_path.as_deref());
        checkpoint::write_safetensors(&dir.join(checkpoint::WEIGHTS_NAME), &tensors)?;
        checkpoint::write_atomic(&dir.join(CONFIG_NAME), config.to_json_string().as_bytes())
    }

    /// Saves adapter `name` into `dir` converted to a plain adapter over the original base
    /// weights (peft's `save_pretrained(dir, path_initial_model_for_weight_conversion=
    /// initial_dir)`): for an initialisation that rewrote the base (PiSSA, OLoRA), the trained
    /// factors are joined with the initial ones saved in `initial_dir` right after the adapter
    /// was created, so that the result applies to the unmodified base model (LoRA: rank and
    /// alpha doubled). As peft does, the initial folder's config is rewritten with the
    /// initialisation reset (`init_lora_weights: true`), so it reloads over an original base.
    pub fn save_adapter_converted(&self, name: &str, dir: &Path, initial_dir: &Path) -> Result<()> {
        let adapter = self.adapter(name)?;
        let method = adapter.config.method.as_layer_method().ok_or_else(|| {
            PeftError::InvalidState(format!(
                "adapter `{name}` ({}) is not a layer method; only LoRA adapters can be converted",
                adapter.config.peft_type()
            ))
        })?;
        let initial_config = AdapterConfig {
            method: method.conversion_initial_config()?,
            ..adapter.config.clone()
        };
        let initial_file = checkpoint::adapter_weights_file(initial_dir)?;
        let initial = checkpoint::read_adapter_weights(&initial_file, self.base.device())?;
        let mut trained = adapter.checkpoint_tensors()?;
        trained.extend(self.embedding_base_tensors(adapter)?);
        let (converted_method, mut tensors) = method.convert_from_initial(&trained, &initial)?;
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let converted = AdapterConfig {
            method: converted_method,
            ..adapter.config.clone()
        }
        .for_saving(self.base.info().name_or_path.as_deref());
        let base_name = self.base.info().name_or_path.as_deref();
        checkpoint::write_atomic(
            &initial_dir.join(CONFIG_NAME),
            initial_config
                .for_saving(base_name)
                .to_json_string()
                .as_bytes(),
        )?;
        checkpoint::write_safetensors(&dir.join(checkpoint::WEIGHTS_NAME), &tensors)?;
        checkpoint::write_atomic(
            &dir.join(CONFIG_NAME),
            converted.to_json_string().as_bytes(),
        )
    }
}
