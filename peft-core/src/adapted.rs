//! Core's wrappers around adapted slots. An [`AdaptedLinear`] keeps the original base layer,
//! the adapters of every named adapter that targets it, and (after a merge) a base layer with
//! the active adapters folded in. Which adapters run is read from the [`RuntimeState`] shared
//! by all wrappers of one `PeftModel`, so switching adapters or disabling them touches no layer.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::layers::{EmbeddingLike, EmbeddingSlot, LinearLike, LinearSlot};
use crate::method::{EmbeddingAdapter, LinearAdapter};

/// State shared by every adapted layer of one model.
#[derive(Debug, Default)]
pub struct RuntimeState {
    active: RwLock<Vec<String>>,
    disabled: AtomicBool,
    training: AtomicBool,
}

impl RuntimeState {
    /// The active adapter names.
    pub fn active(&self) -> Vec<String> {
        self.active.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Sets the active adapters.
    pub fn set_active(&self, names: Vec<String>) {
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = names;
    }
    fn is_active(&self, name: &str) -> bool {
        self.active.read().unwrap_or_else(|p| p.into_inner()).iter().any(|n| n == name)
    }
    /// Whether all adapters are bypassed.
    pub fn disabled(&self) -> bool {
        self.disabled.load(Ordering::Acquire)
    }
    /// Bypasses (or restores) all adapters; returns the previous value.
    pub fn set_disabled(&self, disabled: bool) -> bool {
        self.disabled.swap(disabled, Ordering::AcqRel)
    }
    /// Whether the model is in training mode (dropout on).
    pub fn training(&self) -> bool {
        self.training.load(Ordering::Acquire)
    }
    /// Sets training mode.
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Release);
    }
}

/// A linear layer with adapters attached.
#[derive(Debug, Clone)]
pub struct AdaptedLinear {
    original: LinearSlot,
    merged: Option<(LinearSlot, Vec<String>)>,
    adapters: Vec<(String, Arc<dyn LinearAdapter>)>,
    state: Arc<RuntimeState>,
}

impl AdaptedLinear {
    /// Finds core's wrapper behind a slot.
    pub fn from_slot(slot: &LinearSlot) -> Option<&AdaptedLinear> {
        slot.as_any().downcast_ref::<AdaptedLinear>()
    }

    /// Attaches `adapter` under `name` to `slot`, wrapping it if it is not wrapped yet.
    pub fn attach(slot: &LinearSlot, name: &str, adapter: Arc<dyn LinearAdapter>, state: &Arc<RuntimeState>) -> LinearSlot {
        let mut wrapped = match Self::from_slot(slot) {
            Some(existing) => existing.clone(),
            None => AdaptedLinear {
                original: Arc::clone(slot),
                merged: None,
                adapters: Vec::new(),
                state: Arc::clone(state),
            },
        };
        wrapped.adapters.retain(|(n, _)| n != name);
        wrapped.adapters.push((name.to_string(), adapter));
        Arc::new(wrapped)
    }

    /// The slot without adapter `name`; the bare base layer once no adapter is left.
    pub fn detach(&self, name: &str) -> LinearSlot {
        let mut out = self.clone();
        out.adapters.retain(|(n, _)| n != name);
        out.merged = None;
        if out.adapters.is_empty() {
            Arc::clone(&self.original)
        } else {
            Arc::new(out)
        }
    }

    /// The base layer as loaded, before any merge.
    pub fn original(&self) -> &LinearSlot {
        &self.original
    }

    /// This layer with a different base layer (peft loads `base_layer.weight` from checkpoints
    /// that carry it); any merge is dropped.
    pub fn with_original(&self, original: LinearSlot) -> LinearSlot {
        let mut out = self.clone();
        out.original = original;
        out.merged = None;
        Arc::new(out)
    }

    /// Names of the adapters attached here.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Names of the adapters folded into the base weights.
    pub fn merged_names(&self) -> &[String] {
        self.merged.as_ref().map_or(&[], |(_, names)| names.as_slice())
    }

    /// A base layer with the adapters named in `names` folded into its weights.
    pub fn merged_base(&self, names: &[String]) -> Result<LinearSlot> {
        let chosen: Vec<&Arc<dyn LinearAdapter>> =
            self.adapters.iter().filter(|(n, _)| names.contains(n)).map(|(_, a)| a).collect();
        if chosen.is_empty() {
            return Ok(Arc::clone(&self.original));
        }
        let stored = self.original.weight()?;
        let dtype = stored.dtype();
        let transposed = self.original.stores_transposed();
        let mut weight = stored.to_dtype(DType::F32)?;
        if transposed {
            weight = weight.t()?.contiguous()?;
        }
        let mut bias = self.original.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
        for adapter in chosen {
            let (w, b) = adapter.merge(&weight, bias.as_ref())?;
            weight = w;
            bias = b;
        }
        if transposed {
            weight = weight.t()?.contiguous()?;
        }
        let bias_dtype = self.original.bias().map_or(dtype, |b| b.dtype());
        self.original.with_weights(weight.to_dtype(dtype)?, bias.map(|b| b.to_dtype(bias_dtype)).transpose()?)
    }

    /// This layer with `names` merged into its base (replacing any earlier merge).
    pub fn with_merged(&self, names: &[String]) -> Result<LinearSlot> {
        let mut out = self.clone();
        let applicable: Vec<String> =
            names.iter().filter(|n| self.adapters.iter().any(|(a, _)| a == *n)).cloned().collect();
        out.merged = if applicable.is_empty() { None } else { Some((self.merged_base(&applicable)?, applicable)) };
        Ok(Arc::new(out))
    }

    /// This layer with no merged weights.
    pub fn unmerged(&self) -> LinearSlot {
        let mut out = self.clone();
        out.merged = None;
        Arc::new(out)
    }
}

impl LinearLike for AdaptedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.state.disabled() {
            return self.original.forward(x);
        }
        let (base, merged): (&LinearSlot, &[String]) = match &self.merged {
            Some((base, names)) => (base, names),
            None => (&self.original, &[]),
        };
        let running: Vec<&Arc<dyn LinearAdapter>> = self
            .adapters
            .iter()
            .filter(|(n, _)| self.state.is_active(n) && !merged.contains(n))
            .map(|(_, a)| a)
            .collect();
        let mut input = x.clone();
        for adapter in &running {
            if let Some(changed) = adapter.adapt_input(&input)? {
                input = changed;
            }
        }
        let mut y = base.forward(&input)?;
        let training = self.state.training();
        for adapter in &running {
            y = adapter.adapt_output(x, y, training)?;
        }
        Ok(y)
    }
    fn in_features(&self) -> usize {
        self.original.in_features()
    }
    fn out_features(&self) -> usize {
        self.original.out_features()
    }
    fn weight(&self) -> Result<Tensor> {
        self.original.weight()
    }
    fn stores_transposed(&self) -> bool {
        self.original.stores_transposed()
    }
    fn bias(&self) -> Option<&Tensor> {
        self.original.bias()
    }
    fn dtype(&self) -> DType {
        self.original.dtype()
    }
    fn num_params(&self) -> usize {
        self.original.num_params()
    }
    fn with_weights(&self, weight: Tensor, bias: Option<Tensor>) -> Result<Arc<dyn LinearLike>> {
        self.original.with_weights(weight, bias)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// An embedding table with adapters attached.
#[derive(Debug, Clone)]
pub struct AdaptedEmbedding {
    original: EmbeddingSlot,
    merged: Option<(EmbeddingSlot, Vec<String>)>,
    adapters: Vec<(String, Arc<dyn EmbeddingAdapter>)>,
    state: Arc<RuntimeState>,
}

impl AdaptedEmbedding {
    /// Finds core's wrapper behind a slot.
    pub fn from_slot(slot: &EmbeddingSlot) -> Option<&AdaptedEmbedding> {
        slot.as_any().downcast_ref::<AdaptedEmbedding>()
    }

    /// Attaches `adapter` under `name` to `slot`.
    pub fn attach(
        slot: &EmbeddingSlot,
        name: &str,
        adapter: Arc<dyn EmbeddingAdapter>,
        state: &Arc<RuntimeState>,
    ) -> EmbeddingSlot {
        let mut wrapped = match Self::from_slot(slot) {
            Some(existing) => existing.clone(),
            None => AdaptedEmbedding {
                original: Arc::clone(slot),
                merged: None,
                adapters: Vec::new(),
                state: Arc::clone(state),
            },
        };
        wrapped.adapters.retain(|(n, _)| n != name);
        wrapped.adapters.push((name.to_string(), adapter));
        Arc::new(wrapped)
    }

    /// The slot without adapter `name`.
    pub fn detach(&self, name: &str) -> EmbeddingSlot {
        let mut out = self.clone();
        out.adapters.retain(|(n, _)| n != name);
        out.merged = None;
        if out.adapters.is_empty() {
            Arc::clone(&self.original)
        } else {
            Arc::new(out)
        }
    }

    /// The table as loaded.
    pub fn original(&self) -> &EmbeddingSlot {
        &self.original
    }

    /// This table with a different base table; any merge is dropped.
    pub fn with_original(&self, original: EmbeddingSlot) -> EmbeddingSlot {
        let mut out = self.clone();
        out.original = original;
        out.merged = None;
        Arc::new(out)
    }

    /// Names of the adapters folded into the base table.
    pub fn merged_names(&self) -> &[String] {
        self.merged.as_ref().map_or(&[], |(_, names)| names.as_slice())
    }

    /// A base table with the adapters in `names` folded in.
    pub fn merged_base(&self, names: &[String]) -> Result<EmbeddingSlot> {
        let chosen: Vec<&Arc<dyn EmbeddingAdapter>> =
            self.adapters.iter().filter(|(n, _)| names.contains(n)).map(|(_, a)| a).collect();
        if chosen.is_empty() {
            return Ok(Arc::clone(&self.original));
        }
        let stored = self.original.weight()?;
        let dtype = stored.dtype();
        let mut weight = stored.to_dtype(DType::F32)?;
        for adapter in chosen {
            weight = adapter.merge(&weight)?;
        }
        self.original.with_weight(weight.to_dtype(dtype)?)
    }

    /// This table with `names` merged.
    pub fn with_merged(&self, names: &[String]) -> Result<EmbeddingSlot> {
        let mut out = self.clone();
        let applicable: Vec<String> =
            names.iter().filter(|n| self.adapters.iter().any(|(a, _)| a == *n)).cloned().collect();
        out.merged = if applicable.is_empty() { None } else { Some((self.merged_base(&applicable)?, applicable)) };
        Ok(Arc::new(out))
    }

    /// This table with no merged weights.
    pub fn unmerged(&self) -> EmbeddingSlot {
        let mut out = self.clone();
        out.merged = None;
        Arc::new(out)
    }
}

impl EmbeddingLike for AdaptedEmbedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        if self.state.disabled() {
            return self.original.forward(ids);
        }
        let (base, merged): (&EmbeddingSlot, &[String]) = match &self.merged {
            Some((base, names)) => (base, names),
            None => (&self.original, &[]),
        };
        let mut y = base.forward(ids)?;
        let training = self.state.training();
        for (name, adapter) in &self.adapters {
            if self.state.is_active(name) && !merged.contains(name) {
                y = adapter.adapt_output(ids, y, training)?;
            }
        }
        Ok(y)
    }
    fn num_embeddings(&self) -> usize {
        self.original.num_embeddings()
    }
    fn embedding_dim(&self) -> usize {
        self.original.embedding_dim()
    }
    fn weight(&self) -> Result<Tensor> {
        self.original.weight()
    }
    fn padding_idx(&self) -> Option<usize> {
        self.original.padding_idx()
    }
    fn dtype(&self) -> DType {
        self.original.dtype()
    }
    fn with_weight(&self, weight: Tensor) -> Result<Arc<dyn EmbeddingLike>> {
        self.original.with_weight(weight)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
