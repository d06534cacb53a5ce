//! Core's wrappers around adapted slots. An [`Adapted`] layer keeps the original base layer,
//! the adapters of every named adapter that targets it, and (after a merge) a base layer with
//! the active adapters folded in. Which adapters run is read from the [`RuntimeState`] shared
//! by all wrappers of one `PeftModel`, so switching adapters or disabling them touches no layer.
//! One generic wrapper serves linear layers ([`AdaptedLinear`]) and embeddings
//! ([`AdaptedEmbedding`]); [`SlotKind`] holds what differs between them.

use std::any::Any;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use candle_core::{DType, Tensor};

use crate::error::{PeftError, Result};
use crate::layers::{EmbeddingLike, EmbeddingSlot, LinearLike, LinearSlot};
use crate::method::{EmbeddingAdapter, LinearAdapter};

/// The name peft's `adapter_names` uses for rows that run the base model alone.
pub const BASE_ROWS: &str = "__base__";

/// Which adapter each row of a batch runs (peft's `adapter_names`): the rows grouped by
/// adapter, so that each adapter runs once per forward pass on its own rows.
#[derive(Debug)]
pub struct RowAdapters {
    rows: usize,
    /// Adapter name, its rows (`u32` indices, on the device and on the host), in order of first
    /// appearance; base rows are in no group.
    groups: Vec<(String, Tensor, Vec<u32>)>,
    /// The put-back when every group runs (a layer holding all the batch's adapters, the common
    /// case): the rows no group covers and the inverse permutation of the stacked pieces.
    all_run: Placement,
}

/// Where the pieces of a mixed output go: the uncovered rows to copy from the base output,
/// and the index that puts the stacked pieces back in row order.
#[derive(Debug)]
struct Placement {
    rest: Option<Tensor>,
    inverse: Tensor,
}

impl Placement {
    /// The placement when the groups `ran` (in order) replaced their rows.
    fn new(rows: usize, ran: &[&[u32]], device: &candle_core::Device) -> Result<Self> {
        let mut covered = vec![false; rows];
        let mut order = Vec::with_capacity(rows);
        for idx in ran {
            for &i in *idx {
                covered[i as usize] = true;
                order.push(i);
            }
        }
        let rest: Vec<u32> = (0..rows as u32).filter(|&i| !covered[i as usize]).collect();
        order.extend(&rest);
        // Row `order[j]` of the output is row `j` of the stacked pieces.
        let mut inverse = vec![0u32; rows];
        for (j, &i) in order.iter().enumerate() {
            inverse[i as usize] = j as u32;
        }
        Ok(Placement {
            rest: if rest.is_empty() {
                None
            } else {
                Some(Tensor::new(rest.as_slice(), device)?)
            },
            inverse: Tensor::new(inverse.as_slice(), device)?,
        })
    }
}

impl RowAdapters {
    /// The grouping of `names` (one per batch row, [`BASE_ROWS`] for none), indices on
    /// `device`.
    pub fn new(names: &[String], device: &candle_core::Device) -> Result<Self> {
        let mut order: Vec<(String, Vec<u32>)> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if name == BASE_ROWS {
                continue;
            }
            match order.iter_mut().find(|(n, _)| n == name) {
                Some((_, rows)) => rows.push(i as u32),
                None => order.push((name.clone(), vec![i as u32])),
            }
        }
        let all: Vec<&[u32]> = order.iter().map(|(_, r)| r.as_slice()).collect();
        let all_run = Placement::new(names.len(), &all, device)?;
        let groups = order
            .into_iter()
            .map(|(n, rows)| Ok((n, Tensor::new(rows.as_slice(), device)?, rows)))
            .collect::<Result<_>>()?;
        Ok(RowAdapters {
            rows: names.len(),
            groups,
            all_run,
        })
    }

    /// Rows of the batch.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `y` (the base layer's output for input `x`, both batch-first) with each group's rows
    /// replaced by what `run(adapter, x_rows, y_rows)` makes of them (`None`: this layer has no
    /// such adapter, the rows stay). Rows are gathered and put back by index, exactly.
    fn apply(
        &self,
        x: &Tensor,
        y: Tensor,
        mut run: impl FnMut(&str, &Tensor, Tensor) -> Result<Option<Tensor>>,
    ) -> Result<Tensor> {
        if x.dim(0)? != self.rows || y.dim(0)? != self.rows {
            return Err(PeftError::InvalidState(format!(
                "adapter_names has {} entries but a layer's input has {} rows (peft requires one name per row)",
                self.rows,
                x.dim(0)?
            )));
        }
        if let [(name, _, host)] = self.groups.as_slice() {
            if host.len() == self.rows {
                return Ok(run(name, x, y.clone())?.unwrap_or(y));
            }
        }
        let (x, y) = (x.contiguous()?, y.contiguous()?);
        let mut pieces = Vec::new();
        let mut ran: Vec<&[u32]> = Vec::new();
        for (name, idx, host) in &self.groups {
            let ys = y.index_select(idx, 0)?;
            let Some(out) = run(name, &x.index_select(idx, 0)?, ys)? else {
                continue;
            };
            ran.push(host);
            pieces.push(out.to_dtype(y.dtype())?);
        }
        if pieces.is_empty() {
            return Ok(y);
        }
        let partial;
        let placement = if ran.len() == self.groups.len() {
            &self.all_run
        } else {
            partial = Placement::new(self.rows, &ran, y.device())?;
            &partial
        };
        if let Some(rest) = &placement.rest {
            pieces.push(y.index_select(rest, 0)?);
        }
        let stacked = Tensor::cat(&pieces, 0)?;
        Ok(stacked.index_select(&placement.inverse, 0)?)
    }
}

/// State shared by every adapted layer of one model.
#[derive(Debug, Default)]
pub struct RuntimeState {
    active: RwLock<Vec<String>>,
    disabled: AtomicBool,
    training: AtomicBool,
    rows: RwLock<Option<Arc<RowAdapters>>>,
}

impl RuntimeState {
    /// The active adapter names.
    pub fn active(&self) -> Vec<String> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    /// Sets the active adapters.
    pub fn set_active(&self, names: Vec<String>) {
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = names;
    }
    fn is_active(&self, name: &str) -> bool {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|n| n == name)
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
    /// The per-row adapters of the forward passes now running, if set.
    pub fn row_adapters(&self) -> Option<Arc<RowAdapters>> {
        self.rows.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Sets (or clears) the per-row adapters; returns the previous value.
    pub fn set_row_adapters(&self, rows: Option<Arc<RowAdapters>>) -> Option<Arc<RowAdapters>> {
        std::mem::replace(
            &mut *self.rows.write().unwrap_or_else(|p| p.into_inner()),
            rows,
        )
    }
}

/// What differs between adapted linear layers and adapted embeddings.
pub trait SlotKind: Debug + Clone + Sized + 'static {
    /// The slot type (`Arc<dyn LinearLike>`).
    type Slot: Clone + Debug;
    /// The per-layer adapter type (`Arc<dyn LinearAdapter>`).
    type Adapter: Clone + Debug;
    /// The layer trait object (`dyn LinearLike`).
    type Layer: ?Sized;
    /// A slot as a layer.
    fn layer(slot: &Self::Slot) -> &Self::Layer;
    /// The layer an adapter puts in place of the base one (`modules_to_save` copies).
    fn replacement(adapter: &Self::Adapter) -> Option<&Self::Layer>;
    /// Finds core's wrapper behind a slot.
    fn downcast(slot: &Self::Slot) -> Option<&Adapted<Self>>;
    /// Puts a wrapper back into a slot.
    fn into_slot(adapted: Adapted<Self>) -> Self::Slot;
    /// A base layer with `adapters` folded into `original`'s weights.
    fn fold(original: &Self::Slot, adapters: &[&Self::Adapter]) -> Result<Self::Slot>;
}

/// Marker for linear layers.
#[derive(Debug, Clone)]
pub struct LinearKind;
/// Marker for embedding tables.
#[derive(Debug, Clone)]
pub struct EmbeddingKind;

/// A layer with adapters attached.
#[derive(Debug, Clone)]
pub struct Adapted<K: SlotKind> {
    original: K::Slot,
    merged: Option<(K::Slot, Vec<String>)>,
    adapters: Vec<(String, K::Adapter)>,
    state: Arc<RuntimeState>,
}

/// A linear layer with adapters attached.
pub type AdaptedLinear = Adapted<LinearKind>;
/// An embedding table with adapters attached.
pub type AdaptedEmbedding = Adapted<EmbeddingKind>;

impl<K: SlotKind> Adapted<K> {
    /// Finds core's wrapper behind a slot.
    pub fn from_slot(slot: &K::Slot) -> Option<&Self> {
        K::downcast(slot)
    }

    /// Attaches `adapter` under `name` to `slot`, wrapping it if it is not wrapped yet.
    pub fn attach(
        slot: &K::Slot,
        name: &str,
        adapter: K::Adapter,
        state: &Arc<RuntimeState>,
    ) -> K::Slot {
        let mut wrapped = match K::downcast(slot) {
            Some(existing) => existing.clone(),
            None => Adapted {
                original: slot.clone(),
                merged: None,
                adapters: Vec::new(),
                state: Arc::clone(state),
            },
        };
        wrapped.adapters.retain(|(n, _)| n != name);
        wrapped.adapters.push((name.to_string(), adapter));
        K::into_slot(wrapped)
    }

    /// The slot without adapter `name`; the bare base layer once no adapter is left.
    pub fn detach(&self, name: &str) -> K::Slot {
        let mut out = self.clone();
        out.adapters.retain(|(n, _)| n != name);
        out.merged = None;
        if out.adapters.is_empty() {
            self.original.clone()
        } else {
            K::into_slot(out)
        }
    }

    /// The base layer as loaded, before any merge.
    pub fn original(&self) -> &K::Slot {
        &self.original
    }

    /// This layer with a different base layer (peft loads `base_layer.weight` from checkpoints
    /// that carry it); any merge is dropped.
    pub fn with_original(&self, original: K::Slot) -> K::Slot {
        let mut out = self.clone();
        out.original = original;
        out.merged = None;
        K::into_slot(out)
    }

    /// Names of the adapters attached here.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The adapter attached here under `name`.
    pub fn adapter(&self, name: &str) -> Option<&K::Adapter> {
        self.adapter_named(name)
    }

    /// Whether adapter `name` here is a full copy of the layer (`modules_to_save`) rather than
    /// a change to it.
    pub fn is_copy(&self, name: &str) -> bool {
        self.adapter_named(name)
            .is_some_and(|a| K::replacement(a).is_some())
    }

    /// Names of the adapters folded into the base weights.
    pub fn merged_names(&self) -> &[String] {
        self.merged
            .as_ref()
            .map_or(&[], |(_, names)| names.as_slice())
    }

    /// A base layer with the adapters named in `names` folded into its weights.
    pub fn merged_base(&self, names: &[String]) -> Result<K::Slot> {
        let chosen: Vec<&K::Adapter> = self
            .adapters
            .iter()
            .filter(|(n, _)| names.contains(n))
            .map(|(_, a)| a)
            .collect();
        if chosen.is_empty() {
            return Ok(self.original.clone());
        }
        K::fold(&self.original, &chosen)
    }

    /// This layer with `names` merged into its base (replacing any earlier merge).
    pub fn with_merged(&self, names: &[String]) -> Result<K::Slot> {
        let mut out = self.clone();
        let applicable: Vec<String> = names
            .iter()
            .filter(|n| self.adapters.iter().any(|(a, _)| a == *n))
            .cloned()
            .collect();
        out.merged = if applicable.is_empty() {
            None
        } else {
            Some((self.merged_base(&applicable)?, applicable))
        };
        Ok(K::into_slot(out))
    }

    /// This layer with no merged weights.
    pub fn unmerged(&self) -> K::Slot {
        let mut out = self.clone();
        out.merged = None;
        K::into_slot(out)
    }

    /// For a forward pass: the layer to run (the original when adapters are disabled; the
    /// merged one after a merge; an active `modules_to_save` copy) and the adapters to apply on
    /// it (active, not merged, not replacements).
    fn plan(&self) -> (&K::Layer, Vec<&K::Adapter>) {
        if self.state.disabled() {
            return (K::layer(&self.original), Vec::new());
        }
        let (base, merged): (&K::Slot, &[String]) = match &self.merged {
            Some((base, names)) => (base, names),
            None => (&self.original, &[]),
        };
        let mut layer = K::layer(base);
        let mut running = Vec::new();
        for (name, adapter) in &self.adapters {
            if !self.state.is_active(name) || merged.contains(name) {
                continue;
            }
            match K::replacement(adapter) {
                Some(replacement) => layer = replacement,
                None => running.push(adapter),
            }
        }
        (layer, running)
    }

    /// The mixed-batch plan: the original layer, and the adapter `name` on it (peft ignores the
    /// active set when `adapter_names` is given). `None` when adapters are disabled.
    fn mixed(&self) -> Option<(Arc<RowAdapters>, &K::Layer)> {
        if self.state.disabled() {
            return None;
        }
        let rows = self.state.row_adapters()?;
        Some((rows, K::layer(&self.original)))
    }

    fn adapter_named(&self, name: &str) -> Option<&K::Adapter> {
        self.adapters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
    }
}

impl SlotKind for LinearKind {
    type Slot = LinearSlot;
    type Adapter = Arc<dyn LinearAdapter>;
    type Layer = dyn LinearLike;

    fn layer(slot: &LinearSlot) -> &(dyn LinearLike + 'static) {
        slot.as_ref()
    }

    fn replacement(adapter: &Arc<dyn LinearAdapter>) -> Option<&(dyn LinearLike + 'static)> {
        adapter.replacement()
    }

    fn downcast(slot: &LinearSlot) -> Option<&AdaptedLinear> {
        slot.as_any().downcast_ref::<AdaptedLinear>()
    }

    fn into_slot(adapted: AdaptedLinear) -> LinearSlot {
        Arc::new(adapted)
    }

    fn fold(original: &LinearSlot, adapters: &[&Arc<dyn LinearAdapter>]) -> Result<LinearSlot> {
        let stored = original.weight()?;
        let dtype = stored.dtype();
        let transposed = original.stores_transposed();
        let mut weight = stored.to_dtype(DType::F32)?;
        if transposed {
            weight = weight.t()?.contiguous()?;
        }
        let mut bias = original
            .bias()
            .map(|b| b.to_dtype(DType::F32))
            .transpose()?;
        if adapters.iter().any(|a| !a.mergeable()) {
            return Err(PeftError::InvalidState(
                "an attached adapter's method cannot merge it into the base weights".into(),
            ));
        }
        let base_weight = weight.clone();
        for adapter in adapters {
            let (w, b) = adapter.merge(&weight, bias.as_ref(), &base_weight)?;
            weight = w;
            bias = b;
        }
        if transposed {
            weight = weight.t()?.contiguous()?;
        }
        let bias_dtype = original.bias().map_or(dtype, |b| b.dtype());
        // A merged weight is frozen, as peft merges under `torch.no_grad`: detached, it no
        // longer holds the adapters' graph, and it takes the frozen layers' product (a tracked
        // weight would fall back to candle's matmul and pass gradients to the folded adapters).
        original.with_weights(
            weight.to_dtype(dtype)?.detach(),
            bias.map(|b| b.to_dtype(bias_dtype).map(|b| b.detach()))
                .transpose()?,
        )
    }
}

impl SlotKind for EmbeddingKind {
    type Slot = EmbeddingSlot;
    type Adapter = Arc<dyn EmbeddingAdapter>;
    type Layer = dyn EmbeddingLike;

    fn layer(slot: &EmbeddingSlot) -> &(dyn EmbeddingLike + 'static) {
        slot.as_ref()
    }

    fn replacement(adapter: &Arc<dyn EmbeddingAdapter>) -> Option<&(dyn EmbeddingLike + 'static)> {
        adapter.replacement()
    }

    fn downcast(slot: &EmbeddingSlot) -> Option<&AdaptedEmbedding> {
        slot.as_any().downcast_ref::<AdaptedEmbedding>()
    }

    fn into_slot(adapted: AdaptedEmbedding) -> EmbeddingSlot {
        Arc::new(adapted)
    }

    fn fold(
        original: &EmbeddingSlot,
        adapters: &[&Arc<dyn EmbeddingAdapter>],
    ) -> Result<EmbeddingSlot> {
        let stored = original.weight()?;
        let dtype = stored.dtype();
        let mut weight = stored.to_dtype(DType::F32)?;
        if adapters.iter().any(|a| !a.mergeable()) {
            return Err(PeftError::InvalidState(
                "an attached adapter's method cannot merge it into the table".into(),
            ));
        }
        let base_weight = weight.clone();
        for adapter in adapters {
            weight = adapter.merge(&weight, &base_weight)?;
        }
        // Frozen like a merged linear weight (see `LinearKind::fold`).
        original.with_weight(weight.to_dtype(dtype)?.detach())
    }
}

impl AdaptedLinear {
    /// A mixed batch: the base layer on every row, then each adapter on its own rows.
    fn mixed_forward(
        &self,
        rows: &RowAdapters,
        base: &dyn LinearLike,
        x: &Tensor,
    ) -> Result<Tensor> {
        let y = base.forward(x)?;
        let training = self.state.training();
        rows.apply(x, y, |name, xs, ys| {
            let Some(adapter) = self.adapter_named(name) else {
                return Ok(None);
            };
            if let Some(replacement) = adapter.replacement() {
                return Ok(Some(replacement.forward(xs)?));
            }
            let ys = match adapter.adapt_input(xs)? {
                Some(changed) => base.forward(&changed)?,
                None => ys,
            };
            Ok(Some(adapter.adapt_output(base, xs, ys, training)?))
        })
    }
}

impl LinearLike for AdaptedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some((rows, base)) = self.mixed() {
            return Ok(crate::grad::maybe_detach(
                self.mixed_forward(&rows, base, x)?,
            ));
        }
        let (base, running) = self.plan();
        let mut input = x.clone();
        let mut input_changed = false;
        for adapter in &running {
            if let Some(changed) = adapter.adapt_input(&input)? {
                input = changed;
                input_changed = true;
            }
        }
        if let ([only], false) = (running.as_slice(), input_changed) {
            if let Some(y) = only.fused_forward(base, x, self.state.training())? {
                return Ok(crate::grad::maybe_detach(y));
            }
        }
        let mut y = base.forward(&input)?;
        let training = self.state.training();
        for adapter in &running {
            y = adapter.adapt_output(base, x, y, training)?;
        }
        Ok(crate::grad::maybe_detach(y))
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
    fn with_bias(&self, bias: Tensor) -> Result<Arc<dyn LinearLike>> {
        Ok(self.with_original(self.original.with_bias(bias)?))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl EmbeddingLike for AdaptedEmbedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        if let Some((rows, base)) = self.mixed() {
            let y = base.forward(ids)?;
            let training = self.state.training();
            let y = rows.apply(ids, y, |name, ids, ys| {
                let Some(adapter) = self.adapter_named(name) else {
                    return Ok(None);
                };
                Ok(Some(match adapter.replacement() {
                    Some(replacement) => replacement.forward(ids)?,
                    None => adapter.adapt_output(base, ids, ys, training)?,
                }))
            })?;
            return Ok(crate::grad::maybe_detach(y));
        }
        let (base, running) = self.plan();
        let mut y = base.forward(ids)?;
        let training = self.state.training();
        for adapter in running {
            y = adapter.adapt_output(base, ids, y, training)?;
        }
        Ok(crate::grad::maybe_detach(y))
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
