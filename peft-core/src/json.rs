//! Typed access to the fields of a JSON object (an `adapter_config.json`), with errors that name
//! the source, the key and the expected type, and a writer that produces Python's
//! `json.dumps(obj, indent=2, sort_keys=True)` layout.
//!
//! A config declares its plain fields with serde (`#[derive(Serialize, Deserialize)]`,
//! `#[serde(default)]`, `#[serde(skip)]` on what it parses by hand) and reads them with
//! [`ConfigFields::take_derived`]: only the fields the struct declares are taken, absent and
//! null ones keep the struct's defaults, the rest stay for other readers (and end up as the
//! config's unknown fields), and a wrong value is a [`PeftError::ConfigValue`] naming the key.
//! [`write_derived`] writes them back.

use serde::de::{self, DeserializeOwned, Visitor};
use serde::Serialize;
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

    /// Takes a positive integer, or `default` when absent (0 is an error naming the key).
    pub fn take_positive_usize(&mut self, key: &str, default: usize) -> Result<usize> {
        let n = self.take_usize(key, default)?;
        if n == 0 {
            return Err(PeftError::config_value(
                &self.source_name,
                key,
                "a positive integer",
                "0",
            ));
        }
        Ok(n)
    }

    /// Takes a probability in `[0, 1]`, or `default` when absent or null.
    pub fn take_probability(&mut self, key: &str, default: f64) -> Result<f64> {
        let p = self.take_f64(key, default)?;
        if !(0.0..=1.0).contains(&p) {
            return Err(PeftError::config_value(
                &self.source_name,
                key,
                "a probability in [0, 1]",
                p,
            ));
        }
        Ok(p)
    }

    /// Takes a torch seed (`manual_seed` takes any integer, a negative one modulo 2⁶⁴), or
    /// `default` when absent or null.
    pub fn take_seed(&mut self, key: &str, default: u64) -> Result<u64> {
        match self.take_raw(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().unwrap_or(default)),
            Some(Value::Number(n)) if n.as_i64().is_some() => {
                Ok(n.as_i64().map_or(default, |v| v as u64))
            }
            Some(v) => Err(self.type_error(key, "an integer", &v)),
        }
    }

    /// Takes an object mapping module keys to positive integers (`rank_pattern`,
    /// `n_frequency_pattern`, ...), in file order; a bad value is an error naming
    /// `key.<module key>` and `expected`.
    pub fn take_positive_usize_map(
        &mut self,
        key: &str,
        expected: &str,
    ) -> Result<Vec<(String, usize)>> {
        self.take_number_map(key)?
            .into_iter()
            .map(|(k, n)| match n.as_u64().filter(|v| *v > 0) {
                Some(v) => Ok((k, v as usize)),
                None => Err(PeftError::config_value(
                    &self.source_name,
                    &format!("{key}.{k}"),
                    expected,
                    n,
                )),
            })
            .collect()
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

    /// Takes the fields a serde-derived struct declares and deserialises them. Absent and null
    /// fields keep the struct's defaults (it needs `#[serde(default)]`); a field of the wrong
    /// type or value is an error naming it, what was expected and what was found.
    pub fn take_derived<T: DeserializeOwned>(&mut self) -> Result<T> {
        let mut taken = Map::new();
        for &name in struct_fields::<T>() {
            if let Some(v) = self.take_raw(name) {
                if !v.is_null() {
                    taken.insert(name.to_string(), v);
                }
            }
        }
        let whole = match serde_json::from_value::<T>(Value::Object(taken.clone())) {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        // Name the field: the first that fails on its own.
        for (key, value) in &taken {
            let one = Map::from_iter([(key.clone(), value.clone())]);
            if let Err(e) = serde_json::from_value::<T>(Value::Object(one)) {
                return Err(PeftError::config_value(
                    &self.source_name,
                    key,
                    plain_expected(&e.to_string()),
                    describe(value),
                ));
            }
        }
        Err(PeftError::config_value(
            &self.source_name,
            "<fields>",
            "fields that agree with each other",
            whole.to_string(),
        ))
    }

    /// Returns the fields nobody took.
    pub fn into_remaining(self) -> Map<String, Value> {
        self.map
    }
}

/// Writes the fields of a serde-derived struct into `out` (the inverse of
/// [`ConfigFields::take_derived`]).
pub fn write_derived<T: Serialize>(value: &T, out: &mut Map<String, Value>) {
    match serde_json::to_value(value) {
        Ok(Value::Object(fields)) => out.extend(fields),
        Ok(other) => unreachable!("a derived config struct serialises to an object, not {other}"),
        Err(e) => unreachable!("a derived config struct serialises: {e}"),
    }
}

/// serde's "expected ..." in the project's wording ("usize" reads "a non-negative integer").
fn plain_expected(message: &str) -> String {
    let expected = message
        .rsplit_once("expected ")
        .map_or(message, |(_, e)| e)
        .trim_end_matches(|c: char| c == '.' || c.is_whitespace());
    match expected {
        "usize" | "u8" | "u16" | "u32" | "u64" => "a non-negative integer".into(),
        "isize" | "i8" | "i16" | "i32" | "i64" => "an integer".into(),
        "f32" | "f64" | "a JSON number" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "a list".into(),
        "a map" => "an object".into(),
        // An enum's names: "`A` or `B`", "one of `A`, `B`, `C`" read "A, B or C".
        other => {
            let names = other.trim_start_matches("one of ").replace('`', "");
            match names.rsplit_once(", ") {
                Some((head, last)) if other.starts_with("one of ") => format!("{head} or {last}"),
                _ => names,
            }
        }
    }
}

/// The field names a serde-derived struct declares (the `fields` its `Deserialize` passes to
/// `deserialize_struct`; skipped fields are not among them).
pub fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    match T::deserialize(FieldProbe) {
        Err(Probed(Some(fields))) => fields,
        _ => &[],
    }
}

/// A deserializer that only records the field list it is asked for.
struct FieldProbe;

#[derive(Debug)]
struct Probed(Option<&'static [&'static str]>);

impl std::fmt::Display for Probed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field probe")
    }
}

impl std::error::Error for Probed {}

impl de::Error for Probed {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        Probed(None)
    }
}

impl<'de> de::Deserializer<'de> for FieldProbe {
    type Error = Probed;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> std::result::Result<V::Value, Probed> {
        Err(Probed(None))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> std::result::Result<V::Value, Probed> {
        Err(Probed(Some(fields)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
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

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "UPPERCASE")]
    enum Kind {
        Mlp,
        Lstm,
        Gru,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    struct Plain {
        r: usize,
        alpha: serde_json::Number,
        on: bool,
        name: Option<String>,
        kind: Kind,
        #[serde(skip)]
        custom: Vec<String>,
    }

    impl Default for Plain {
        fn default() -> Self {
            Plain {
                r: 8,
                alpha: 16.into(),
                on: true,
                name: None,
                kind: Kind::Mlp,
                custom: vec!["kept".into()],
            }
        }
    }

    fn fields(value: Value) -> ConfigFields {
        match value {
            Value::Object(map) => ConfigFields::new("cfg.json", map),
            _ => unreachable!("the tests pass objects"),
        }
    }

    fn error(value: Value) -> String {
        fields(value)
            .take_derived::<Plain>()
            .map(|p| format!("parsed {p:?}"))
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn derived_fields_are_the_declared_ones() {
        assert_eq!(
            struct_fields::<Plain>(),
            ["r", "alpha", "on", "name", "kind"]
        );
    }

    #[test]
    fn take_derived_takes_its_fields_and_defaults_the_rest() {
        let mut f = fields(json!({"r": 4, "on": null, "kind": "LSTM", "other": 1, "custom": [1]}));
        let p: Plain = f.take_derived().unwrap();
        assert_eq!(
            p,
            Plain {
                r: 4,
                kind: Kind::Lstm,
                ..Plain::default()
            }
        );
        // Undeclared and skipped fields stay for their own readers.
        assert_eq!(
            Value::Object(f.into_remaining()),
            json!({"other": 1, "custom": [1]})
        );
        let mut out = Map::new();
        write_derived(&p, &mut out);
        assert_eq!(
            Value::Object(out),
            json!({"r": 4, "alpha": 16, "on": true, "name": null, "kind": "LSTM"})
        );
    }

    #[test]
    fn take_derived_errors_name_the_key_in_plain_words() {
        let e = error(json!({"on": false, "r": "eight"}));
        assert!(
            e.contains("cfg.json")
                && e.contains("`r`")
                && e.contains("a non-negative integer")
                && e.contains("\"eight\""),
            "{e}"
        );
        let e = error(json!({"r": -1}));
        assert!(
            e.contains("`r`") && e.contains("a non-negative integer"),
            "{e}"
        );
        let e = error(json!({"alpha": "high"}));
        assert!(
            e.contains("`alpha`") && e.contains("expected a number"),
            "{e}"
        );
        let e = error(json!({"on": "yes"}));
        assert!(e.contains("`on`") && e.contains("true or false"), "{e}");
        let e = error(json!({"kind": "RNN"}));
        assert!(
            e.contains("`kind`") && e.contains("MLP, LSTM or GRU"),
            "{e}"
        );
        let e = error(json!({"name": ["a"]}));
        assert!(e.contains("`name`") && e.contains("a string"), "{e}");
    }
}
