//! Target-module matching, exactly as Python peft does it (`check_target_module_exists`,
//! `_maybe_include_all_linear_layers`, `get_pattern_key` in peft 0.21):
//!
//! - `target_modules` as a string is a regex that must match the whole module name;
//!   as a list, an entry matches a module named exactly so or ending in `"." + entry`;
//!   `"all-linear"` (any case) is every linear layer except the model's output head.
//! - `exclude_modules` follows the same rules and wins over `target_modules`;
//!   modules listed in `modules_to_save` are excluded too.
//! - `layers_to_transform` (with an optional `layers_pattern`) keeps only modules whose first
//!   numbered path segment is one of the given layer indices; it applies to list targets only.
//! - `rank_pattern`/`alpha_pattern` keys apply to a module when `(.*\.)?(key)$` matches.

use std::collections::BTreeSet;

use fancy_regex::Regex;
use serde_json::Value;

use crate::error::{PeftError, Result};
use crate::json::{describe, ConfigFields};
use crate::model::{ModuleEntry, ModuleKind};

/// How `target_modules` (or `exclude_modules`) selects modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// A regular expression that must match the whole module name (Python `re.fullmatch`).
    Regex(String),
    /// Names that match a module exactly or as a dotted suffix.
    List(Vec<String>),
    /// `"all-linear"`: every linear layer except the output head.
    AllLinear,
}

impl TargetModules {
    /// Parses the JSON form: a string (regex or `all-linear`), a list of strings, or null.
    pub fn from_json(
        fields: &mut ConfigFields,
        key: &str,
        allow_all_linear: bool,
    ) -> Result<Option<Self>> {
        match fields.take_raw(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => {
                if allow_all_linear && s.eq_ignore_ascii_case("all-linear") {
                    Ok(Some(TargetModules::AllLinear))
                } else {
                    compile_full_match(&s).map_err(|e| {
                        PeftError::config_value(
                            fields.source_name(),
                            key,
                            "a valid regular expression",
                            e,
                        )
                    })?;
                    Ok(Some(TargetModules::Regex(s)))
                }
            }
            Some(Value::Array(items)) => {
                let mut names = Vec::with_capacity(items.len());
                for item in &items {
                    match item {
                        Value::String(s) => names.push(s.clone()),
                        other => {
                            return Err(fields.type_error(key, "a list of module names", other))
                        }
                    }
                }
                Ok(Some(TargetModules::List(names)))
            }
            Some(other) => Err(PeftError::config_value(
                fields.source_name(),
                key,
                "a regex string, a list of module names, or null",
                describe(&other),
            )),
        }
    }

    /// The JSON form written back to `adapter_config.json`.
    pub fn to_json(&self) -> Value {
        match self {
            TargetModules::Regex(s) => Value::String(s.clone()),
            TargetModules::List(names) => {
                Value::Array(names.iter().map(|n| Value::String(n.clone())).collect())
            }
            TargetModules::AllLinear => Value::String("all-linear".to_string()),
        }
    }

    /// Human-readable form for error messages, in peft's style.
    pub fn describe(&self) -> String {
        match self {
            TargetModules::Regex(s) => format!("'{s}'"),
            TargetModules::List(names) => {
                let inner: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
                format!("{{{}}}", inner.join(", "))
            }
            TargetModules::AllLinear => "'all-linear'".to_string(),
        }
    }
}

/// `layers_to_transform`: one layer index or a list of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerIndices {
    /// A single index.
    One(usize),
    /// Several indices.
    Many(Vec<usize>),
}

impl LayerIndices {
    /// Parses an integer, a list of integers, or null.
    pub fn from_json(fields: &mut ConfigFields, key: &str) -> Result<Option<Self>> {
        match fields.take_raw(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|i| Some(LayerIndices::One(i as usize)))
                .ok_or_else(|| {
                    fields.type_error(key, "a non-negative layer index", &Value::Number(n))
                }),
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for item in &items {
                    match item.as_u64() {
                        Some(i) => out.push(i as usize),
                        None => {
                            return Err(fields.type_error(key, "a list of layer indices", item))
                        }
                    }
                }
                Ok(Some(LayerIndices::Many(out)))
            }
            Some(other) => Err(fields.type_error(key, "a layer index or a list of them", &other)),
        }
    }

    /// The JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            LayerIndices::One(i) => Value::from(*i),
            LayerIndices::Many(v) => Value::Array(v.iter().map(|i| Value::from(*i)).collect()),
        }
    }

    fn contains(&self, index: usize) -> bool {
        match self {
            LayerIndices::One(i) => *i == index,
            LayerIndices::Many(v) => v.contains(&index),
        }
    }

    fn is_active(&self) -> bool {
        match self {
            LayerIndices::One(_) => true,
            LayerIndices::Many(v) => !v.is_empty(),
        }
    }
}

/// Parses `layers_pattern`: a string, a list of strings, or null.
pub fn layers_pattern_from_json(
    fields: &mut ConfigFields,
    key: &str,
) -> Result<Option<Vec<String>>> {
    match fields.peek(key) {
        Some(Value::String(_)) => Ok(fields.take_opt_string(key)?.map(|s| vec![s])),
        _ => fields.take_opt_string_list(key),
    }
}

/// Everything a layer method's config says about which modules to adapt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetSpec {
    /// `target_modules`; `None` means the architecture's defaults for the method.
    pub target_modules: Option<TargetModules>,
    /// `exclude_modules`.
    pub exclude_modules: Option<TargetModules>,
    /// `layers_to_transform`.
    pub layers_to_transform: Option<LayerIndices>,
    /// `layers_pattern` (a single string is stored as a one-element list).
    pub layers_pattern: Option<Vec<String>>,
    /// `modules_to_save`: never adapted by the method itself.
    pub modules_to_save: Option<Vec<String>>,
}

impl TargetSpec {
    /// Reads `target_modules`, `exclude_modules` and `modules_to_save` and, for methods with
    /// peft's layer selection (`with_layers`), `layers_to_transform` and `layers_pattern`,
    /// checked as peft checks them (no layer selection with a regex; a pattern needs indices).
    pub fn take_fields(fields: &mut ConfigFields, with_layers: bool) -> Result<Self> {
        let target_modules = TargetModules::from_json(fields, "target_modules", true)?;
        let exclude_modules = TargetModules::from_json(fields, "exclude_modules", false)?;
        let (layers_to_transform, layers_pattern) = if with_layers {
            let indices = LayerIndices::from_json(fields, "layers_to_transform")?;
            let pattern = layers_pattern_from_json(fields, "layers_pattern")?;
            if matches!(target_modules, Some(TargetModules::Regex(_))) {
                for (key, set) in [
                    ("layers_to_transform", indices.is_some()),
                    ("layers_pattern", pattern.is_some()),
                ] {
                    if set {
                        return Err(PeftError::config_value(
                            fields.source_name(),
                            key,
                            "null when target_modules is a regex string",
                            "a value",
                        ));
                    }
                }
            }
            if pattern.as_ref().is_some_and(|p| !p.is_empty()) && indices.is_none() {
                return Err(PeftError::MissingKey {
                    source_name: fields.source_name().to_string(),
                    key: "layers_to_transform".into(),
                    expected: "layer indices, required when layers_pattern is set".into(),
                });
            }
            (indices, pattern)
        } else {
            (None, None)
        };
        Ok(TargetSpec {
            target_modules,
            exclude_modules,
            layers_to_transform,
            layers_pattern,
            modules_to_save: fields.take_opt_string_list("modules_to_save")?,
        })
    }

    /// Writes the fields [`TargetSpec::take_fields`] reads, in peft's JSON form.
    pub fn write_fields(&self, out: &mut serde_json::Map<String, Value>, with_layers: bool) {
        let modules =
            |t: &Option<TargetModules>| t.as_ref().map_or(Value::Null, TargetModules::to_json);
        out.insert("target_modules".into(), modules(&self.target_modules));
        out.insert("exclude_modules".into(), modules(&self.exclude_modules));
        if with_layers {
            out.insert(
                "layers_to_transform".into(),
                self.layers_to_transform
                    .as_ref()
                    .map_or(Value::Null, LayerIndices::to_json),
            );
            out.insert(
                "layers_pattern".into(),
                match &self.layers_pattern {
                    None => Value::Null,
                    Some(p) if p.len() == 1 => Value::from(p[0].as_str()),
                    Some(p) => Value::from(p.clone()),
                },
            );
        }
        out.insert(
            "modules_to_save".into(),
            self.modules_to_save
                .clone()
                .map_or(Value::Null, Value::from),
        );
    }
}

/// The outcome of matching one module name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchOutcome {
    /// The module is a target.
    Target,
    /// The module was excluded (`exclude_modules` or `modules_to_save`).
    Excluded,
    /// The module does not match.
    NoMatch,
}

/// Compiles `pattern` so that it must match a whole string, as `re.fullmatch` does.
pub fn compile_full_match(pattern: &str) -> std::result::Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| e.to_string())
}

fn compile(pattern: &str) -> Result<Regex> {
    Regex::new(pattern)
        .map_err(|e| PeftError::InvalidState(format!("invalid pattern `{pattern}`: {e}")))
}

fn is_match(re: &Regex, text: &str) -> bool {
    // fancy-regex only fails on pathological backtracking; treat that as "no match".
    re.is_match(text).unwrap_or(false)
}

/// A [`TargetSpec`] with its regular expressions compiled and `all-linear` resolved.
#[derive(Debug)]
pub struct TargetMatcher {
    targets: CompiledTargets,
    exclude: Option<CompiledTargets>,
    modules_to_save: Vec<Regex>,
    layers_to_transform: Option<LayerIndices>,
    layer_regexes: Vec<Regex>,
}

#[derive(Debug)]
enum CompiledTargets {
    Regex(Regex),
    List(BTreeSet<String>),
}

impl CompiledTargets {
    fn new(
        targets: &TargetModules,
        linear_names: &[String],
        output_heads: &[String],
    ) -> Result<Self> {
        Ok(match targets {
            TargetModules::Regex(p) => CompiledTargets::Regex(
                compile_full_match(p)
                    .map_err(|e| PeftError::InvalidState(format!("invalid regex `{p}`: {e}")))?,
            ),
            TargetModules::List(names) => CompiledTargets::List(names.iter().cloned().collect()),
            TargetModules::AllLinear => CompiledTargets::List(
                linear_names
                    .iter()
                    .filter(|n| !output_heads.contains(n))
                    .cloned()
                    .collect(),
            ),
        })
    }

    fn matches(&self, key: &str) -> bool {
        match self {
            CompiledTargets::Regex(re) => is_match(re, key),
            CompiledTargets::List(names) => {
                names.contains(key) || names.iter().any(|n| key.ends_with(&format!(".{n}")))
            }
        }
    }
}

impl TargetMatcher {
    /// Compiles `spec` with the resolved targets (`spec.target_modules` or the defaults).
    /// `linear_names` is every linear module of the model and `output_heads` the modules
    /// `all-linear` must leave out.
    pub fn new(
        spec: &TargetSpec,
        targets: &TargetModules,
        linear_names: &[String],
        output_heads: &[String],
    ) -> Result<Self> {
        let layer_regexes = match &spec.layers_pattern {
            Some(patterns) if !patterns.is_empty() => patterns
                .iter()
                .map(|p| compile(&format!(r"^(?:^|.*?\.){p}\.(?P<idx>\d+)\.")))
                .collect::<Result<Vec<_>>>()?,
            _ => vec![compile(r"^.*?\.[^.]*\.(?P<idx>\d+)\.")?],
        };
        Ok(TargetMatcher {
            targets: CompiledTargets::new(targets, linear_names, output_heads)?,
            exclude: spec
                .exclude_modules
                .as_ref()
                .map(|e| CompiledTargets::new(e, linear_names, output_heads))
                .transpose()?,
            modules_to_save: spec
                .modules_to_save
                .iter()
                .flatten()
                .map(|m| compile(&format!(r"^(?:^|.*\.){m}(?:$|\..*)")))
                .collect::<Result<Vec<_>>>()?,
            layers_to_transform: spec.layers_to_transform.clone(),
            layer_regexes,
        })
    }

    /// Classifies one module name as peft's `check_target_module_exists` does.
    pub fn check(&self, key: &str) -> MatchOutcome {
        if let Some(exclude) = &self.exclude {
            if exclude.matches(key) {
                return MatchOutcome::Excluded;
            }
        }
        if self.modules_to_save.iter().any(|re| is_match(re, key)) {
            return MatchOutcome::Excluded;
        }
        let found = match &self.targets {
            CompiledTargets::Regex(_) => self.targets.matches(key),
            // An exact full name is taken as is; only suffix matches are filtered by layer.
            CompiledTargets::List(names) if names.contains(key) => true,
            CompiledTargets::List(_) => {
                self.targets.matches(key)
                    && match &self.layers_to_transform {
                        Some(indices) if indices.is_active() => {
                            self.layer_index(key).is_some_and(|i| indices.contains(i))
                        }
                        _ => true,
                    }
            }
        };
        if found {
            MatchOutcome::Target
        } else {
            MatchOutcome::NoMatch
        }
    }

    fn layer_index(&self, key: &str) -> Option<usize> {
        self.layer_regexes.iter().find_map(|re| {
            re.captures(key)
                .ok()
                .flatten()
                .and_then(|c| c.name("idx"))
                .and_then(|m| m.as_str().parse().ok())
        })
    }
}

/// peft's `EMBEDDING_LAYER_NAMES`: targeting one of these makes peft save the base weights
/// of the input embedding and output head beside the adapter (`<path>.base_layer.weight`).
pub const EMBEDDING_LAYER_NAMES: [&str; 2] = ["embed_tokens", "lm_head"];

/// Whether `targets` names an embedding layer in peft's sense (see [`EMBEDDING_LAYER_NAMES`]).
pub fn targets_embedding_layers(targets: &TargetModules, modules: &[ModuleEntry]) -> bool {
    match targets {
        TargetModules::List(names) => EMBEDDING_LAYER_NAMES
            .iter()
            .any(|e| names.iter().any(|n| n == e)),
        TargetModules::Regex(pattern) => compile_full_match(pattern).is_ok_and(|re| {
            modules.iter().any(|m| {
                let last = m.path.rsplit('.').next().unwrap_or(&m.path);
                EMBEDDING_LAYER_NAMES.contains(&last) && is_match(&re, &m.path)
            })
        }),
        TargetModules::AllLinear => false,
    }
}

/// peft's `MIN_TARGET_MODULES_FOR_OPTIMIZATION`: target lists at least this long are condensed.
pub const MIN_TARGET_MODULES_FOR_CONDENSING: usize = 20;

/// Resolves `targets` as peft does before matching: `all-linear` becomes the list of linear
/// module paths minus the output heads, and (when `condense` is set) a list of 20 or more
/// entries is replaced by the shortest suffixes that still select exactly the same modules.
pub fn resolve_target_modules(
    targets: &TargetModules,
    modules: &[ModuleEntry],
    output_heads: &[String],
    condense: bool,
) -> TargetModules {
    let targets = match targets {
        TargetModules::AllLinear => TargetModules::List(
            modules
                .iter()
                .filter(|m| m.kind == ModuleKind::Linear && !output_heads.contains(&m.path))
                .map(|m| m.path.clone())
                .collect(),
        ),
        other => other.clone(),
    };
    match targets {
        TargetModules::List(names)
            if condense && names.len() >= MIN_TARGET_MODULES_FOR_CONDENSING =>
        {
            let selected = CompiledTargets::List(names.iter().cloned().collect());
            let others: Vec<&str> = modules
                .iter()
                .map(|m| m.path.as_str())
                .filter(|p| !selected.matches(p))
                .collect();
            let minimal = minimal_target_modules(&names, &others);
            if minimal.len() < names.len() {
                TargetModules::List(minimal)
            } else {
                TargetModules::List(names)
            }
        }
        other => other,
    }
}

/// peft's `_find_minimal_target_modules`: the fewest dotted suffixes that cover `targets`
/// without matching any of `others`. Sorted for determinism.
pub fn minimal_target_modules(targets: &[String], others: &[&str]) -> Vec<String> {
    fn suffixes(s: &str) -> Vec<String> {
        let parts: Vec<&str> = s.split('.').collect();
        (0..parts.len())
            .rev()
            .map(|i| parts[i..].join("."))
            .collect()
    }
    let other_suffixes: BTreeSet<String> = others.iter().flat_map(|o| suffixes(o)).collect();
    let mut items: Vec<(Vec<String>, &String)> = targets
        .iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|t| (suffixes(t), t))
        .collect();
    items.sort();
    let mut required: BTreeSet<String> = BTreeSet::new();
    for (sfx, item) in &items {
        for suffix in sfx {
            if required.contains(suffix) || other_suffixes.contains(suffix) {
                continue;
            }
            if !required.iter().any(|r| item.ends_with(&format!(".{r}"))) {
                required.insert(suffix.clone());
                break;
            }
        }
    }
    if required.is_empty() {
        targets
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    } else {
        required.into_iter().collect()
    }
}

/// Selects the modules to adapt, with peft's errors when nothing is selected.
/// Returns the selected paths in model order. A selected module that is not a linear or
/// embedding layer is an error, as in peft.
pub fn select_targets(
    spec: &TargetSpec,
    targets: &TargetModules,
    modules: &[ModuleEntry],
    output_heads: &[String],
) -> Result<Vec<String>> {
    let linear_names: Vec<String> = modules
        .iter()
        .filter(|m| m.kind == ModuleKind::Linear)
        .map(|m| m.path.clone())
        .collect();
    let matcher = TargetMatcher::new(spec, targets, &linear_names, output_heads)?;
    let mut selected = Vec::new();
    let mut excluded = 0usize;
    let mut unmatched = 0usize;
    for module in modules {
        match matcher.check(&module.path) {
            MatchOutcome::Target => selected.push(module.path.clone()),
            MatchOutcome::Excluded => excluded += 1,
            MatchOutcome::NoMatch => unmatched += 1,
        }
    }
    if selected.is_empty() {
        let examples = example_names(modules);
        let mut message = if excluded > 0 && unmatched == 0 {
            "All modules were excluded; check `target_modules`, `exclude_modules` and `modules_to_save`"
                .to_string()
        } else if excluded == 0 {
            format!(
                "Target modules {} not found in the base model",
                targets.describe()
            )
        } else {
            format!(
                "No modules were targeted for adaptation: the modules target modules {} match were \
                 all excluded by `exclude_modules`/`modules_to_save`, or matched nothing",
                targets.describe()
            )
        };
        if let Some(layers) = &spec.layers_to_transform {
            message.push_str(&format!("; layers_to_transform: {}", layers.to_json()));
        }
        if let Some(pattern) = &spec.layers_pattern {
            message.push_str(&format!("; layers_pattern: {pattern:?}"));
        }
        return Err(PeftError::NoTargetMatch { message, examples });
    }
    if spec.exclude_modules.is_some() && excluded == 0 {
        tracing::warn!(
            "exclude_modules={:?} excluded no module; check that it is set correctly",
            spec.exclude_modules.as_ref().map(TargetModules::describe)
        );
    }
    Ok(selected)
}

/// A short list of the model's leaf-like module names, for error messages.
fn example_names(modules: &[ModuleEntry]) -> String {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for m in modules
        .iter()
        .filter(|m| matches!(m.kind, ModuleKind::Linear | ModuleKind::Embedding))
    {
        // Show distinct last segments first ("q_proj", "lm_head"), then full paths.
        let last = m.path.rsplit('.').next().unwrap_or(&m.path).to_string();
        if seen.insert(last) {
            out.push(m.path.clone());
        }
        if out.len() >= 12 {
            break;
        }
    }
    out.join(", ")
}

/// Finds the first key of a `rank_pattern`/`alpha_pattern` that applies to `module`
/// (peft's `get_pattern_key`: `re.match(rf"(.*\.)?({key})$", module)`).
pub fn pattern_value<'a, T>(patterns: &'a [(String, T)], module: &str) -> Option<&'a T> {
    patterns.iter().find_map(|(key, value)| {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).ok()?;
        is_match(&re, module).then_some(value)
    })
}

/// peft's older pattern lookup (FourierFT's `n_frequency_pattern`): the first key, in file
/// order, for which `re.match(rf".*\.{key}$", module)` holds; a module without a dot in its path
/// never matches.
pub fn pattern_value_dotted<'a, T>(patterns: &'a [(String, T)], module: &str) -> Option<&'a T> {
    patterns.iter().find_map(|(key, value)| {
        let re = Regex::new(&format!(r"\A(?:.*\.{key}$)")).ok()?;
        is_match(&re, module).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_patterns_need_a_dot_before_the_key() {
        let p = vec![("q_proj".to_string(), 1), ("lm_head".to_string(), 2)];
        assert_eq!(
            pattern_value_dotted(&p, "model.layers.0.self_attn.q_proj"),
            Some(&1)
        );
        assert_eq!(pattern_value_dotted(&p, "lm_head"), None);
        assert_eq!(pattern_value(&p, "lm_head"), Some(&2));
        assert_eq!(
            pattern_value_dotted(&p, "model.layers.0.self_attn.xq_proj"),
            None
        );
    }

    fn entries(names: &[&str]) -> Vec<ModuleEntry> {
        names
            .iter()
            .map(|n| ModuleEntry {
                path: n.to_string(),
                kind: ModuleKind::Linear,
            })
            .collect()
    }

    #[test]
    fn list_matches_exact_or_dotted_suffix() {
        let spec = TargetSpec::default();
        let t = TargetModules::List(vec!["q_proj".into(), "model.norm".into()]);
        let m = TargetMatcher::new(&spec, &t, &[], &[]).unwrap();
        assert_eq!(
            m.check("model.layers.0.self_attn.q_proj"),
            MatchOutcome::Target
        );
        assert_eq!(m.check("q_proj"), MatchOutcome::Target);
        assert_eq!(
            m.check("model.layers.0.self_attn.xq_proj"),
            MatchOutcome::NoMatch
        );
        assert_eq!(m.check("model.norm"), MatchOutcome::Target);
    }

    #[test]
    fn regex_is_full_match() {
        let spec = TargetSpec::default();
        let t = TargetModules::Regex(r".*\.(q|v)_proj".into());
        let m = TargetMatcher::new(&spec, &t, &[], &[]).unwrap();
        assert_eq!(
            m.check("model.layers.0.self_attn.q_proj"),
            MatchOutcome::Target
        );
        assert_eq!(
            m.check("model.layers.0.self_attn.q_proj.x"),
            MatchOutcome::NoMatch
        );
        let t = TargetModules::Regex(r"q_proj|v_proj".into());
        let m = TargetMatcher::new(&spec, &t, &[], &[]).unwrap();
        assert_eq!(
            m.check("model.layers.0.self_attn.q_proj"),
            MatchOutcome::NoMatch
        );
    }

    #[test]
    fn layers_to_transform_takes_first_numbered_segment() {
        let spec = TargetSpec {
            layers_to_transform: Some(LayerIndices::Many(vec![1])),
            ..TargetSpec::default()
        };
        let t = TargetModules::List(vec!["q_proj".into()]);
        let m = TargetMatcher::new(&spec, &t, &[], &[]).unwrap();
        assert_eq!(
            m.check("model.layers.1.self_attn.q_proj"),
            MatchOutcome::Target
        );
        assert_eq!(
            m.check("model.layers.0.self_attn.q_proj"),
            MatchOutcome::NoMatch
        );
        assert_eq!(
            m.check("model.layers.0.experts.1.q_proj"),
            MatchOutcome::NoMatch
        );
    }

    #[test]
    fn layers_pattern_selects_the_named_list() {
        let spec = TargetSpec {
            layers_to_transform: Some(LayerIndices::One(0)),
            layers_pattern: Some(vec!["block".into()]),
            ..TargetSpec::default()
        };
        let t = TargetModules::List(vec!["q".into()]);
        let m = TargetMatcher::new(&spec, &t, &[], &[]).unwrap();
        assert_eq!(
            m.check("encoder.block.0.layer.0.SelfAttention.q"),
            MatchOutcome::Target
        );
        assert_eq!(
            m.check("encoder.block.1.layer.0.SelfAttention.q"),
            MatchOutcome::NoMatch
        );
        assert_eq!(m.check("encoder.layers.0.q"), MatchOutcome::NoMatch);
    }

    #[test]
    fn exclusion_and_all_linear() {
        let names = entries(&["model.layers.0.q_proj", "model.layers.0.v_proj", "lm_head"]);
        let spec = TargetSpec {
            exclude_modules: Some(TargetModules::List(vec!["v_proj".into()])),
            ..TargetSpec::default()
        };
        let got = select_targets(
            &spec,
            &TargetModules::AllLinear,
            &names,
            &["lm_head".into()],
        )
        .unwrap();
        assert_eq!(got, vec!["model.layers.0.q_proj".to_string()]);
    }

    #[test]
    fn long_lists_condense_to_suffixes() {
        let mut modules = Vec::new();
        let mut targets = Vec::new();
        for i in 0..12 {
            for n in ["q_proj", "k_proj", "v_proj"] {
                let p = format!("model.layers.{i}.self_attn.{n}");
                modules.push(ModuleEntry {
                    path: p.clone(),
                    kind: ModuleKind::Linear,
                });
                if n != "k_proj" {
                    targets.push(p);
                }
            }
        }
        modules.push(ModuleEntry {
            path: "lm_head".into(),
            kind: ModuleKind::Linear,
        });
        let got = resolve_target_modules(&TargetModules::List(targets), &modules, &[], true);
        assert_eq!(
            got,
            TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
        );
        let all = resolve_target_modules(
            &TargetModules::AllLinear,
            &modules,
            &["lm_head".into()],
            true,
        );
        assert_eq!(
            all,
            TargetModules::List(vec!["k_proj".into(), "q_proj".into(), "v_proj".into()])
        );
    }

    #[test]
    fn pattern_value_takes_first_matching_key() {
        let pats = vec![
            ("layers.0.self_attn.q_proj".to_string(), 16),
            ("q_proj".to_string(), 4),
        ];
        assert_eq!(
            pattern_value(&pats, "model.layers.0.self_attn.q_proj"),
            Some(&16)
        );
        assert_eq!(
            pattern_value(&pats, "model.layers.1.self_attn.q_proj"),
            Some(&4)
        );
        assert_eq!(
            pattern_value(&pats, "model.layers.1.self_attn.k_proj"),
            None
        );
        // a key must end at a segment boundary
        assert_eq!(
            pattern_value(&pats, "model.layers.1.self_attn.xq_proj"),
            None
        );
    }
}
