//! `adapter_config.json`: the fields every method shares ([`CommonConfig`]), the trait each
//! method's own config implements ([`MethodConfig`]), and [`AdapterConfig`], which joins them.
//!
//! Parsing: `peft_type` picks the registered method; core takes the shared fields, the method
//! takes its own, and whatever is left is unknown: kept, written back, and warned about (a
//! newer peft may have added it), never an error. Writing follows peft: indent 2, sorted keys,
//! `inference_mode: true`.

use std::any::Any;
use std::fmt::{self, Debug};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{PeftError, Result};
use crate::json::{self, describe, ConfigFields};
use crate::method::{LayerMethod, PromptMethod};
use crate::registry;

/// The file name peft uses for adapter configs.
pub const CONFIG_NAME: &str = "adapter_config.json";

/// peft's `TaskType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskType {
    /// `CAUSAL_LM`
    CausalLm,
    /// `SEQ_2_SEQ_LM`
    Seq2SeqLm,
    /// `SEQ_CLS`
    SeqCls,
    /// `TOKEN_CLS`
    TokenCls,
    /// `QUESTION_ANS`
    QuestionAns,
    /// `FEATURE_EXTRACTION`
    FeatureExtraction,
}

impl TaskType {
    /// All task types, in peft's order.
    pub const ALL: [TaskType; 6] = [
        TaskType::Seq2SeqLm,
        TaskType::CausalLm,
        TaskType::SeqCls,
        TaskType::TokenCls,
        TaskType::QuestionAns,
        TaskType::FeatureExtraction,
    ];

    /// The string peft writes.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::Seq2SeqLm => "SEQ_2_SEQ_LM",
            TaskType::SeqCls => "SEQ_CLS",
            TaskType::TokenCls => "TOKEN_CLS",
            TaskType::QuestionAns => "QUESTION_ANS",
            TaskType::FeatureExtraction => "FEATURE_EXTRACTION",
        }
    }

    /// Parses peft's string form.
    pub fn parse(s: &str) -> Option<Self> {
        TaskType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for TaskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fields of peft's `PeftConfig` base class, shared by every method.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CommonConfig {
    /// `task_type` (null allowed).
    #[serde(skip)]
    pub task_type: Option<TaskType>,
    /// `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
    /// `revision`.
    pub revision: Option<String>,
    /// `inference_mode`: an adapter loaded for inference is frozen.
    pub inference_mode: bool,
    /// `auto_mapping` (kept as written).
    pub auto_mapping: Option<Value>,
    /// `peft_version` of the library that wrote the file.
    pub peft_version: Option<String>,
}

impl CommonConfig {
    fn take(fields: &mut ConfigFields) -> Result<Self> {
        let task_type = match fields.take_raw("task_type") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(TaskType::parse(&s).ok_or_else(|| {
                PeftError::config_value(
                    fields.source_name(),
                    "task_type",
                    "one of CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION or null",
                    format!("\"{s}\""),
                )
            })?),
            Some(v) => return Err(fields.type_error("task_type", "a task type string or null", &v)),
        };
        Ok(CommonConfig {
            task_type,
            ..fields.take_derived()?
        })
    }

    fn write(&self, out: &mut Map<String, Value>) {
        out.insert(
            "task_type".into(),
            self.task_type
                .map_or(Value::Null, |t| Value::from(t.as_str())),
        );
        json::write_derived(self, out);
    }
}

/// Copying and downcasting a boxed method config: implemented for every `Clone` config, so a
/// method never writes it.
pub trait ConfigObject {
    /// A boxed copy.
    fn clone_box(&self) -> Box<dyn MethodConfig>;
    /// For downcasting to the concrete config type.
    fn as_any(&self) -> &dyn Any;
}

impl<T: MethodConfig + Clone> ConfigObject for T {
    fn clone_box(&self) -> Box<dyn MethodConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Inside `impl MethodConfig for X`, where `X` implements [`LayerMethod`]: writes
/// `as_layer_method` and `as_layer_method_mut`.
#[macro_export]
macro_rules! layer_method_casts {
    () => {
        fn as_layer_method(&self) -> Option<&dyn $crate::LayerMethod> {
            Some(self)
        }
        fn as_layer_method_mut(&mut self) -> Option<&mut dyn $crate::LayerMethod> {
            Some(self)
        }
    };
}

/// Inside `impl MethodConfig for X`, where `X` implements [`PromptMethod`]: writes
/// `as_prompt_method` and `as_prompt_method_mut`.
#[macro_export]
macro_rules! prompt_method_casts {
    () => {
        fn as_prompt_method(&self) -> Option<&dyn $crate::PromptMethod> {
            Some(self)
        }
        fn as_prompt_method_mut(&mut self) -> Option<&mut dyn $crate::PromptMethod> {
            Some(self)
        }
    };
}

/// A method's own configuration (the fields of e.g. peft's `LoraConfig` beyond the shared ones).
/// Copying and downcasting come with `Clone` ([`ConfigObject`]).
pub trait MethodConfig: ConfigObject + Debug + Send + Sync + 'static {
    /// The `peft_type` string (`LORA`).
    fn peft_type(&self) -> &'static str;
    /// The method's fields in their JSON form, for writing `adapter_config.json`.
    fn to_json_fields(&self) -> Map<String, Value>;
    /// If this method adapts layers (LoRA, IA3, ...), its layer interface.
    fn as_layer_method(&self) -> Option<&dyn LayerMethod> {
        None
    }
    /// Mutable access to the layer-method interface (core records resolved targets through it).
    fn as_layer_method_mut(&mut self) -> Option<&mut dyn LayerMethod> {
        None
    }
    /// If this is a prompt-learning method, its interface.
    fn as_prompt_method(&self) -> Option<&dyn PromptMethod> {
        None
    }
    /// Mutable access to the prompt-learning interface (core fills model-dependent fields).
    fn as_prompt_method_mut(&mut self) -> Option<&mut dyn PromptMethod> {
        None
    }
    /// `modules_to_save`: modules copied, trained and saved in full beside the adapter.
    fn modules_to_save(&self) -> Option<&[String]> {
        if let Some(layer) = self.as_layer_method() {
            return layer.target_spec().modules_to_save.as_deref();
        }
        self.as_prompt_method()
            .and_then(|p| p.prompt_config().modules_to_save.as_deref())
    }
    /// `trainable_token_indices`: embedding rows (or output-head features) trained beside the
    /// adapter ([`crate::tokens`]); `None` for none.
    fn trainable_token_indices(&self) -> Option<&crate::tokens::TokenIndices> {
        None
    }
    /// `layer_replication`: the base's layer stack rebuilt from these `[start, end)` ranges
    /// before the adapter is injected ([`crate::replicate`]); `None` for none.
    fn layer_replication(&self) -> Option<&[(usize, usize)]> {
        None
    }
    /// `ensure_weight_tying`: an adapter on an output head tied to the input embedding is tied
    /// to the embedding's adapter ([`crate::LayerMethod::wrap_tied_linear`]).
    fn ensure_weight_tying(&self) -> bool {
        false
    }
    /// Replaces `modules_to_save` (core adds classification heads as peft does).
    fn set_modules_to_save(&mut self, modules: Option<Vec<String>>) {
        if let Some(layer) = self.as_layer_method_mut() {
            layer.target_spec_mut().modules_to_save = modules;
        } else if let Some(p) = self.as_prompt_method_mut() {
            p.prompt_config_mut().modules_to_save = modules;
        }
    }
}

impl Clone for Box<dyn MethodConfig> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// A complete adapter configuration: the shared fields, the method's config, and any
/// fields nobody knew (kept so that writing the file back loses nothing).
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// Shared fields.
    pub common: CommonConfig,
    /// The method's config.
    pub method: Box<dyn MethodConfig>,
    /// Unknown fields, written back as they were.
    pub unknown: Map<String, Value>,
}

impl AdapterConfig {
    /// Wraps a method config with default shared fields.
    pub fn new(method: impl MethodConfig) -> Self {
        AdapterConfig {
            common: CommonConfig::default(),
            method: Box::new(method),
            unknown: Map::new(),
        }
    }

    /// Sets the task type.
    pub fn with_task_type(mut self, task_type: TaskType) -> Self {
        self.common.task_type = Some(task_type);
        self
    }

    /// The `peft_type`.
    pub fn peft_type(&self) -> &'static str {
        self.method.peft_type()
    }

    /// Downcasts the method config.
    pub fn method_as<T: 'static>(&self) -> Option<&T> {
        self.method.as_any().downcast_ref::<T>()
    }

    /// Parses JSON text; `source_name` names it in errors.
    pub fn from_json_str(text: &str, source_name: &str) -> Result<Self> {
        Self::from_map(json::parse_object(text, source_name)?, source_name)
    }

    /// Parses a JSON value.
    pub fn from_value(value: Value, source_name: &str) -> Result<Self> {
        match value {
            Value::Object(map) => Self::from_map(map, source_name),
            other => Err(PeftError::config_value(
                source_name,
                "<root>",
                "a JSON object",
                describe(&other),
            )),
        }
    }

    /// Reads `adapter_config.json` from a file, or from a folder holding one.
    pub fn from_path(path: &Path) -> Result<Self> {
        let is_file = path.is_file() || path.extension().is_some_and(|e| e == "json");
        let file = if is_file {
            path.to_path_buf()
        } else {
            path.join(CONFIG_NAME)
        };
        let text = std::fs::read_to_string(&file).map_err(|e| PeftError::io(&file, e))?;
        Self::from_json_str(&text, &file.display().to_string())
    }

    fn from_map(map: Map<String, Value>, source_name: &str) -> Result<Self> {
        let mut fields = ConfigFields::new(source_name, map);
        let peft_type = match fields.take_raw("peft_type") {
            Some(Value::String(s)) => s,
            None | Some(Value::Null) => {
                return Err(PeftError::MissingKey {
                    source_name: source_name.to_string(),
                    key: "peft_type".into(),
                    expected: format!("one of {}", registry::registered_types().join(", ")),
                })
            }
            Some(v) => return Err(fields.type_error("peft_type", "a string", &v)),
        };
        let registration = registry::lookup(&peft_type).map_err(|e| match e {
            PeftError::UnknownMethod {
                found, registered, ..
            } => PeftError::UnknownMethod {
                source_name: source_name.to_string(),
                found,
                registered,
            },
            other => other,
        })?;
        // The runtime-only field peft also drops on load.
        if fields.take_raw("runtime_config").is_some() {
            tracing::warn!(
                "{source_name}: `runtime_config` is a runtime-only setting and is ignored"
            );
        }
        let common = CommonConfig::take(&mut fields)?;
        let method = (registration.parse)(&mut fields, &common)?;
        let unknown = fields.into_remaining();
        if !unknown.is_empty() {
            let keys: Vec<&str> = unknown.keys().map(String::as_str).collect();
            tracing::warn!(
                "{source_name}: unknown keys {keys:?} for {peft_type} are kept but ignored; \
                 the file may come from a newer peft"
            );
        }
        Ok(AdapterConfig {
            common,
            method,
            unknown,
        })
    }

    /// The JSON object peft would write (not yet sorted).
    pub fn to_json(&self) -> Value {
        let mut out = self.unknown.clone();
        for (k, v) in self.method.to_json_fields() {
            out.insert(k, v);
        }
        self.common.write(&mut out);
        out.insert("peft_type".into(), Value::from(self.peft_type()));
        Value::Object(out)
    }

    /// The file text peft would write: indent 2, keys sorted.
    pub fn to_json_string(&self) -> String {
        json::to_python_json(&self.to_json())
    }

    /// The configuration as it is saved: `inference_mode` true, this library's version, and
    /// the base model's name where the config has none.
    pub fn for_saving(&self, base_model_name_or_path: Option<&str>) -> AdapterConfig {
        let mut out = self.clone();
        out.common.inference_mode = true;
        out.common.peft_version = Some(crate::PEFT_VERSION.to_string());
        if out.common.base_model_name_or_path.is_none() {
            out.common.base_model_name_or_path = base_model_name_or_path.map(str::to_string);
        }
        out
    }
}
