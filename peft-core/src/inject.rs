//! Injecting adapters into a model: resolving a layer method's targets as peft does and
//! attaching its layers in two phases (nothing changes if any layer fails to build), building a
//! prompt method's encoder, and the base weights peft keeps beside adapters of embeddings.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::adapted::{AdaptedEmbedding, AdaptedLinear};
use crate::config::AdapterConfig;
use crate::error::{PeftError, Result};
use crate::method::{EmbeddingAdapter, LayerMethod, LinearAdapter};
use crate::model::ModuleKind;
use crate::peft_model::{Adapter, PeftModel};
use crate::prompt::PromptState;
use crate::targets::{resolve_target_modules, select_targets, targets_embedding_layers, TargetModules};
use crate::vars::{ParamStore, BASE_MODEL_PREFIX};

/// Suffix of the base weights peft stores beside adapters of embedding layers.
pub(crate) const BASE_LAYER_SUFFIX: &str = ".base_layer.weight";

enum Built {
    Linear(Arc<dyn LinearAdapter>),
    Embedding(Arc<dyn EmbeddingAdapter>),
}

impl PeftModel {
    /// peft saves the base weights of targeted embeddings and heads as `<path>.base_layer.weight`
    /// and loads them back over the model's; do the same (a no-op when they are unchanged).
    pub(crate) fn load_base_layer_weights(&mut self, store: &ParamStore) -> Result<()> {
        let found = store.take_source_tensors(|p| p.ends_with(BASE_LAYER_SUFFIX));
        if found.is_empty() {
            return Ok(());
        }
        let file = store.source_path().unwrap_or_default();
        let mut by_path: BTreeMap<String, (String, Tensor)> = found
            .into_iter()
            .map(|(p, key, t)| (p.trim_end_matches(BASE_LAYER_SUFFIX).to_string(), (key, t)))
            .collect();
        let check = |key: &str, t: &Tensor, current: &Tensor| -> Result<Option<Tensor>> {
            if t.dims() != current.dims() {
                return Err(PeftError::ShapeMismatch {
                    path: file.clone(),
                    key: key.to_string(),
                    expected: current.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            let t = t.to_dtype(current.dtype())?;
            let same = t.to_dtype(DType::F32)?.eq(&current.to_dtype(DType::F32)?)?.min_all()?.to_scalar::<u8>()? == 1;
            Ok(if same { None } else { Some(t) })
        };
        self.base.visit_embeddings(&mut |path, slot| {
            if let Some((key, t)) = by_path.remove(path) {
                let Some(adapted) = AdaptedEmbedding::from_slot(slot) else { return Ok(()) };
                if let Some(w) = check(&key, &t, &adapted.original().weight()?)? {
                    tracing::info!("{key}: replacing the base weights of `{path}` with the checkpoint's");
                    *slot = adapted.with_original(adapted.original().with_weight(w)?);
                }
            }
            Ok(())
        })?;
        self.base.visit_linears(&mut |path, slot| {
            if let Some((key, t)) = by_path.remove(path) {
                let Some(adapted) = AdaptedLinear::from_slot(slot) else { return Ok(()) };
                let original = adapted.original();
                if let Some(w) = check(&key, &t, &original.weight()?)? {
                    tracing::info!("{key}: replacing the base weights of `{path}` with the checkpoint's");
                    *slot = adapted.with_original(original.with_weights(w, original.bias().cloned())?);
                }
            }
            Ok(())
        })?;
        for (path, (key, _)) in by_path {
            tracing::warn!("{}: `{key}` names no adapted module `{path}`; ignored", file.display());
        }
        Ok(())
    }

    /// The base weights peft saves beside an adapter that targets an embedding layer.
    pub(crate) fn embedding_base_tensors(&self, adapter: &Adapter) -> Result<Vec<(String, Tensor)>> {
        let Some(targets) = adapter.config.method.as_layer_method().and_then(|m| m.target_spec().target_modules.clone())
        else {
            return Ok(Vec::new());
        };
        if !targets_embedding_layers(&targets, &self.base.modules()) {
            return Ok(Vec::new());
        }
        let info = self.base.info();
        let wanted: Vec<String> = info
            .input_embedding
            .iter()
            .chain(info.output_heads.iter())
            .filter(|p| adapter.targets.contains(p))
            .map(|p| format!("{p}.weight"))
            .collect();
        Ok(self
            .base
            .named_tensors()?
            .into_iter()
            .filter(|(n, _)| wanted.contains(n))
            .map(|(n, t)| {
                let path = n.trim_end_matches(".weight");
                (format!("{BASE_MODEL_PREFIX}{path}{BASE_LAYER_SUFFIX}"), t)
            })
            .collect())
    }

    fn layer_method(config: &AdapterConfig) -> Result<&dyn LayerMethod> {
        config.method.as_layer_method().ok_or_else(|| {
            PeftError::InvalidState(format!(
                "{} is not a layer method; this build cannot inject it into a model",
                config.peft_type()
            ))
        })
    }

    pub(crate) fn inject(&mut self, name: &str, config: AdapterConfig, store: Arc<ParamStore>, trainable: bool) -> Result<()> {
        if self.adapters.contains_key(name) {
            return Err(PeftError::AdapterExists(name.to_string()));
        }
        if config.method.as_prompt_method().is_some() {
            self.inject_prompt(name, config, store, trainable)
        } else {
            self.inject_layers(name, config, store, trainable)
        }
    }

    fn inject_prompt(&mut self, name: &str, mut config: AdapterConfig, store: Arc<ParamStore>, trainable: bool) -> Result<()> {
        let info = self.base.info().clone();
        let task_type = config.common.task_type;
        let peft_type = config.peft_type();
        let method = config
            .method
            .as_prompt_method_mut()
            .ok_or_else(|| PeftError::InvalidState(format!("{peft_type} is not a prompt-learning method")))?;
        method.prepare(&info, task_type)?;
        let encoder = method.build(&store.root(), self.base.as_ref())?;
        let prompt = PromptState { encoder, kind: method.kind(), num_virtual_tokens: method.num_virtual_tokens() };
        if !self.merged.is_empty() {
            tracing::warn!("adding adapter `{name}` to a merged model: unmerging first");
            self.unmerge_adapter()?;
        }
        self.adapters.insert(
            name.to_string(),
            Adapter { config, params: store, targets: Vec::new(), trainable, prompt: Some(prompt) },
        );
        if self.state.active().is_empty() {
            self.state.set_active(vec![name.to_string()]);
        }
        Ok(())
    }

    fn inject_layers(&mut self, name: &str, mut config: AdapterConfig, store: Arc<ParamStore>, trainable: bool) -> Result<()> {
        let info = self.base.info().clone();
        let modules = self.base.modules();
        // Resolve the targets as peft does and record them in the config that will be saved.
        {
            let peft_type = config.peft_type();
            let method = config.method.as_layer_method_mut().ok_or_else(|| {
                PeftError::InvalidState(format!(
                    "{peft_type} is not a layer method; this build cannot inject it into a model"
                ))
            })?;
            method.prepare(&info, config.common.task_type)?;
            let requested = match &method.target_spec().target_modules {
                Some(t) => t.clone(),
                None => method.default_target_modules(&info.model_type).ok_or_else(|| PeftError::MissingKey {
                    source_name: "adapter config".into(),
                    key: "target_modules".into(),
                    expected: format!(
                        "module names to adapt: {peft_type} has no default targets for model_type `{}`",
                        info.model_type
                    ),
                })?,
            };
            let condense = method.condense_long_target_lists();
            let resolved = resolve_target_modules(&requested, &modules, &info.output_heads, condense);
            method.target_spec_mut().target_modules = Some(resolved);
        }
        let method = Self::layer_method(&config)?;
        let spec = method.target_spec();
        let targets = spec.target_modules.clone().unwrap_or(TargetModules::AllLinear);
        let selected = select_targets(spec, &targets, &modules, &info.output_heads)?;
        for path in &selected {
            let kind = modules.iter().find(|m| &m.path == path).map(|m| m.kind);
            if let Some(ModuleKind::Other(class)) = kind {
                return Err(PeftError::UnsupportedModule {
                    path: path.clone(),
                    kind: format!("a {class}"),
                    method: config.peft_type().to_string(),
                    supported: "linear and embedding layers".into(),
                });
            }
        }
        if !self.merged.is_empty() {
            tracing::warn!("adding adapter `{name}` to a merged model: unmerging first");
            self.unmerge_adapter()?;
        }

        // Phase 1: build every layer's adapter; the model is untouched if anything fails.
        let wanted: BTreeSet<&str> = selected.iter().map(String::as_str).collect();
        let root = store.root();
        let mut built: BTreeMap<String, Built> = BTreeMap::new();
        self.base.visit_linears(&mut |path, slot| {
            if wanted.contains(path) {
                let base = AdaptedLinear::from_slot(slot).map_or(&*slot, |a| a.original());
                let adapter = method.wrap_linear(path, base.as_ref(), &root.pp(path))?;
                built.insert(path.to_string(), Built::Linear(Arc::from(adapter)));
            }
            Ok(())
        })?;
        self.base.visit_embeddings(&mut |path, slot| {
            if wanted.contains(path) {
                let base = AdaptedEmbedding::from_slot(slot).map_or(&*slot, |a| a.original());
                let adapter = method.wrap_embedding(path, base.as_ref(), &root.pp(path))?;
                built.insert(path.to_string(), Built::Embedding(Arc::from(adapter)));
            }
            Ok(())
        })?;
        if let Some(missing) = selected.iter().find(|p| !built.contains_key(*p)) {
            return Err(PeftError::InvalidState(format!(
                "module `{missing}` is listed by the model but exposes no adaptable slot"
            )));
        }

        // Phase 2: attach.
        let state = Arc::clone(&self.state);
        self.base.visit_linears(&mut |path, slot| {
            if let Some(Built::Linear(adapter)) = built.get(path) {
                *slot = AdaptedLinear::attach(slot, name, Arc::clone(adapter), &state);
            }
            Ok(())
        })?;
        self.base.visit_embeddings(&mut |path, slot| {
            if let Some(Built::Embedding(adapter)) = built.get(path) {
                *slot = AdaptedEmbedding::attach(slot, name, Arc::clone(adapter), &state);
            }
            Ok(())
        })?;
        self.adapters.insert(name.to_string(), Adapter { config, params: store, targets: selected, trainable, prompt: None });
        if self.state.active().is_empty() {
            self.state.set_active(vec![name.to_string()]);
        }
        Ok(())
    }

}
