//! Hot-swapping (peft's `hotswap_adapter`): new weights for a loaded adapter, written into its
//! existing parameters, so that the model, its layers and every `Var` handed out (to an
//! optimizer, to a server holding the model) stay as they are.
//!
//! As in peft: the adapter must not be merged; the new checkpoint must be of the same method
//! with compatible settings (the method says which: LoRA's `use_rslora`, `lora_dropout`,
//! `alpha_pattern`, `use_dora`); it may only name parameters the loaded adapter has (a module the
//! loaded adapter does not adapt is an error); parameters it lacks are set to zero (the module
//! then contributes nothing); a smaller rank is zero-padded to the loaded one; the per-module
//! scaling follows the new config. A larger rank than the loaded one is refused here (the
//! parameters keep their shapes): load the wider adapter first, or as a new adapter.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::adapted::{AdaptedEmbedding, AdaptedLinear};
use crate::checkpoint;
use crate::config::AdapterConfig;
use crate::error::{PeftError, Result};
use crate::inject::BASE_LAYER_SUFFIX;
use crate::peft_model::PeftModel;
use crate::vars::BASE_MODEL_PREFIX;

/// `new` zero-padded to `shape` (the leading dimension where it differs, else the second).
fn pad_to(new: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let dims = new.dims();
    let mut out = new.clone();
    for (axis, (&n, &o)) in dims.iter().zip(shape).enumerate() {
        if n < o {
            let mut fill = out.dims().to_vec();
            fill[axis] = o - n;
            let zeros = Tensor::zeros(fill, out.dtype(), out.device())?;
            out = Tensor::cat(&[&out, &zeros], axis)?;
        }
    }
    Ok(out)
}

impl PeftModel {
    /// Replaces the weights of the loaded adapter `name` with those saved in `dir`, in place
    /// (peft's `hotswap_adapter`; see the module docs). Nothing changes if any check fails.
    pub fn hotswap_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        let adapter = self.adapter(name)?;
        if self.merged.iter().any(|m| m == name) {
            return Err(PeftError::InvalidState(format!(
                "cannot hot-swap adapter `{name}` while it is merged into the base weights; call unmerge_adapter first"
            )));
        }
        let method = adapter.config.method.as_layer_method().ok_or_else(|| {
            PeftError::InvalidState(format!(
                "hot-swapping supports LoRA adapters only (as in peft), not {}",
                adapter.config.peft_type()
            ))
        })?;
        let new_config = AdapterConfig::from_path(dir)?;
        if adapter.params.has_aliases() {
            return Err(PeftError::InvalidState(format!(
                "cannot hot-swap adapter `{name}`: it has adapters tied across layers \
                 (ensure_weight_tying), which hot-swapping does not cover"
            )));
        }
        for (which, config) in [("loaded", &adapter.config), ("new", &new_config)] {
            if config.method.trainable_token_indices().is_some() {
                return Err(PeftError::InvalidState(format!(
                    "cannot hot-swap adapter `{name}`: the {which} adapter trains token rows \
                     (trainable_token_indices), which hot-swapping does not cover"
                )));
            }
        }
        if new_config.peft_type() != adapter.config.peft_type() {
            return Err(PeftError::InvalidState(format!(
                "Incompatible PEFT types found: {} and {}",
                adapter.config.peft_type(),
                new_config.peft_type()
            )));
        }
        // peft checks the configs before the weights.
        method.hotswap_config(&*new_config.method, &[])?;
        let weights = checkpoint::adapter_weights_file(dir)?;
        let tensors = checkpoint::read_adapter_weights(&weights, self.base.device())?;
        let mut new: BTreeMap<String, (String, Tensor)> = BTreeMap::new();
        for (key, t) in tensors {
            let bare = key
                .strip_prefix(BASE_MODEL_PREFIX)
                .unwrap_or(&key)
                .to_string();
            if bare.ends_with(BASE_LAYER_SUFFIX) {
                // The base weights peft saves beside adapters of embeddings: not the adapter's.
                continue;
            }
            new.insert(bare, (key, t));
        }
        let vars: BTreeMap<String, candle_core::Var> = adapter.params.vars().into_iter().collect();
        let unexpected: Vec<&str> = new
            .iter()
            .filter(|(bare, _)| !vars.contains_key(*bare))
            .map(|(_, (key, _))| key.as_str())
            .collect();
        if !unexpected.is_empty() {
            return Err(PeftError::InvalidState(format!(
                "{}: hot-swapping adapter `{name}` did not succeed, unexpected keys found (modules or parameters the loaded adapter lacks): {}",
                weights.display(),
                unexpected.join(", ")
            )));
        }
        // Phase 1: every new value, checked.
        let mut values = Vec::new();
        // Modules whose new parameters were padded or zero-filled to the loaded shapes.
        let mut resized: std::collections::BTreeSet<String> = Default::default();
        for (path, var) in &vars {
            let old = var.dims();
            let value = match new.get(path) {
                None if adapter.saved_modules.iter().any(|m| path.starts_with(&format!("{m}."))) => {
                    continue; // peft leaves a modules_to_save copy the file lacks alone
                }
                None => {
                    resized.extend(adapter.module_of(path).map(str::to_string));
                    var.zeros_like()?
                }
                Some((_, t)) if t.dims() == old => t.to_dtype(DType::F32)?,
                Some((_, t))
                    if t.rank() == old.len() && t.dims().iter().zip(old).all(|(n, o)| n <= o) =>
                {
                    resized.extend(adapter.module_of(path).map(str::to_string));
                    pad_to(&t.to_dtype(DType::F32)?, old)?
                }
                Some((key, t)) => {
                    return Err(PeftError::ShapeMismatch {
                        path: weights.clone(),
                        key: format!(
                            "{key} (hot-swap: a rank above the loaded adapter's cannot be written in place; load that adapter first or as a new one)"
                        ),
                        expected: old.to_vec(),
                        found: t.dims().to_vec(),
                    })
                }
            };
            values.push((var.clone(), value));
        }
        let resized: Vec<String> = resized.into_iter().collect();
        let swapped_method = method.hotswap_config(&*new_config.method, &resized)?;
        // Phase 2: write.
        for (var, value) in values {
            var.set(&value.to_device(var.device())?)?;
        }
        let tree = self.base.module_tree();
        for (path, slot) in tree.linear_slots() {
            if let Some(a) = AdaptedLinear::from_slot(slot).and_then(|a| a.adapter(name)) {
                a.hotswap_settings(path, &*swapped_method)?;
            }
        }
        for (path, slot) in tree.embedding_slots() {
            if let Some(a) = AdaptedEmbedding::from_slot(slot).and_then(|a| a.adapter(name)) {
                a.hotswap_settings(path, &*swapped_method)?;
            }
        }
        let adapter = self
            .adapters
            .get_mut(name)
            .ok_or_else(|| PeftError::InvalidState(format!("adapter `{name}` vanished")))?;
        let targets = adapter
            .config
            .method
            .as_layer_method()
            .and_then(|m| m.target_spec().target_modules.clone());
        adapter.config.method = swapped_method;
        // The modules adapted stay the loaded adapter's.
        if let Some(m) = adapter.config.method.as_layer_method_mut() {
            m.target_spec_mut().target_modules = targets;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn padding_fills_the_missing_rank_with_zeros() {
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let p = pad_to(&a, &[3, 2]).unwrap();
        assert_eq!(
            p.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0], vec![3.0, 4.0], vec![0.0, 0.0]]
        );
        let p = pad_to(&a, &[2, 4]).unwrap();
        assert_eq!(p.to_vec2::<f32>().unwrap()[1], vec![3.0, 4.0, 0.0, 0.0]);
    }
}
