//! Typed access to the fields of a JSON object (an `adapter_config.json`), with errors that name
//! the source, the key and the expected type, and a writer that produces Python's
//! `json.dumps(obj, indent=2, sort_keys=True)` layout.

use serde_json::{Map, Value};

use crate::error::{PeftError, Result};

/// A JSON object whose fields are taken one by one; what is left at the end is "unknown".
#[derive(Debug, Clone)]
pub struct ConfigFields {
    source_name: String,
    map: Map<String, Value>,
}

/// Describes a JSON value in an error message: its type and a short rendering.
pub fn describe(value: &Value) -> String {
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    let mut text = value.to_string();
    if text.len() > 80 {
        let cut = (0..=80)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push_str("...");
    }
    format!("{kind} ({text})")
}

impl ConfigFields {
    /// Wraps a JSON object; `source_name` names it in errors (usually the file path).
    pub fn new(source_name: impl Into<String>, map: Map<String, Value>) -> Self {
        ConfigFields {
            source_name: source_name.into(),
            map,
        }
    }

    /// Where the object came from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Looks at a field without taking it.
    pub fn peek(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    /// Takes a field as raw JSON; `None` when absent.
    pub fn take_raw(&mut self, key: &str) -> Option<Value> {
        self.map.shift_remove(key)
    }

    /// Builds the error for a field of the wrong type.
    pub fn type_error(&self, key: &str, expected: &str, found: &Value) -> PeftError {
        PeftError::config_value(&self.source_name, key, expected, describe(found))
    }

    /// Takes a non-negative integer, or `default` when absent.
    pub fn take_usize(&mut self, key: &str, default: usize) -> Result<usize> {
        match self.take_raw(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| self.type_error(key, "a non-negative integer", &v)),
        }
    }

    /// Takes a number (integer or float, kept as written), or `default` when absent or null.
    pub fn take_number(
        &mut self,
        key: &str,
        default: serde_json::Number,
    ) -> Result<serde_json::Number> {
        match self.take_raw(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Number(n)) => Ok(n),
            Some(v) => Err(self.type_error(key, "a number", &v)),
        }
    }

    /// Takes a float, or `default` when absent or null.
    pub fn take_f64(&mut self, key: &str, default: f64) -> Result<f64> {
        match self.take_raw(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.type_error(key, "a number", &v)),
        }
    }

    /// Takes a boolean, or `default` when absent or null.
    pub fn take_bool(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.take_raw(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(b),
            Some(v) => Err(self.type_error(key, "true or false", &v)),
        }
    }

    /// Takes an optional string (absent or null gives `None`).
    pub fn take_opt_string(&mut self, key: &str) -> Result<Option<String>> {
        match self.take_raw(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.type_error(key, "a string or null", &v)),
        }
    }

    /// Takes an optional list of strings (absent or null gives `None`).
    pub fn take_opt_string_list(&mut self, key: &str) -> Result<Option<Vec<String>>> {
        match self.take_raw(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for item in &items {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        other => {
                            return Err(self.type_error(key, "a list of strings", other));
                        }
                    }
                }
                Ok(Some(out))
            }
            Some(v) => Err(self.type_error(key, "a list of strings or null", &v)),
        }
    }

    /// Takes an object mapping names to numbers, keeping the file's key order (peft's
    /// pattern lookups take the first key that matches, in order).
    pub fn take_number_map(&mut self, key: &str) -> Result<Vec<(String, serde_json::Number)>> {
        match self.take_raw(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Object(obj)) => {
                let mut out = Vec::with_capacity(obj.len());
                for (k, v) in obj {
                    match v {
                        Value::Number(n) => out.push((k, n)),
                        other => {
                            return Err(PeftError::config_value(
                                &self.source_name,
                                &format!("{key}.{k}"),
                                "a number",
                                describe(&other),
                            ))
                        }
                    }
                }
                Ok(out)
            }
            Some(v) => Err(self.type_error(key, "an object of name -> number", &v)),
        }
    }

    /// Returns the fields nobody took.
    pub fn into_remaining(self) -> Map<String, Value> {
        self.map
    }
}

/// Returns `value` with every object's keys sorted, recursively (Python's `sort_keys=True`).
pub fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(obj) => {
            let mut keys: Vec<&String> = obj.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                out.insert(k.clone(), sorted(&obj[k]));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// Serialises like Python's `json.dumps(value, indent=2, sort_keys=True)`.
pub fn to_python_json(value: &Value) -> String {
    let value = sorted(value);
    let mut buf = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"  ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, formatter);
    serde::Serialize::serialize(&value, &mut ser).expect("serialising a JSON value cannot fail");
    String::from_utf8(buf).expect("serde_json writes UTF-8")
}

/// Parses text as a JSON object, naming `source_name` in errors.
pub fn parse_object(text: &str, source_name: &str) -> Result<Map<String, Value>> {
    let value: Value = serde_json::from_str(text).map_err(|e| PeftError::Json {
        source_name: source_name.to_string(),
        message: e.to_string(),
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(PeftError::config_value(
            source_name,
            "<root>",
            "a JSON object",
            describe(&other),
        )),
    }
}
