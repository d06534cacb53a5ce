//! Layer replication (peft's `layer_replication`, its `replicate_layers`): a model's stack of
//! layers rebuilt from ranges of the original, `[[0, 4], [2, 5]]` turning layers `0..5` into
//! `0, 1, 2, 3, 2, 3, 4`. Copies share the original layer's frozen weights (each copy gets its
//! own adapters), the layers are renumbered, and the parameter count counts a shared weight
//! once, as peft's `clone_module(share_weights=True)` does.

use std::collections::HashMap;

use crate::error::{PeftError, Result};
use crate::module_tree::{EmbeddingId, LinearId, ModuleTree, ParamId};

/// How the ids of a [`ModuleTree`] moved when its layers were replicated
/// ([`ModuleTree::replicate_layers`]): the model rebuilds its layer list from it.
#[derive(Debug, Clone)]
pub struct LayerRemap {
    /// The source layer of each new layer.
    pub sources: Vec<usize>,
    pub(crate) linears: IdMap,
    pub(crate) embeddings: IdMap,
    pub(crate) params: IdMap,
}

/// Old index -> new index for entries outside the layers, and per new layer for its copy.
#[derive(Debug, Clone, Default)]
pub(crate) struct IdMap {
    pub(crate) outer: HashMap<usize, usize>,
    pub(crate) layers: Vec<HashMap<usize, usize>>,
}

impl IdMap {
    fn get(&self, layer: Option<usize>, old: usize, what: &str) -> Result<usize> {
        let found = match layer {
            None => self.outer.get(&old),
            Some(j) => self.layers.get(j).and_then(|m| m.get(&old)),
        };
        found.copied().ok_or_else(|| {
            PeftError::InvalidState(format!(
                "layer replication: {what} {old} is not {}",
                match layer {
                    None => "outside the replicated layers".to_string(),
                    Some(j) => format!("in the source of new layer {j}"),
                }
            ))
        })
    }
}

impl LayerRemap {
    /// The new id of a linear layer outside the layers.
    pub fn linear(&self, id: LinearId) -> Result<LinearId> {
        Ok(LinearId(self.linears.get(None, id.0, "linear")?))
    }
    /// The new id of an embedding outside the layers.
    pub fn embedding(&self, id: EmbeddingId) -> Result<EmbeddingId> {
        Ok(EmbeddingId(self.embeddings.get(None, id.0, "embedding")?))
    }
    /// The new id of a parameter outside the layers.
    pub fn param(&self, id: ParamId) -> Result<ParamId> {
        Ok(ParamId(self.params.get(None, id.0, "parameter")?))
    }
    /// The id, in new layer `layer`, of its source layer's linear layer `id`.
    pub fn layer_linear(&self, layer: usize, id: LinearId) -> Result<LinearId> {
        Ok(LinearId(self.linears.get(Some(layer), id.0, "linear")?))
    }
    /// The id, in new layer `layer`, of its source layer's parameter `id`.
    pub fn layer_param(&self, layer: usize, id: ParamId) -> Result<ParamId> {
        Ok(ParamId(self.params.get(Some(layer), id.0, "parameter")?))
    }
    /// A norm outside the layers.
    pub fn norm(&self, ids: crate::module_tree::NormIds) -> Result<crate::module_tree::NormIds> {
        Ok(crate::module_tree::NormIds {
            weight: self.param(ids.weight)?,
            bias: ids.bias.map(|b| self.param(b)).transpose()?,
        })
    }
    /// A norm of new layer `layer`'s source layer, in that layer.
    pub fn layer_norm(
        &self,
        layer: usize,
        ids: crate::module_tree::NormIds,
    ) -> Result<crate::module_tree::NormIds> {
        Ok(crate::module_tree::NormIds {
            weight: self.layer_param(layer, ids.weight)?,
            bias: self.layer_opt_param(layer, ids.bias)?,
        })
    }
    /// The id, in new layer `layer`, of an optional parameter.
    pub fn layer_opt_param(&self, layer: usize, id: Option<ParamId>) -> Result<Option<ParamId>> {
        id.map(|id| self.layer_param(layer, id)).transpose()
    }
}

/// The new layer order of `map` over `count` layers, checked.
pub fn layer_sources(map: &[(usize, usize)], count: usize) -> Result<Vec<usize>> {
    if map.is_empty() {
        return Err(PeftError::InvalidState("layer_replication is empty".into()));
    }
    let mut out = Vec::new();
    for &(start, end) in map {
        if start >= end || end > count {
            return Err(PeftError::InvalidState(format!(
                "layer_replication range [{start}, {end}] is not a non-empty range of the model's \
                 {count} layers"
            )));
        }
        out.extend(start..end);
    }
    Ok(out)
}

/// Splits `path` under `prefix` into (layer index, rest after the index: "" or ".x.y").
fn layer_of<'a>(prefix: &str, path: &'a str) -> Option<(usize, &'a str)> {
    let rest = path.strip_prefix(prefix)?.strip_prefix('.')?;
    let (index, tail) = match rest.find('.') {
        Some(dot) => (&rest[..dot], &rest[dot..]),
        None => (rest, ""),
    };
    Some((index.parse().ok()?, tail))
}

/// Rebuilds `items` (entries in declaration order, each with a path) with the layer block
/// replaced by copies of the source layers, renamed: entries before the first layer entry,
/// then each new layer's entries, then the rest. Returns the new list and the id map.
pub(crate) fn rebuild<T: Clone>(
    items: &[T],
    prefix: &str,
    sources: &[usize],
    path: impl Fn(&T) -> &str,
    rename: impl Fn(&mut T, String),
) -> (Vec<T>, IdMap) {
    let first = items
        .iter()
        .position(|t| layer_of(prefix, path(t)).is_some())
        .unwrap_or(items.len());
    let mut out = Vec::with_capacity(items.len());
    let mut map = IdMap {
        outer: HashMap::new(),
        layers: vec![HashMap::new(); sources.len()],
    };
    for (i, t) in items.iter().enumerate().take(first) {
        map.outer.insert(i, out.len());
        out.push(t.clone());
    }
    for (j, &src) in sources.iter().enumerate() {
        for (i, t) in items.iter().enumerate() {
            if let Some((layer, tail)) = layer_of(prefix, path(t)) {
                if layer == src {
                    let mut copy = t.clone();
                    rename(&mut copy, format!("{prefix}.{j}{tail}"));
                    map.layers[j].insert(i, out.len());
                    out.push(copy);
                }
            }
        }
    }
    for (i, t) in items.iter().enumerate().skip(first) {
        if layer_of(prefix, path(t)).is_none() {
            map.outer.insert(i, out.len());
            out.push(t.clone());
        }
    }
    (out, map)
}

impl ModuleTree {
    /// Replicates the layers under `prefix` (`model.layers`, of which there are `count`) as
    /// `map` says (see the module docs). The model must then rebuild its own layer list and
    /// every id it holds from the returned [`LayerRemap`].
    pub fn replicate_layers(
        &mut self,
        prefix: &str,
        count: usize,
        map: &[(usize, usize)],
    ) -> Result<LayerRemap> {
        let sources = layer_sources(map, count)?;
        let (linears, embeddings, params) = self.rebuild_layers(prefix, &sources);
        Ok(LayerRemap {
            sources,
            linears,
            embeddings,
            params,
        })
    }
}
