//! One declaration per module. A model declares each of its modules once, through a
//! [`ModelBuilder`] scoped candle-style (`b.pp("model").pp("layers").pp(0)`): linear layers,
//! embeddings, norms, plain parameters and the containers between them. The builder asks a list
//! of [`BaseLayerFactory`]s for each frozen linear layer (the first that accepts wins, as peft's
//! dispatcher list does; dense is the fallback), so the same model code builds on dense,
//! bitsandbytes or GGUF bases. What was declared is a [`ModuleTree`], which the model keeps and
//! reads its layers from by id; the module listing, the slot visitors, the named tensors and the
//! parameter count of [`crate::AdaptableModel`] all derive from it.

use std::fmt::Display;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::Tensor;

use crate::error::{PeftError, Result};
use crate::layers::{DenseEmbedding, DenseLinear, EmbeddingSlot, LinearSlot};
use crate::model::{ModuleEntry, ModuleKind};

/// A tensor as its file keeps it, for factories that keep a quantized form instead of
/// converting it to the build's dtype.
#[derive(Debug, Clone)]
pub enum StoredTensor<'a> {
    /// Raw bytes of a safetensors entry (bitsandbytes checkpoints store uint8/int8 codes).
    Safetensors {
        /// The stored dtype.
        dtype: safetensors::Dtype,
        /// The stored shape.
        shape: Vec<usize>,
        /// The little-endian bytes.
        data: &'a [u8],
    },
    /// A GGML block-quantized tensor from a GGUF file, rows as llama.cpp stores them.
    Ggml {
        /// The tensor.
        tensor: Arc<QTensor>,
        /// llama.cpp permutes the rows of q/k projections per head; the head count to undo it
        /// with, where that applies.
        unpermute_heads: Option<usize>,
    },
}

/// Where a model's frozen tensors come from: a checkpoint, random initialisation, or shape-only
/// placeholders. Any `FnMut(&str, &[usize]) -> Result<Tensor>` is one.
pub trait WeightSource {
    /// The tensor `name` (a Hugging Face name, `model.layers.0.self_attn.q_proj.weight`) with
    /// `shape`, in the dtype the model is built in.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;

    /// The tensor `name` as stored, when the source keeps files (for quantized bases).
    fn stored(&self, _name: &str) -> Result<Option<StoredTensor<'_>>> {
        Ok(None)
    }

    /// Whether the source holds `name` (sources that make tensors up hold every name).
    fn contains(&self, _name: &str) -> bool {
        true
    }

    /// Where the tensors come from, for error messages.
    fn origin(&self) -> String {
        "generated weights".into()
    }
}

impl<F: FnMut(&str, &[usize]) -> Result<Tensor>> WeightSource for F {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self(name, shape)
    }
}

/// What a linear layer serves as, so that factories can treat output heads apart (transformers
/// keeps them dense when quantizing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearRole {
    /// A projection inside the network.
    Hidden,
    /// An output head (`lm_head`, a classifier).
    OutputHead,
}

/// A frozen linear layer a model declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSpec {
    /// Module path (`model.layers.0.self_attn.q_proj`); its tensors are `<path>.weight` and
    /// `<path>.bias`.
    pub path: String,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Whether it has a bias.
    pub bias: bool,
    /// Whether the weight is stored `[in, out]` (GPT-2's Conv1D) rather than `[out, in]`.
    pub transposed: bool,
    /// Hidden projection or output head.
    pub role: LinearRole,
    /// The architecture keeps this layer in full precision when quantizing (transformers'
    /// `_keep_in_fp32_modules`, e.g. T5's `wo`).
    pub keep_full_precision: bool,
}

impl LinearSpec {
    /// The stored weight shape: `[out, in]`, or `[in, out]` when transposed.
    pub fn weight_shape(&self) -> [usize; 2] {
        if self.transposed {
            [self.in_features, self.out_features]
        } else {
            [self.out_features, self.in_features]
        }
    }

    /// Reads the bias (when the layer has one) from `src`.
    pub fn read_bias(&self, src: &mut dyn WeightSource) -> Result<Option<Tensor>> {
        if self.bias {
            Ok(Some(src.tensor(
                &format!("{}.bias", self.path),
                &[self.out_features],
            )?))
        } else {
            Ok(None)
        }
    }

    /// The dense layer: weight and bias read from `src` in the build's dtype.
    pub fn dense(&self, src: &mut dyn WeightSource) -> Result<LinearSlot> {
        let weight = src.tensor(&format!("{}.weight", self.path), &self.weight_shape())?;
        let bias = self.read_bias(src)?;
        let layer = if self.transposed {
            DenseLinear::new_transposed(weight, bias)?
        } else {
            DenseLinear::new(weight, bias)?
        };
        Ok(layer.into_slot())
    }
}

/// Makes base linear layers of one kind (dense, bitsandbytes int8/NF4, GGUF blocks). Asked for
/// every linear layer a model declares, in order; `None` passes the layer to the next factory.
pub trait BaseLayerFactory {
    /// A short name for messages (`bitsandbytes nf4`).
    fn name(&self) -> String;

    /// The layer for `spec`, or `None` when this factory does not make it.
    fn linear(
        &mut self,
        spec: &LinearSpec,
        src: &mut dyn WeightSource,
    ) -> Result<Option<LinearSlot>>;

    /// Called once the whole model is declared: a factory that expected layers it was never
    /// asked for (a checkpoint with tensors the model does not have) says so here.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Handle of a linear layer in a [`ModuleTree`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearId(pub(crate) usize);
/// Handle of an embedding in a [`ModuleTree`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingId(pub(crate) usize);
/// Handle of a plain parameter (a norm scale, a bias, a position table) in a [`ModuleTree`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamId(pub(crate) usize);

/// A norm layer's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormIds {
    /// The scale (`<path>.weight`).
    pub weight: ParamId,
    /// The shift (`<path>.bias`), for layer norms that have one.
    pub bias: Option<ParamId>,
}

#[derive(Debug, Clone)]
struct LinearEntry {
    path: String,
    slot: LinearSlot,
    /// For a head built from an embedding's table: that layer as built, so the head counts as
    /// tied while the slot still holds it.
    tied: Option<LinearSlot>,
}

#[derive(Debug, Clone)]
enum Declared {
    Linear,
    Embedding,
    Other(&'static str),
}

/// Every module and parameter a model declared, in declaration (= `named_modules()`) order.
#[derive(Debug, Clone, Default)]
pub struct ModuleTree {
    modules: Vec<(String, Declared)>,
    linears: Vec<LinearEntry>,
    embeddings: Vec<EmbeddingEntry>,
    params: Vec<(String, Tensor)>,
}

#[derive(Debug, Clone)]
struct EmbeddingEntry {
    path: String,
    slot: EmbeddingSlot,
    /// Another module's view of an embedding declared earlier (T5's `encoder.embed_tokens`
    /// is `shared`): neither counted nor saved again.
    alias_of: Option<EmbeddingId>,
}

impl ModuleTree {
    /// A linear layer.
    pub fn linear(&self, id: LinearId) -> &LinearSlot {
        &self.linears[id.0].slot
    }

    /// An embedding.
    pub fn embedding(&self, id: EmbeddingId) -> &EmbeddingSlot {
        &self.embeddings[id.0].slot
    }

    /// A plain parameter.
    pub fn param(&self, id: ParamId) -> &Tensor {
        &self.params[id.0].1
    }

    /// An optional plain parameter.
    pub fn opt_param(&self, id: Option<ParamId>) -> Option<&Tensor> {
        id.map(|id| self.param(id))
    }

    /// Whether a head built tied to an embedding still shares its table (no method has
    /// replaced it).
    pub fn is_tied(&self, id: LinearId) -> bool {
        let entry = &self.linears[id.0];
        // Still the shared layer, or the shared layer with adapters attached (its weight is
        // still the embedding's).
        entry.tied.as_ref().is_some_and(|t| {
            Arc::ptr_eq(t, &entry.slot)
                || crate::adapted::AdaptedLinear::from_slot(&entry.slot)
                    .is_some_and(|a| Arc::ptr_eq(t, a.original()))
        })
    }

    /// The paths of the heads built tied to an embedding's table (`lm_head` with
    /// `tie_word_embeddings`).
    pub fn tied_heads(&self) -> Vec<String> {
        self.linears
            .iter()
            .filter(|e| e.tied.is_some())
            .map(|e| e.path.clone())
            .collect()
    }

    /// Every declared module in `named_modules()` order.
    pub fn modules(&self) -> Vec<ModuleEntry> {
        self.modules
            .iter()
            .map(|(path, d)| {
                let kind = match d {
                    Declared::Linear => ModuleKind::Linear,
                    Declared::Embedding => ModuleKind::Embedding,
                    Declared::Other(class) => ModuleKind::Other(class),
                };
                ModuleEntry::new(path.clone(), kind)
            })
            .collect()
    }

    /// Each linear slot and its path, in declaration order, read-only.
    pub fn linear_slots(&self) -> impl Iterator<Item = (&str, &LinearSlot)> {
        self.linears.iter().map(|e| (e.path.as_str(), &e.slot))
    }

    /// Each embedding slot and its path, in declaration order, read-only.
    pub fn embedding_slots(&self) -> impl Iterator<Item = (&str, &EmbeddingSlot)> {
        self.embeddings.iter().map(|e| (e.path.as_str(), &e.slot))
    }

    /// Calls `f` with each linear slot and its path, in declaration order.
    pub fn visit_linears(
        &mut self,
        f: &mut dyn FnMut(&str, &mut LinearSlot) -> Result<()>,
    ) -> Result<()> {
        self.linears
            .iter_mut()
            .try_for_each(|e| f(&e.path, &mut e.slot))
    }

    /// Calls `f` with each embedding slot and its path, in declaration order.
    pub fn visit_embeddings(
        &mut self,
        f: &mut dyn FnMut(&str, &mut EmbeddingSlot) -> Result<()>,
    ) -> Result<()> {
        self.embeddings
            .iter_mut()
            .try_for_each(|e| f(&e.path, &mut e.slot))
    }

    /// Calls `f` with each plain parameter (norm scales and shifts, position tables) and its
    /// full name (`model.layers.0.input_layernorm.weight`), in declaration order. A method that
    /// trains them (LN tuning, bias tuning) puts a `Var`'s tensor in the slot; the model reads
    /// the slot on every forward pass.
    pub fn visit_params(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
    ) -> Result<()> {
        self.params.iter_mut().try_for_each(|(name, t)| {
            let shape = t.dims().to_vec();
            f(name, t)?;
            if t.dims() != shape.as_slice() {
                return Err(PeftError::InvalidState(format!(
                    "{name}: a parameter of shape {shape:?} was replaced by one of shape {:?}",
                    t.dims()
                )));
            }
            Ok(())
        })
    }

    /// Parameters, each distinct tensor once (a tied head is its embedding's table; replicated
    /// layers share their source's weights).
    pub fn num_parameters(&self) -> usize {
        let embeddings: usize = self
            .embeddings
            .iter()
            .filter(|e| e.alias_of.is_none())
            .map(|e| e.slot.num_embeddings() * e.slot.embedding_dim())
            .sum();
        let mut seen_layers = std::collections::HashSet::new();
        let linears: usize = (0..self.linears.len())
            .filter(|&i| !self.is_tied(LinearId(i)))
            .filter(|&i| {
                let slot = &self.linears[i].slot;
                let shared =
                    crate::adapted::AdaptedLinear::from_slot(slot).map_or(slot, |a| a.original());
                seen_layers.insert(Arc::as_ptr(shared) as *const () as usize)
            })
            .map(|i| self.linears[i].slot.num_params())
            .sum();
        let mut seen_params = std::collections::HashSet::new();
        let params: usize = self
            .params
            .iter()
            .filter(|(_, t)| seen_params.insert(t.id()))
            .map(|(_, t)| t.elem_count())
            .sum();
        embeddings + linears + params
    }

    /// Rebuilds every list with the layers under `prefix` replaced by copies of `sources`
    /// (see [`crate::replicate`]); returns the linear, embedding and parameter id maps.
    pub(crate) fn rebuild_layers(
        &mut self,
        prefix: &str,
        sources: &[usize],
    ) -> (
        crate::replicate::IdMap,
        crate::replicate::IdMap,
        crate::replicate::IdMap,
    ) {
        use crate::replicate::rebuild;
        let (modules, _) = rebuild(&self.modules, prefix, sources, |m| &m.0, |m, p| m.0 = p);
        let (linears, lmap) = rebuild(
            &self.linears,
            prefix,
            sources,
            |e| &e.path,
            |e, p| e.path = p,
        );
        let (mut embeddings, emap) = rebuild(
            &self.embeddings,
            prefix,
            sources,
            |e| &e.path,
            |e, p| e.path = p,
        );
        for e in &mut embeddings {
            if let Some(alias) = e.alias_of {
                e.alias_of = emap.outer.get(&alias.0).map(|&i| EmbeddingId(i));
            }
        }
        let (params, pmap) = rebuild(&self.params, prefix, sources, |p| &p.0, |p, n| p.0 = n);
        self.modules = modules;
        self.linears = linears;
        self.embeddings = embeddings;
        self.params = params;
        (lmap, emap, pmap)
    }

    /// The tensors under their Hugging Face names, tied weights once.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for e in self.embeddings.iter().filter(|e| e.alias_of.is_none()) {
            out.push((format!("{}.weight", e.path), e.slot.weight()?));
        }
        for (i, e) in self.linears.iter().enumerate() {
            if self.is_tied(LinearId(i)) {
                continue;
            }
            out.push((format!("{}.weight", e.path), e.slot.weight()?));
            if let Some(b) = e.slot.bias() {
                out.push((format!("{}.bias", e.path), b.clone()));
            }
        }
        out.extend(self.params.iter().cloned());
        Ok(out)
    }
}

/// Declares a model's modules into a [`ModuleTree`], taking tensors from a [`WeightSource`] and
/// base linear layers from the factories. Scopes from [`ModelBuilder::root`] name the paths.
pub struct ModelBuilder<'s> {
    source: &'s mut dyn WeightSource,
    factories: Vec<Box<dyn BaseLayerFactory>>,
    tree: ModuleTree,
}

impl std::fmt::Debug for ModelBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelBuilder")
            .field("origin", &self.source.origin())
            .field(
                "factories",
                &self.factories.iter().map(|x| x.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<'s> ModelBuilder<'s> {
    /// A builder reading from `source`, with dense base layers only.
    pub fn new(source: &'s mut dyn WeightSource) -> Self {
        ModelBuilder {
            source,
            factories: Vec::new(),
            tree: ModuleTree::default(),
        }
    }

    /// A builder that asks `factories`, in order, for each linear layer before building it
    /// dense.
    pub fn with_factories(
        source: &'s mut dyn WeightSource,
        factories: Vec<Box<dyn BaseLayerFactory>>,
    ) -> Self {
        ModelBuilder {
            source,
            factories,
            tree: ModuleTree::default(),
        }
    }

    /// The root scope (paths start empty).
    pub fn root(&mut self) -> Scope<'_, 's> {
        Scope {
            b: self,
            prefix: String::new(),
        }
    }

    /// The declared tree, once every factory agrees the declaration is complete.
    pub fn finish(mut self) -> Result<ModuleTree> {
        for f in &mut self.factories {
            f.finish()?;
        }
        Ok(self.tree)
    }

    fn push_linear(
        &mut self,
        path: String,
        slot: LinearSlot,
        tied: Option<LinearSlot>,
    ) -> LinearId {
        let id = self.tree.linears.len();
        self.tree.modules.push((path.clone(), Declared::Linear));
        self.tree.linears.push(LinearEntry { path, slot, tied });
        LinearId(id)
    }
}

/// A path inside a [`ModelBuilder`]: what it declares is named `<prefix>.<name>`.
pub struct Scope<'a, 's> {
    b: &'a mut ModelBuilder<'s>,
    prefix: String,
}

impl std::fmt::Debug for Scope<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl<'s> Scope<'_, 's> {
    /// The full path of `name` in this scope.
    pub fn path(&self, name: impl Display) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// This scope's own path.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A sub-scope (`vb.pp("layers")` in candle).
    pub fn pp(&mut self, name: impl Display) -> Scope<'_, 's> {
        let prefix = self.path(name);
        Scope { b: self.b, prefix }
    }

    /// Declares a container module of transformers class `class` and returns its scope.
    pub fn container(&mut self, name: impl Display, class: &'static str) -> Scope<'_, 's> {
        let prefix = self.path(name);
        self.b
            .tree
            .modules
            .push((prefix.clone(), Declared::Other(class)));
        Scope { b: self.b, prefix }
    }

    /// Declares a module without parameters (an activation, a dropout, a rotary embedding).
    pub fn module(&mut self, name: impl Display, class: &'static str) {
        let path = self.path(name);
        self.b.tree.modules.push((path, Declared::Other(class)));
    }

    /// Declares a plain parameter `<prefix>.<name>` (no module of its own).
    pub fn param(&mut self, name: impl Display, shape: &[usize]) -> Result<ParamId> {
        let path = self.path(name);
        let t = self.b.source.tensor(&path, shape)?;
        let id = self.b.tree.params.len();
        self.b.tree.params.push((path, t));
        Ok(ParamId(id))
    }

    /// Declares a norm module (`weight`, and `bias` for layer norms that have one).
    pub fn norm(
        &mut self,
        name: impl Display,
        class: &'static str,
        dim: usize,
        bias: bool,
    ) -> Result<NormIds> {
        let mut n = self.container(name, class);
        let weight = n.param("weight", &[dim])?;
        let bias = if bias {
            Some(n.param("bias", &[dim])?)
        } else {
            None
        };
        Ok(NormIds { weight, bias })
    }

    /// Declares an embedding table `[num, dim]`.
    pub fn embedding(
        &mut self,
        name: impl Display,
        num: usize,
        dim: usize,
        padding_idx: Option<usize>,
    ) -> Result<EmbeddingId> {
        let path = self.path(name);
        let w = self
            .b
            .source
            .tensor(&format!("{path}.weight"), &[num, dim])?;
        Ok(self.push_embedding(path, DenseEmbedding::new(w, padding_idx)?.into_slot(), None))
    }

    /// Declares a module that is another name for embedding `of` (transformers shares one
    /// module under both paths): its own slot over the same table, counted and saved once.
    pub fn tied_embedding(&mut self, name: impl Display, of: EmbeddingId) -> Result<EmbeddingId> {
        let path = self.path(name);
        let source = self.b.tree.embedding(of);
        let slot = DenseEmbedding::new(source.weight()?, source.padding_idx())?.into_slot();
        Ok(self.push_embedding(path, slot, Some(of)))
    }

    fn push_embedding(
        &mut self,
        path: String,
        slot: EmbeddingSlot,
        alias_of: Option<EmbeddingId>,
    ) -> EmbeddingId {
        let tree = &mut self.b.tree;
        let id = tree.embeddings.len();
        tree.modules.push((path.clone(), Declared::Embedding));
        tree.embeddings.push(EmbeddingEntry {
            path,
            slot,
            alias_of,
        });
        EmbeddingId(id)
    }

    /// Declares a linear layer, weight `[out, in]`.
    pub fn linear(
        &mut self,
        name: impl Display,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<LinearId> {
        self.declare_linear(LinearSpec {
            path: self.path(name),
            in_features,
            out_features,
            bias,
            transposed: false,
            role: LinearRole::Hidden,
            keep_full_precision: false,
        })
    }

    /// Declares a linear layer whose weight is stored `[in, out]` (transformers' `Conv1D`).
    pub fn conv1d(
        &mut self,
        name: impl Display,
        in_features: usize,
        out_features: usize,
    ) -> Result<LinearId> {
        self.declare_linear(LinearSpec {
            path: self.path(name),
            in_features,
            out_features,
            bias: true,
            transposed: true,
            role: LinearRole::Hidden,
            keep_full_precision: false,
        })
    }

    /// Declares an output head: tied to `tie`'s table when given (then it has no tensors of its
    /// own and no factory is asked), else a linear layer of its own.
    pub fn head(
        &mut self,
        name: impl Display,
        in_features: usize,
        out_features: usize,
        bias: bool,
        tie: Option<EmbeddingId>,
    ) -> Result<LinearId> {
        let path = self.path(name);
        if let Some(e) = tie {
            let table = self.b.tree.embedding(e).weight()?;
            let slot = DenseLinear::new(table, None)?.into_slot();
            return Ok(self.b.push_linear(path, Arc::clone(&slot), Some(slot)));
        }
        self.declare_linear(LinearSpec {
            path,
            in_features,
            out_features,
            bias,
            transposed: false,
            role: LinearRole::OutputHead,
            keep_full_precision: false,
        })
    }

    /// Declares a linear layer described in full (for layers an architecture keeps in full
    /// precision, or with other particulars).
    pub fn declare_linear(&mut self, spec: LinearSpec) -> Result<LinearId> {
        let b = &mut *self.b;
        let mut made = None;
        for f in &mut b.factories {
            if let Some(slot) = f.linear(&spec, &mut *b.source)? {
                check_made(&spec, &slot, &f.name())?;
                made = Some(slot);
                break;
            }
        }
        let slot = match made {
            Some(s) => s,
            None => spec.dense(&mut *b.source)?,
        };
        Ok(b.push_linear(spec.path, slot, None))
    }
}

fn check_made(spec: &LinearSpec, slot: &LinearSlot, factory: &str) -> Result<()> {
    let (i, o) = (slot.in_features(), slot.out_features());
    if (i, o) != (spec.in_features, spec.out_features) {
        return Err(PeftError::InvalidState(format!(
            "{}: the {factory} factory made a [{o}, {i}] layer, expected [{}, {}]",
            spec.path, spec.out_features, spec.in_features
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{DType, Device};

    fn zeros(_: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::zeros(shape, DType::F32, &Device::Cpu)?)
    }

    #[test]
    fn declarations_give_paths_listing_tensors_and_counts() -> Result<()> {
        let mut src = zeros;
        let mut b = ModelBuilder::new(&mut src);
        let mut root = b.root();
        let mut m = root.container("model", "Tiny");
        let e = m.embedding("embed", 10, 4, None)?;
        let mut l = m.container("layers.0", "Block");
        l.linear("proj", 4, 6, true)?;
        l.norm("ln", "LayerNorm", 4, true)?;
        l.module("act", "GELU");
        let head = root.head("lm_head", 4, 10, false, Some(e))?;
        let tree = b.finish()?;
        let paths: Vec<_> = tree.modules().into_iter().map(|m| m.path).collect();
        assert_eq!(
            paths,
            [
                "model",
                "model.embed",
                "model.layers.0",
                "model.layers.0.proj",
                "model.layers.0.ln",
                "model.layers.0.act",
                "lm_head"
            ]
        );
        assert!(tree.is_tied(head));
        assert_eq!(tree.num_parameters(), 40 + 24 + 6 + 8);
        let names: Vec<_> = tree.named_tensors()?.into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "model.embed.weight",
                "model.layers.0.proj.weight",
                "model.layers.0.proj.bias",
                "model.layers.0.ln.weight",
                "model.layers.0.ln.bias"
            ]
        );
        Ok(())
    }

    struct Refuse;
    impl BaseLayerFactory for Refuse {
        fn name(&self) -> String {
            "wrong".into()
        }
        fn linear(
            &mut self,
            spec: &LinearSpec,
            _: &mut dyn WeightSource,
        ) -> Result<Option<LinearSlot>> {
            let w = Tensor::zeros((3, 3), DType::F32, &Device::Cpu)?;
            Ok((spec.role == LinearRole::Hidden)
                .then(|| DenseLinear::new(w, None).unwrap().into_slot()))
        }
    }

    #[test]
    fn factories_are_asked_first_and_checked() -> Result<()> {
        let mut src = zeros;
        let mut b = ModelBuilder::with_factories(&mut src, vec![Box::new(Refuse)]);
        // Output heads pass through to the dense fallback.
        b.root().head("head", 4, 2, false, None)?;
        let err = b
            .root()
            .linear("proj", 4, 6, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("proj") && err.contains("wrong"), "{err}");
        Ok(())
    }
}
