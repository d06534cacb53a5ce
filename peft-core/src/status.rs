//! What is attached where: peft's `get_layer_status` and `get_model_status`, with the same
//! fields (and the same JSON form as their dataclasses' `asdict`), for spotting a model in an
//! inconsistent state (an adapter merged in some layers only, trainable in some only).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::adapted::{AdaptedEmbedding, AdaptedLinear};
use crate::error::{PeftError, Result};
use crate::peft_model::PeftModel;

/// A flag that may differ between the parts it summarises (peft's `bool | "irregular"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// All true.
    True,
    /// All false.
    False,
    /// A mix.
    Irregular,
}

impl Flag {
    /// `True` if all are true, `False` if none is (or there are none), else `Irregular`.
    fn of(values: impl IntoIterator<Item = Flag>) -> Flag {
        let values: Vec<Flag> = values.into_iter().collect();
        if values.iter().all(|v| *v == Flag::False) {
            Flag::False
        } else if values.iter().all(|v| *v == Flag::True) {
            Flag::True
        } else {
            Flag::Irregular
        }
    }

    fn from_bool(b: bool) -> Flag {
        if b {
            Flag::True
        } else {
            Flag::False
        }
    }

    /// `true`, `false` or `irregular`.
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::True => "true",
            Flag::False => "false",
            Flag::Irregular => "irregular",
        }
    }

    fn to_json(self) -> Value {
        match self {
            Flag::True => Value::Bool(true),
            Flag::False => Value::Bool(false),
            Flag::Irregular => Value::from(self.as_str()),
        }
    }
}

/// One adapted layer (peft's `TunerLayerStatus`).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStatus {
    /// The layer's name as peft's tuner model names it (`model.` + its path).
    pub name: String,
    /// peft's layer class (`lora.Linear`, `lora.Embedding`, IA3's `Linear`,
    /// `ModulesToSaveWrapper`).
    pub module_type: String,
    /// Whether adapters are enabled (not inside `disable_adapters`).
    pub enabled: bool,
    /// The model's active adapters.
    pub active_adapters: Vec<String>,
    /// The adapters merged into this layer's weights.
    pub merged_adapters: Vec<String>,
    /// Per adapter here: whether its parameters are trained.
    pub requires_grad: BTreeMap<String, Flag>,
    /// The adapters attached here, sorted.
    pub available_adapters: Vec<String>,
    /// Per adapter here: the device types of its parameters.
    pub devices: BTreeMap<String, Vec<String>>,
    /// The base layer's quantization (`"bnb 4bit"`, `"bnb 8bit"`), if any.
    pub quantization_backend: Option<String>,
}

/// The whole model (peft's `TunerModelStatus`); `None` in a list field means `"irregular"`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelStatus {
    /// The base model's class (`LlamaForCausalLM`).
    pub base_model_type: String,
    /// peft's tuner class (`LoraModel`).
    pub adapter_model_type: String,
    /// Adapter name to `peft_type`.
    pub peft_types: BTreeMap<String, String>,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// All parameters.
    pub total_params: usize,
    /// Adapted layers.
    pub num_adapter_layers: usize,
    /// Whether every layer is enabled.
    pub enabled: Flag,
    /// The active adapters, the same on every layer (`None`: irregular).
    pub active_adapters: Option<Vec<String>>,
    /// The merged adapters, merged on every layer that has them (`None`: irregular).
    pub merged_adapters: Option<Vec<String>>,
    /// Per adapter: trained on every layer, on none, or irregular.
    pub requires_grad: BTreeMap<String, Flag>,
    /// Every adapter attached somewhere, sorted.
    pub available_adapters: Vec<String>,
    /// Per adapter: the device types of its parameters.
    pub devices: BTreeMap<String, Vec<String>>,
    /// The layers' quantization (`Some(None)`: none; `None`: irregular).
    pub quantization_backend: Option<Option<String>>,
}

fn strings(v: &[String]) -> Value {
    Value::from(v.to_vec())
}

impl LayerStatus {
    /// The JSON form of peft's `dataclasses.asdict(status)`.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "module_type": self.module_type,
            "enabled": self.enabled,
            "active_adapters": strings(&self.active_adapters),
            "merged_adapters": strings(&self.merged_adapters),
            "requires_grad": self.requires_grad.iter().map(|(k, v)| (k.clone(), v.to_json())).collect::<serde_json::Map<_, _>>(),
            "available_adapters": strings(&self.available_adapters),
            "devices": self.devices,
            "quantization_backend": self.quantization_backend,
        })
    }
}

impl ModelStatus {
    /// The JSON form of peft's `dataclasses.asdict(status)`.
    pub fn to_json(&self) -> Value {
        let irregular = |v: &Option<Vec<String>>| match v {
            Some(v) => strings(v),
            None => Value::from("irregular"),
        };
        json!({
            "base_model_type": self.base_model_type,
            "adapter_model_type": self.adapter_model_type,
            "peft_types": self.peft_types,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "num_adapter_layers": self.num_adapter_layers,
            "enabled": self.enabled.to_json(),
            "active_adapters": irregular(&self.active_adapters),
            "merged_adapters": irregular(&self.merged_adapters),
            "requires_grad": self.requires_grad.iter().map(|(k, v)| (k.clone(), v.to_json())).collect::<serde_json::Map<_, _>>(),
            "available_adapters": strings(&self.available_adapters),
            "devices": self.devices,
            "quantization_backend": match &self.quantization_backend {
                Some(b) => json!(b),
                None => Value::from("irregular"),
            },
        })
    }
}

/// What one adapted slot reports, before naming its class.
struct Slot {
    path: String,
    embedding: bool,
    adapters: Vec<String>,
    copies: Vec<String>,
    merged: Vec<String>,
    quantization: Option<&'static str>,
}

impl PeftModel {
    fn require_layer_adapters(&self, what: &str) -> Result<()> {
        if let Some((name, _)) = self.adapters.iter().find(|(_, a)| a.is_prompt_learning()) {
            return Err(PeftError::InvalidState(format!(
                "{what}: adapter `{name}` is prompt-learning, which has no adapter layers (peft refuses it too)"
            )));
        }
        Ok(())
    }

    fn device_type(&self) -> String {
        match self.base.device() {
            candle_core::Device::Cpu => "cpu",
            candle_core::Device::Cuda(_) => "cuda",
            candle_core::Device::Metal(_) => "mps",
        }
        .to_string()
    }

    /// Every adapted layer, in model order (peft's `get_layer_status`). Prompt-learning
    /// adapters have no layers: an error, as in peft.
    pub fn get_layer_status(&self) -> Result<Vec<LayerStatus>> {
        self.require_layer_adapters("get_layer_status")?;
        let tree = self.base.module_tree();
        let mut slots: BTreeMap<String, Slot> = BTreeMap::new();
        for (path, slot) in tree.linear_slots() {
            if let Some(a) = AdaptedLinear::from_slot(slot) {
                let adapters = a.adapter_names();
                let copies = adapters.iter().filter(|n| a.is_copy(n)).cloned().collect();
                let slot = Slot {
                    path: path.to_string(),
                    embedding: false,
                    adapters,
                    copies,
                    merged: a.merged_names().to_vec(),
                    quantization: a.original().quantization_backend(),
                };
                slots.insert(path.to_string(), slot);
            }
        }
        for (path, slot) in tree.embedding_slots() {
            if let Some(a) = AdaptedEmbedding::from_slot(slot) {
                let adapters = a.adapter_names();
                let copies = adapters.iter().filter(|n| a.is_copy(n)).cloned().collect();
                let slot = Slot {
                    path: path.to_string(),
                    embedding: true,
                    adapters,
                    copies,
                    merged: a.merged_names().to_vec(),
                    quantization: None,
                };
                slots.insert(path.to_string(), slot);
            }
        }
        let active = self.state.active();
        let enabled = !self.state.disabled();
        let device = self.device_type();
        let mut out = Vec::new();
        let order: Vec<String> = self.base.modules().into_iter().map(|m| m.path).collect();
        let mut ordered: Vec<Slot> = Vec::new();
        for path in &order {
            if let Some(s) = slots.remove(path) {
                ordered.push(s);
            }
        }
        ordered.extend(slots.into_values());
        for slot in ordered {
            let method_adapter = slot
                .adapters
                .iter()
                .find(|n| !slot.copies.contains(n))
                .and_then(|n| self.adapters.get(n));
            let module_type = match method_adapter.and_then(|a| a.config.method.as_layer_method()) {
                Some(m) => m.layer_class_name(slot.embedding),
                None => "ModulesToSaveWrapper".to_string(),
            };
            let mut available = slot.adapters.clone();
            available.sort();
            let requires_grad = available
                .iter()
                .map(|n| {
                    let trained =
                        self.adapters.get(n).is_some_and(|a| a.trainable) && active.contains(n);
                    (n.clone(), Flag::from_bool(trained))
                })
                .collect();
            let devices = available
                .iter()
                .map(|n| (n.clone(), vec![device.clone()]))
                .collect();
            // peft: adapter layers take the model's active list as it is; a modules_to_save
            // wrapper keeps only the active adapters it has.
            let active_here = if method_adapter.is_some() {
                active.clone()
            } else {
                active
                    .iter()
                    .filter(|n| slot.adapters.contains(n))
                    .cloned()
                    .collect()
            };
            out.push(LayerStatus {
                name: format!("model.{}", slot.path),
                module_type,
                enabled,
                active_adapters: active_here,
                merged_adapters: slot.merged,
                requires_grad,
                available_adapters: available,
                devices,
                quantization_backend: slot.quantization.map(str::to_string),
            });
        }
        if out.is_empty() {
            return Err(PeftError::InvalidState(
                "no adapter layers found in the model (peft's get_layer_status refuses it too)"
                    .into(),
            ));
        }
        Ok(out)
    }

    /// A summary of [`PeftModel::get_layer_status`] (peft's `get_model_status`).
    pub fn get_model_status(&self) -> Result<ModelStatus> {
        let layers = self.get_layer_status()?;
        let info = self.base.info();
        let (trainable_params, total_params) = self.parameter_counts();
        let peft_types = self
            .adapters
            .iter()
            .map(|(n, a)| (n.clone(), a.config.peft_type().to_string()))
            .collect();
        let adapter_model_type = self
            .adapters
            .values()
            .next()
            .and_then(|a| a.config.method.as_layer_method())
            .map_or_else(|| "None".to_string(), |m| m.tuner_class_name());
        let enabled = Flag::of(layers.iter().map(|l| Flag::from_bool(l.enabled)));
        let available: BTreeSet<String> = layers
            .iter()
            .flat_map(|l| l.available_adapters.iter().cloned())
            .collect();
        let actives: BTreeSet<&Vec<String>> = layers.iter().map(|l| &l.active_adapters).collect();
        let active_adapters = match actives.len() {
            0 => Some(Vec::new()),
            1 => actives.into_iter().next().cloned(),
            _ => None,
        };
        let merged_all: BTreeSet<String> = layers
            .iter()
            .flat_map(|l| l.merged_adapters.iter().cloned())
            .collect();
        let irregular_merge = layers.iter().any(|l| {
            l.available_adapters
                .iter()
                .any(|a| !l.merged_adapters.contains(a) && merged_all.contains(a))
        });
        let merged_adapters = if irregular_merge {
            None
        } else {
            Some(merged_all.into_iter().collect())
        };
        let mut grads: BTreeMap<String, Vec<Flag>> = BTreeMap::new();
        let mut devices: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for l in &layers {
            for (k, v) in &l.requires_grad {
                grads.entry(k.clone()).or_default().push(*v);
            }
            for (k, v) in &l.devices {
                devices
                    .entry(k.clone())
                    .or_default()
                    .extend(v.iter().cloned());
            }
        }
        let backends: BTreeSet<&Option<String>> =
            layers.iter().map(|l| &l.quantization_backend).collect();
        let quantization_backend = if backends.len() == 1 {
            backends.into_iter().next().cloned()
        } else {
            None
        };
        Ok(ModelStatus {
            base_model_type: info.architecture.clone(),
            adapter_model_type,
            peft_types,
            trainable_params,
            total_params,
            num_adapter_layers: layers.len(),
            enabled,
            active_adapters,
            merged_adapters,
            requires_grad: grads.into_iter().map(|(k, v)| (k, Flag::of(v))).collect(),
            available_adapters: available.into_iter().collect(),
            devices: devices
                .into_iter()
                .map(|(k, v)| (k, v.into_iter().collect()))
                .collect(),
            quantization_backend,
        })
    }
}
