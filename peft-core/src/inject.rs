//! Injecting adapters into a model: resolving a layer method's targets as peft does and
//! attaching its layers in two phases (nothing changes if any layer fails to build), building a
//! prompt method's encoder, and the base weights peft keeps beside adapters of embeddings.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::adapted::{AdaptedEmbedding, AdaptedLinear};
use crate::config::{AdapterConfig, TaskType};
use crate::error::{PeftError, Result};
use crate::method::{EmbeddingAdapter, LayerMethod, LinearAdapter, TrainedBiases};
use crate::model::ModuleKind;
use crate::peft_model::{Adapter, PeftModel};
use crate::prompt::PromptState;
use crate::saved_modules::{EmbeddingCopy, LinearCopy};
use crate::targets::{
    resolve_target_modules, select_targets, targets_embedding_layers, TargetModules,
};
use crate::vars::{ParamBuilder, ParamStore, BASE_MODEL_PREFIX};

/// Suffix of the base weights peft stores beside adapters of embedding layers.
pub(crate) const BASE_LAYER_SUFFIX: &str = ".base_layer.weight";

/// peft's `classifier_module_names`: heads of classification models, always saved in full.
const CLASSIFIER_MODULE_NAMES: [&str; 2] = ["classifier", "score"];

/// Checkpoint prefix of `modules_to_save` copies of prompt-learning adapters.
const PROMPT_MODULES_PREFIX: &str = "base_model.";

/// A base bias an adapter trains: where it lives and its `Var`.
enum BiasSite {
    /// The bias of the linear layer at this path.
    Linear(String, Var),
    /// A plain parameter (a norm's shift) with this full name.
    Param(String, Var),
}

enum Built {
    Linear(Arc<dyn LinearAdapter>),
    Embedding(Arc<dyn EmbeddingAdapter>),
}

/// Where an adapter's parameters come from.
pub(crate) enum Source {
    /// A fresh initialisation with this seed.
    Fresh(u64),
    /// The tensors of a checkpoint file.
    File(PathBuf, Vec<(String, Tensor)>),
}

impl Source {
    fn store(&self, device: &Device, key_prefix: &str) -> Arc<ParamStore> {
        match self {
            Source::Fresh(seed) => ParamStore::new(*seed, device, key_prefix),
            Source::File(path, tensors) => {
                ParamStore::from_tensors(path, tensors.clone(), device, key_prefix)
            }
        }
    }

    fn is_file(&self) -> bool {
        matches!(self, Source::File(..))
    }
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
            let same = t
                .to_dtype(DType::F32)?
                .eq(&current.to_dtype(DType::F32)?)?
                .min_all()?
                .to_scalar::<u8>()?
                == 1;
            Ok(if same { None } else { Some(t) })
        };
        self.base.visit_embeddings(&mut |path, slot| {
            if let Some((key, t)) = by_path.remove(path) {
                let Some(adapted) = AdaptedEmbedding::from_slot(slot) else {
                    return Ok(());
                };
                if let Some(w) = check(&key, &t, &adapted.original().weight()?)? {
                    tracing::info!(
                        "{key}: replacing the base weights of `{path}` with the checkpoint's"
                    );
                    *slot = adapted.with_original(adapted.original().with_weight(w)?);
                }
            }
            Ok(())
        })?;
        self.base.visit_linears(&mut |path, slot| {
            if let Some((key, t)) = by_path.remove(path) {
                let Some(adapted) = AdaptedLinear::from_slot(slot) else {
                    return Ok(());
                };
                let original = adapted.original();
                if let Some(w) = check(&key, &t, &original.weight()?)? {
                    tracing::info!(
                        "{key}: replacing the base weights of `{path}` with the checkpoint's"
                    );
                    *slot =
                        adapted.with_original(original.with_weights(w, original.bias().cloned())?);
                }
            }
            Ok(())
        })?;
        for (path, (key, _)) in by_path {
            tracing::warn!(
                "{}: `{key}` names no adapted module `{path}`; ignored",
                file.display()
            );
        }
        Ok(())
    }

    /// The base weights peft saves beside an adapter that targets an embedding layer.
    pub(crate) fn embedding_base_tensors(
        &self,
        adapter: &Adapter,
    ) -> Result<Vec<(String, Tensor)>> {
        let Some(targets) = adapter
            .config
            .method
            .as_layer_method()
            .and_then(|m| m.target_spec().target_modules.clone())
        else {
            return Ok(Vec::new());
        };
        if !targets_embedding_layers(&targets, &self.base.modules()) {
            return Ok(Vec::new());
        }
        let info = self.base.info();
        let named: BTreeMap<String, Tensor> = self.base.named_tensors()?.into_iter().collect();
        let tied = self.base.module_tree().tied_heads();
        let embedding_weight = info
            .input_embedding
            .as_ref()
            .and_then(|e| named.get(&format!("{e}.weight")));
        Ok(info
            .input_embedding
            .iter()
            .chain(info.output_heads.iter())
            .filter(|p| adapter.targets.contains(p))
            .filter_map(|p| {
                // A tied head is saved once with the embedding; peft writes it under both.
                let t = named
                    .get(&format!("{p}.weight"))
                    .or_else(|| embedding_weight.filter(|_| tied.contains(p)))?;
                Some((
                    format!("{BASE_MODEL_PREFIX}{p}{BASE_LAYER_SUFFIX}"),
                    t.clone(),
                ))
            })
            .collect())
    }

    /// The base biases `which` selects (phase 1: nothing changes yet), as `Var`s in a store
    /// keyed as peft saves them: `<path>.base_layer.bias` for a layer an adapter wraps (this
    /// one's targets included), `<path>.bias` for other linear layers and norms. A checkpoint's
    /// values are taken from `store`'s file; the rest start at the base's values (one already
    /// trained by another adapter is shared, as peft has one parameter). `saved` modules keep
    /// their own trained copies.
    #[allow(clippy::type_complexity)]
    fn trained_biases(
        &mut self,
        which: TrainedBiases,
        wanted: &BTreeSet<&str>,
        saved: &[String],
        store: &ParamStore,
    ) -> Result<Option<(Arc<ParamStore>, Vec<BiasSite>)>> {
        if which == TrainedBiases::None {
            return Ok(None);
        }
        // (key, site is a linear layer, site path, current value)
        let mut found: Vec<(String, bool, String, Tensor)> = Vec::new();
        self.base.visit_linears(&mut |path, slot| {
            let targeted = wanted.contains(path);
            if saved.iter().any(|s| s == path) || (which == TrainedBiases::TargetsOnly && !targeted)
            {
                return Ok(());
            }
            if let Some(b) = slot.bias() {
                // Fails now, not after attaching, on a layer that cannot take a trained bias.
                slot.with_bias(b.clone())?;
                let wrapped = targeted || AdaptedLinear::from_slot(slot).is_some();
                let key = if wrapped {
                    format!("{path}.base_layer.bias")
                } else {
                    format!("{path}.bias")
                };
                found.push((key, true, path.to_string(), b.clone()));
            }
            Ok(())
        })?;
        if which == TrainedBiases::All {
            self.base.visit_params(&mut |name, t| {
                if name == "bias" || name.ends_with(".bias") {
                    found.push((name.to_string(), false, name.to_string(), t.clone()));
                }
                Ok(())
            })?;
        }
        let keys: BTreeSet<&str> = found.iter().map(|(k, ..)| k.as_str()).collect();
        let loaded: BTreeMap<String, (String, Tensor)> = store
            .take_source_tensors(|p| keys.contains(p))
            .into_iter()
            .map(|(p, key, t)| (p, (key, t)))
            .collect();
        let file = store.source_path().unwrap_or_default();
        let biases = ParamStore::new(0, self.base.device(), BASE_MODEL_PREFIX);
        let mut sites = Vec::new();
        for (key, linear, path, current) in found {
            let value = match loaded.get(&key) {
                Some((file_key, t)) if t.dims() != current.dims() => {
                    return Err(PeftError::ShapeMismatch {
                        path: file.clone(),
                        key: file_key.clone(),
                        expected: current.dims().to_vec(),
                        found: t.dims().to_vec(),
                    })
                }
                Some((_, t)) => Some(t.to_dtype(DType::F32)?.to_device(current.device())?),
                None => None,
            };
            let var = if current.is_variable() && current.dtype() == DType::F32 {
                let var = Var::from_tensor(&current)?;
                if let Some(v) = value {
                    var.set(&v)?;
                }
                var
            } else {
                Var::from_tensor(&match value {
                    Some(v) => v,
                    None => current.to_dtype(DType::F32)?,
                })?
            };
            biases.insert_var(&key, var.clone());
            sites.push(if linear {
                BiasSite::Linear(path, var)
            } else {
                BiasSite::Param(path, var)
            });
        }
        Ok(Some((biases, sites)))
    }

    /// Puts trained biases into their layers and parameters (phase 2).
    fn attach_biases(&mut self, sites: &[BiasSite]) -> Result<()> {
        let mut linears = BTreeMap::new();
        let mut params = BTreeMap::new();
        for site in sites {
            match site {
                BiasSite::Linear(p, v) => linears.insert(p.as_str(), v),
                BiasSite::Param(p, v) => params.insert(p.as_str(), v),
            };
        }
        self.base.visit_linears(&mut |path, slot| {
            if let (Some(var), Some(b)) = (linears.get(path), slot.bias()) {
                let bias = var.as_tensor().to_dtype(b.dtype())?;
                *slot = slot.with_bias(bias)?;
            }
            Ok(())
        })?;
        self.base.visit_params(&mut |name, t| {
            if let Some(var) = params.get(name) {
                *t = var.as_tensor().to_dtype(t.dtype())?;
            }
            Ok(())
        })
    }

    fn layer_method(config: &AdapterConfig) -> Result<&dyn LayerMethod> {
        config.method.as_layer_method().ok_or_else(|| {
            PeftError::InvalidState(format!(
                "{} is not a layer method; this build cannot inject it into a model",
                config.peft_type()
            ))
        })
    }

    /// Injects an adapter built from `config` (freshly initialised, or from a checkpoint's
    /// tensors) and returns the checkpoint keys nothing used.
    pub(crate) fn inject(
        &mut self,
        name: &str,
        config: AdapterConfig,
        source: Source,
        trainable: bool,
    ) -> Result<Vec<String>> {
        self.inject_as(name, config, source, trainable, true)
    }

    /// [`PeftModel::inject`]; `add_heads` false leaves `modules_to_save` as the config has it
    /// (a combined adapter's config already lists the classifier heads, and peft's
    /// `add_weighted_adapter` injects through the tuner, which does not add them again).
    pub(crate) fn inject_as(
        &mut self,
        name: &str,
        mut config: AdapterConfig,
        source: Source,
        trainable: bool,
        add_heads: bool,
    ) -> Result<Vec<String>> {
        if self.adapters.contains_key(name) {
            return Err(PeftError::AdapterExists(name.to_string()));
        }
        // peft's PeftModelForSequenceClassification / ForTokenClassification: the classifier
        // heads are always trained and saved in full.
        // For prompt-learning adapters peft adds them twice (in the model's constructor and in
        // its add_adapter), and saves the list so; keep the files identical.
        if add_heads
            && matches!(
                config.common.task_type,
                Some(TaskType::SeqCls | TaskType::TokenCls)
            )
        {
            let mut modules = config
                .method
                .modules_to_save()
                .map(<[String]>::to_vec)
                .unwrap_or_default();
            let times = if config.method.as_prompt_method().is_some() {
                2
            } else {
                1
            };
            for _ in 0..times {
                modules.extend(CLASSIFIER_MODULE_NAMES.iter().map(|s| s.to_string()));
            }
            config.method.set_modules_to_save(Some(modules));
        }
        let stores = if config.method.as_prompt_method().is_some() {
            self.inject_prompt(name, config, &source, trainable)?
        } else {
            self.inject_layers(name, config, &source, trainable)?
        };
        let mut unused: Option<BTreeSet<String>> = None;
        for store in &stores {
            let mine: BTreeSet<String> = store.unused_source_keys().into_iter().collect();
            unused = Some(match unused {
                None => mine,
                Some(u) => u.intersection(&mine).cloned().collect(),
            });
            store.finish_loading();
        }
        Ok(unused.unwrap_or_default().into_iter().collect())
    }

    fn register(&mut self, name: &str, adapter: Adapter) {
        self.adapters.insert(name.to_string(), adapter);
        if self.state.active().is_empty() {
            self.state.set_active(vec![name.to_string()]);
        }
    }

    fn inject_prompt(
        &mut self,
        name: &str,
        mut config: AdapterConfig,
        source: &Source,
        trainable: bool,
    ) -> Result<Vec<Arc<ParamStore>>> {
        let info = self.base.info().clone();
        let task_type = config.common.task_type;
        let peft_type = config.peft_type();
        let method = config.method.as_prompt_method_mut().ok_or_else(|| {
            PeftError::InvalidState(format!("{peft_type} is not a prompt-learning method"))
        })?;
        method.prepare(&info, task_type)?;
        let store = source.store(self.base.device(), "");
        let encoder = method.build(&store.root(), self.base.as_ref())?;
        let prompt = PromptState {
            encoder,
            kind: method.kind(),
            num_virtual_tokens: method.num_virtual_tokens(),
        };
        // Full copies of modules_to_save live in their own store: peft keys them `base_model.<path>`.
        let saved_store = source.store(self.base.device(), PROMPT_MODULES_PREFIX);
        let mut built = BTreeMap::new();
        let saved_modules = self.build_saved_modules(
            config.method.modules_to_save().unwrap_or_default(),
            &saved_store.root(),
            &mut built,
        )?;
        if !self.merged.is_empty() {
            tracing::warn!("adding adapter `{name}` to a merged model: unmerging first");
            self.unmerge_adapter()?;
        }
        self.attach_built(name, &built)?;
        let adapter = Adapter {
            config,
            params: Arc::clone(&store),
            saved: Some(Arc::clone(&saved_store)),
            biases: None,
            targets: Vec::new(),
            saved_modules,
            trainable,
            prompt: Some(prompt),
        };
        self.register(name, adapter);
        Ok(vec![store, saved_store])
    }

    /// Builds trainable copies of the modules named by `modules_to_save` (a module matches when
    /// its path ends with an entry, as in peft's `_set_trainable`). Returns their paths.
    fn build_saved_modules(
        &mut self,
        modules: &[String],
        root: &ParamBuilder,
        built: &mut BTreeMap<String, Built>,
    ) -> Result<Vec<String>> {
        if modules.is_empty() {
            return Ok(Vec::new());
        }
        let matches = |path: &str| modules.iter().any(|m| path.ends_with(m.as_str()));
        for entry in self.base.modules() {
            if let ModuleKind::Other(class) = entry.kind {
                if matches(&entry.path) {
                    return Err(PeftError::UnsupportedModule {
                        path: entry.path,
                        kind: format!("a {class}"),
                        method: "modules_to_save".into(),
                        supported: "linear and embedding layers".into(),
                    });
                }
            }
        }
        let mut paths = Vec::new();
        self.base.visit_linears(&mut |path, slot| {
            if matches(path) {
                let base = AdaptedLinear::from_slot(slot).map_or(&*slot, |a| a.original());
                built.insert(
                    path.to_string(),
                    Built::Linear(Arc::new(LinearCopy::new(&root.pp(path), base.as_ref())?)),
                );
                paths.push(path.to_string());
            }
            Ok(())
        })?;
        self.base.visit_embeddings(&mut |path, slot| {
            if matches(path) {
                let base = AdaptedEmbedding::from_slot(slot).map_or(&*slot, |a| a.original());
                built.insert(
                    path.to_string(),
                    Built::Embedding(Arc::new(EmbeddingCopy::new(&root.pp(path), base.as_ref())?)),
                );
                paths.push(path.to_string());
            }
            Ok(())
        })?;
        Ok(paths)
    }

    /// The trainable-token adapters of `trainable_token_indices` (see [`crate::tokens`]), as
    /// peft places them: a list targets the input embedding; an object names modules (path
    /// suffixes, each must match one); a head tied to the input embedding shares its trained
    /// rows unless it is named with other indices. A module already copied by
    /// `modules_to_save` or adapted by the method is refused (peft's wrapper would bypass it).
    fn build_token_adapters(
        &mut self,
        tokens: &crate::tokens::TokenIndices,
        root: &ParamBuilder,
        built: &mut BTreeMap<String, Built>,
        wanted: &BTreeSet<&str>,
    ) -> Result<()> {
        use crate::tokens::{TokenColumns, TokenIndices, TokenRows};
        let info = self.base.info().clone();
        let requests: Vec<(String, Vec<usize>)> = match tokens {
            TokenIndices::Input(ids) => {
                let path = info
                    .input_embedding
                    .clone()
                    .ok_or_else(|| PeftError::MissingKey {
                        source_name: "adapter config".into(),
                        key: "trainable_token_indices".into(),
                        expected: format!(
                            "an object naming the embedding: {} has no input embedding",
                            info.architecture
                        ),
                    })?;
                vec![(path, ids.clone())]
            }
            TokenIndices::Named(map) => map.clone(),
        };
        let tree = self.base.module_tree();
        let linears: Vec<String> = tree.linear_slots().map(|(p, _)| p.to_string()).collect();
        let embeddings: Vec<String> = tree.embedding_slots().map(|(p, _)| p.to_string()).collect();
        // Each request's modules, embeddings and linears apart.
        let mut rows_for: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut columns_for: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (name, ids) in &requests {
            let mut found = false;
            for (paths, into) in [(&embeddings, &mut rows_for), (&linears, &mut columns_for)] {
                for path in paths.iter().filter(|p| p.ends_with(name.as_str())) {
                    if built.contains_key(path) {
                        return Err(PeftError::InvalidState(format!(
                            "The embedding layer is already marked to be trained fully, either specify \
                             `modules_to_save=[..., \"{name}\", ...]` or `trainable_tokens={{'{name}': x}}` \
                             but not both ({path})"
                        )));
                    }
                    if wanted.contains(path.as_str()) {
                        return Err(PeftError::InvalidState(format!(
                            "{path} is both a target of the adapter and of trainable_token_indices; \
                             peft's trainable tokens would bypass the adapter there"
                        )));
                    }
                    into.insert(path.clone(), ids.clone());
                    found = true;
                }
            }
            if !found {
                return Err(PeftError::MissingKey {
                    source_name: "adapter config".into(),
                    key: format!("trainable_token_indices.{name}"),
                    expected: "an embedding or linear module of the model with that name".into(),
                });
            }
        }
        // Heads tied to a trained input embedding share its rows (unless named with others).
        let tied_source = info
            .input_embedding
            .clone()
            .filter(|e| info.tie_word_embeddings && rows_for.contains_key(e));
        let mut tied_heads = Vec::new();
        if let Some(source) = &tied_source {
            let ids = &rows_for[source];
            for head in &info.output_heads {
                match columns_for.get(head) {
                    Some(own) if own == ids => {
                        columns_for.remove(head);
                        tied_heads.push(head.clone());
                    }
                    Some(_) => {}
                    None if linears.contains(head) => {
                        if wanted.contains(head.as_str()) || built.contains_key(head) {
                            return Err(PeftError::InvalidState(format!(
                                "{head} is tied to the trained input embedding {source} and also adapted; \
                                 peft's tied trainable tokens would bypass that adapter"
                            )));
                        }
                        tied_heads.push(head.clone());
                    }
                    None => {}
                }
            }
        }
        let mut sources: BTreeMap<String, Arc<TokenRows>> = BTreeMap::new();
        self.base.visit_embeddings(&mut |path, slot| {
            if let Some(ids) = rows_for.get(path) {
                let base = AdaptedEmbedding::from_slot(slot).map_or(&*slot, |a| a.original());
                let rows = Arc::new(TokenRows::new(&root.pp(path), base.as_ref(), ids.clone())?);
                sources.insert(path.to_string(), Arc::clone(&rows));
                built.insert(path.to_string(), Built::Embedding(rows));
            }
            Ok(())
        })?;
        self.base.visit_linears(&mut |path, slot| {
            let base = AdaptedLinear::from_slot(slot).map_or(&*slot, |a| a.original());
            if let Some(ids) = columns_for.get(path) {
                let cols = TokenColumns::new(&root.pp(path), base.as_ref(), ids.clone())?;
                built.insert(path.to_string(), Built::Linear(Arc::new(cols)));
            } else if let (true, Some(source)) = (
                tied_heads.iter().any(|h| h == path),
                tied_source.as_ref().and_then(|s| sources.get(s)),
            ) {
                let cols = TokenColumns::tied(path, base.as_ref(), source)?;
                built.insert(path.to_string(), Built::Linear(Arc::new(cols)));
            }
            Ok(())
        })
    }

    /// Replicates the base's layers for an adapter with `layer_replication` (peft's
    /// `replicate_layers`, run when the adapter is injected): once per model, before any
    /// adapter is attached; a second adapter must ask for the same replication.
    fn replicate_base_layers(&mut self, map: &[(usize, usize)]) -> Result<()> {
        match &self.replicated {
            Some(done) if done == map => return Ok(()),
            Some(done) => {
                return Err(PeftError::InvalidState(format!(
                    "the base's layers are already replicated as {done:?}; an adapter asking for \
                     {map:?} cannot be added to this model"
                )))
            }
            None => {}
        }
        if !self.adapters.is_empty() {
            return Err(PeftError::InvalidState(format!(
                "layer_replication {map:?} renumbers the base's layers, which the adapters already \
                 loaded ({}) are attached to; add the replicating adapter first",
                self.adapters.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        self.base.replicate_layers(map)?;
        self.replicated = Some(map.to_vec());
        Ok(())
    }

    /// Phase 2 of an injection: attaches every built adapter under `name`.
    fn attach_built(&mut self, name: &str, built: &BTreeMap<String, Built>) -> Result<()> {
        let state = Arc::clone(&self.state);
        self.base.visit_linears(&mut |path, slot| {
            if let Some(Built::Linear(adapter)) = built.get(path) {
                if let Some(weight) = adapter.take_rewritten_base() {
                    *slot = with_base_weight(slot, weight)?;
                }
                *slot = AdaptedLinear::attach(slot, name, Arc::clone(adapter), &state);
            }
            Ok(())
        })?;
        self.base.visit_embeddings(&mut |path, slot| {
            if let Some(Built::Embedding(adapter)) = built.get(path) {
                *slot = AdaptedEmbedding::attach(slot, name, Arc::clone(adapter), &state);
            }
            Ok(())
        })
    }

    fn inject_layers(
        &mut self,
        name: &str,
        mut config: AdapterConfig,
        source: &Source,
        trainable: bool,
    ) -> Result<Vec<Arc<ParamStore>>> {
        if let Some(map) = config.method.layer_replication() {
            self.replicate_base_layers(map)?;
        }
        let store = source.store(self.base.device(), BASE_MODEL_PREFIX);
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
            let resolved =
                resolve_target_modules(&requested, &modules, &info.output_heads, condense);
            method.target_spec_mut().target_modules = Some(resolved);
        }
        let mut selected = {
            let method = Self::layer_method(&config)?;
            let spec = method.target_spec();
            let targets = spec
                .target_modules
                .clone()
                .unwrap_or(TargetModules::AllLinear);
            select_targets(spec, &targets, &modules, &info.output_heads)?
        };
        let tied_heads = if config.method.ensure_weight_tying() {
            let tied = self.base.module_tree().tied_heads();
            let head_saved = tied.iter().any(|h| store.source_has_module(h));
            tie_targets(
                &mut config,
                &mut selected,
                &info,
                &tied,
                &modules,
                head_saved,
            )?
        } else {
            Vec::new()
        };
        // peft corrects `fan_in_fan_out` to each targeted layer's weight layout, in the config too.
        let mut layouts = Vec::new();
        self.base.visit_linears(&mut |path, slot| {
            if selected.iter().any(|s| s == path) {
                layouts.push((
                    slot.stores_transposed(),
                    slot.in_features(),
                    slot.out_features(),
                ));
            }
            Ok(())
        })?;
        if let Some(method) = config.method.as_layer_method_mut() {
            for (transposed, in_features, out_features) in layouts {
                method.observe_weight_layout(transposed);
                method.observe_target_shape(in_features, out_features);
            }
        }
        let method = Self::layer_method(&config)?;
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
        let saved_modules = self.build_saved_modules(
            config.method.modules_to_save().unwrap_or_default(),
            &root,
            &mut built,
        )?;
        if let Some(tokens) = config.method.trainable_token_indices() {
            self.build_token_adapters(tokens, &root, &mut built, &wanted)?;
        }
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
        if let Some(embedding) = info
            .input_embedding
            .as_deref()
            .filter(|_| !tied_heads.is_empty())
        {
            self.base.visit_linears(&mut |path, slot| {
                if tied_heads.iter().any(|h| h == path) {
                    let base = AdaptedLinear::from_slot(slot).map_or(&*slot, |a| a.original());
                    let adapter = method.wrap_tied_linear(path, base.as_ref(), embedding, &root)?;
                    built.insert(path.to_string(), Built::Linear(Arc::from(adapter)));
                }
                Ok(())
            })?;
        }
        let selected: Vec<String> = {
            // The tied heads are adapted too (in model order, for the status and the saved keys).
            let all: BTreeSet<&String> = selected.iter().chain(&tied_heads).collect();
            modules
                .iter()
                .filter(|m| all.contains(&m.path))
                .map(|m| m.path.clone())
                .collect()
        };
        if let Some(missing) = selected.iter().find(|p| !built.contains_key(p.as_str())) {
            return Err(PeftError::InvalidState(format!(
                "module `{missing}` is listed by the model but exposes no adaptable slot"
            )));
        }

        let biases =
            self.trained_biases(method.trained_biases(), &wanted, &saved_modules, &store)?;

        // Phase 2: attach.
        self.attach_built(name, &built)?;
        if source.is_file() {
            self.load_base_layer_weights(&store)?;
        }
        let biases = match biases {
            Some((biases, sites)) => {
                self.attach_biases(&sites)?;
                Some(biases)
            }
            None => None,
        };
        let adapter = Adapter {
            config,
            params: Arc::clone(&store),
            saved: None,
            biases,
            targets: selected,
            saved_modules,
            trainable,
            prompt: None,
        };
        self.register(name, adapter);
        Ok(vec![store])
    }
}

/// `slot` with its base layer's weight replaced by `weight` (stored layout, any float dtype;
/// converted to the layer's dtype, requantized for a quantized layer), the bias kept: how an
/// initialisation that rewrites the base (PiSSA, OLoRA) reaches the model.
fn with_base_weight(
    slot: &crate::layers::LinearSlot,
    weight: Tensor,
) -> Result<crate::layers::LinearSlot> {
    let original = AdaptedLinear::from_slot(slot).map_or(slot, |a| a.original());
    let rewritten = crate::layers::with_stored_weight(original.as_ref(), &weight)?;
    Ok(match AdaptedLinear::from_slot(slot) {
        Some(adapted) => adapted.with_original(rewritten),
        None => rewritten,
    })
}

/// `ensure_weight_tying` (peft's `_check_tied_modules` / `_add_targets_to_tie`): when the model
/// ties its output head to the input embedding and the targets name a tied layer (peft looks for
/// `embed_tokens` or `lm_head` among them), the heads are taken out of the ordinary targets and
/// the embedding put in (also in the saved `target_modules`, as peft rewrites them); the
/// returned heads get adapters tied to the embedding's. Loading, a checkpoint that holds a tied
/// head's parameters (`head_saved`) ties it too: peft 0.21 saves a GPT-2 adapter with `target_modules`
/// naming `wte` only and reloads it without the head's adapter, which would not reproduce the
/// saved model. Otherwise nothing changes, with peft's warnings.
fn tie_targets(
    config: &mut AdapterConfig,
    selected: &mut Vec<String>,
    info: &crate::model::ModelInfo,
    tied: &[String],
    modules: &[crate::model::ModuleEntry],
    head_saved: bool,
) -> Result<Vec<String>> {
    let embedding = match (&info.input_embedding, info.tie_word_embeddings) {
        (Some(e), true) => e.clone(),
        _ => {
            tracing::warn!(
                "You have requested `ensure_weight_tying`, but no tied modules were found in the model"
            );
            return Ok(Vec::new());
        }
    };
    let last = |p: &str| p.rsplit('.').next().unwrap_or(p).to_string();
    let names_tied_layer = selected.iter().any(|p| {
        (tied.contains(p) || *p == embedding)
            && matches!(last(p).as_str(), "embed_tokens" | "lm_head")
    });
    let heads: Vec<String> = if names_tied_layer || head_saved {
        tied.to_vec()
    } else {
        Vec::new()
    };
    if heads.is_empty() {
        if !selected.contains(&embedding) {
            tracing::warn!(
                "You have requested `ensure_weight_tying`, but no tied modules are added in either \
                 `modules_to_save` or `target_modules`"
            );
        }
        return Ok(Vec::new());
    }
    selected.retain(|p| !heads.contains(p));
    if !selected.contains(&embedding) {
        selected.push(embedding.clone());
        let order: BTreeMap<&str, usize> = modules
            .iter()
            .enumerate()
            .map(|(i, m)| (m.path.as_str(), i))
            .collect();
        selected.sort_by_key(|p| order.get(p.as_str()).copied().unwrap_or(usize::MAX));
    }
    let peft_type = config.peft_type();
    let method = config
        .method
        .as_layer_method_mut()
        .ok_or_else(|| PeftError::InvalidState(format!("{peft_type} is not a layer method")))?;
    let spec = method.target_spec_mut();
    spec.target_modules = match spec.target_modules.take() {
        Some(TargetModules::List(names)) => {
            // peft drops the first entry naming each tied head and adds the embedding's path.
            let mut names = names;
            for head in &heads {
                let names_head = |m: &String| {
                    head == m
                        || head.ends_with(&format!(".{m}"))
                        || head.starts_with(&format!("{m}."))
                };
                if let Some(i) = names.iter().position(names_head) {
                    names.remove(i);
                }
            }
            if !names.contains(&embedding) {
                names.push(embedding.clone());
            }
            Some(TargetModules::List(names))
        }
        Some(TargetModules::Regex(r)) => Some(TargetModules::Regex(format!(
            "(?:{r}|^{}$)",
            fancy_regex::escape(&embedding)
        ))),
        other => other,
    };
    Ok(heads)
}
