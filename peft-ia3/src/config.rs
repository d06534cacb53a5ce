//! `IA3Config`: peft 0.21's IA3 fields.

use peft_core::json::{describe, write_derived, ConfigFields};
use peft_core::targets::compile_full_match;
use peft_core::{CommonConfig, MethodConfig, PeftError, Result, TargetModules, TargetSpec};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `feedforward_modules`: which targets rescale their input rather than their output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedforwardModules {
    /// A regex that must match the whole module name.
    Regex(String),
    /// Names a module path must end with (peft checks `key.endswith(name)`, no dot required).
    List(Vec<String>),
}

/// The IA3 configuration (peft's `IA3Config`). The plain fields are read and written by serde;
/// the skipped ones have their own readers (a list or a regex string).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ia3Config {
    /// Module selection (`target_modules`, `exclude_modules`, `modules_to_save`).
    #[serde(skip)]
    pub targets: TargetSpec,
    /// `feedforward_modules` (null: the architecture's defaults).
    #[serde(skip)]
    pub feedforward_modules: Option<FeedforwardModules>,
    /// `fan_in_fan_out` (the layout is read from the layer itself, as peft corrects it).
    pub fan_in_fan_out: bool,
    /// `init_ia3_weights`: start the vectors at one (otherwise normal, for tests).
    pub init_ia3_weights: bool,
}

impl Default for Ia3Config {
    fn default() -> Self {
        Ia3Config {
            targets: TargetSpec::default(),
            feedforward_modules: None,
            fan_in_fan_out: false,
            init_ia3_weights: true,
        }
    }
}

impl Ia3Config {
    /// Whether the module at `path` is a feed-forward target.
    pub fn is_feedforward(&self, path: &str) -> bool {
        match &self.feedforward_modules {
            Some(FeedforwardModules::Regex(p)) => {
                compile_full_match(p).is_ok_and(|re| re.is_match(path).unwrap_or(false))
            }
            Some(FeedforwardModules::List(names)) => {
                names.iter().any(|n| path.ends_with(n.as_str()))
            }
            None => false,
        }
    }
}

/// Parses an IA3 config (the registry's parse function).
pub fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    let targets = TargetSpec::take_fields(fields, false)?;
    let feedforward_modules = match fields.take_raw("feedforward_modules") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) => {
            compile_full_match(&p).map_err(|e| {
                PeftError::config_value(
                    fields.source_name(),
                    "feedforward_modules",
                    "a valid regular expression",
                    e,
                )
            })?;
            Some(FeedforwardModules::Regex(p))
        }
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for item in &items {
                match item.as_str() {
                    Some(s) => out.push(s.to_string()),
                    None => {
                        return Err(fields.type_error(
                            "feedforward_modules",
                            "a list of module names",
                            item,
                        ))
                    }
                }
            }
            Some(FeedforwardModules::List(out))
        }
        Some(v) => {
            return Err(PeftError::config_value(
                fields.source_name(),
                "feedforward_modules",
                "a regex string, a list of module names, or null",
                describe(&v),
            ))
        }
    };
    // peft requires a literal subset; also accept a name that targets list as full paths (what
    // saving an `all-linear` config produces) so such files load.
    if let (Some(FeedforwardModules::List(ff)), Some(TargetModules::List(t))) =
        (&feedforward_modules, &targets.target_modules)
    {
        let covered = |f: &String| t.iter().any(|x| x == f || x.ends_with(&format!(".{f}")));
        if let Some(extra) = ff.iter().find(|f| !covered(f)) {
            return Err(PeftError::config_value(
                fields.source_name(),
                "feedforward_modules",
                format!("a subset of target_modules {t:?}"),
                format!("{ff:?} (\"{extra}\" is not a target)"),
            ));
        }
    }
    Ok(Box::new(Ia3Config {
        targets,
        feedforward_modules,
        ..fields.take_derived()?
    }))
}

impl MethodConfig for Ia3Config {
    fn peft_type(&self) -> &'static str {
        crate::PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        self.targets.write_fields(&mut out, false);
        out.insert(
            "feedforward_modules".into(),
            match &self.feedforward_modules {
                None => Value::Null,
                Some(FeedforwardModules::Regex(p)) => Value::from(p.as_str()),
                Some(FeedforwardModules::List(names)) => Value::from(names.clone()),
            },
        );
        write_derived(self, &mut out);
        out
    }

    peft_core::layer_method_casts!();
}
