//! The method registry. Each method crate submits one [`MethodRegistration`] through
//! [`register_method!`](crate::register_method); core looks methods up by `peft_type` and never
//! names one. A crate that nothing references is not linked and its registration vanishes, so
//! binaries reference each enabled method crate (`use peft_lora as _;`).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::config::{CommonConfig, MethodConfig};
use crate::error::{PeftError, Result};
use crate::json::ConfigFields;

/// Parses a method's own fields out of an `adapter_config.json` object. It takes the keys it
/// knows from `fields`; keys left behind are reported as unknown.
pub type ParseFn = fn(&mut ConfigFields, &CommonConfig) -> Result<Box<dyn MethodConfig>>;

/// One registered method.
#[derive(Debug)]
pub struct MethodRegistration {
    /// The `peft_type` it handles (`LORA`).
    pub peft_type: &'static str,
    /// One line saying what the method does.
    pub description: &'static str,
    /// The crate that registered it.
    pub crate_name: &'static str,
    /// Builds the method's config from `adapter_config.json` fields.
    pub parse: ParseFn,
}

inventory::collect!(MethodRegistration);

/// Registers a method. Call once in the method crate, at module level:
///
/// ```ignore
/// peft_core::register_method!(peft_core::MethodRegistration {
///     peft_type: "LORA",
///     description: "Low-rank adaptation",
///     crate_name: env!("CARGO_PKG_NAME"),
///     parse: parse_lora_config,
/// });
/// ```
#[macro_export]
macro_rules! register_method {
    ($registration:expr) => {
        $crate::inventory::submit! { $registration }
    };
}

type Table = std::result::Result<
    BTreeMap<&'static str, &'static MethodRegistration>,
    (String, String, String),
>;

fn build_table(regs: impl IntoIterator<Item = &'static MethodRegistration>) -> Table {
    let mut map: BTreeMap<&'static str, &'static MethodRegistration> = BTreeMap::new();
    for reg in regs {
        if let Some(prev) = map.insert(reg.peft_type, reg) {
            return Err((
                reg.peft_type.to_string(),
                prev.crate_name.to_string(),
                reg.crate_name.to_string(),
            ));
        }
    }
    Ok(map)
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| build_table(inventory::iter::<MethodRegistration>))
}

fn checked() -> Result<&'static BTreeMap<&'static str, &'static MethodRegistration>> {
    table()
        .as_ref()
        .map_err(|(peft_type, first, second)| PeftError::DuplicateMethod {
            peft_type: peft_type.clone(),
            first: first.clone(),
            second: second.clone(),
        })
}

/// All registrations, sorted by `peft_type`.
pub fn registrations() -> Result<Vec<&'static MethodRegistration>> {
    Ok(checked()?.values().copied().collect())
}

/// The registered `peft_type`s, sorted (empty if the registry is inconsistent).
pub fn registered_types() -> Vec<&'static str> {
    checked()
        .map(|m| m.keys().copied().collect())
        .unwrap_or_default()
}

/// Finds the registration for `peft_type`; the error lists what is registered.
pub fn lookup(peft_type: &str) -> Result<&'static MethodRegistration> {
    let map = checked()?;
    map.get(peft_type)
        .copied()
        .ok_or_else(|| PeftError::UnknownMethod {
            source_name: "<registry>".into(),
            found: peft_type.to_string(),
            registered: if map.is_empty() {
                "none (enable a method crate, e.g. peft-lora)".to_string()
            } else {
                map.keys().copied().collect::<Vec<_>>().join(", ")
            },
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_none(_: &mut ConfigFields, _: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
        Err(PeftError::InvalidState("test".into()))
    }

    static A: MethodRegistration = MethodRegistration {
        peft_type: "X",
        description: "",
        crate_name: "crate-a",
        parse: parse_none,
    };
    static B: MethodRegistration = MethodRegistration {
        peft_type: "X",
        description: "",
        crate_name: "crate-b",
        parse: parse_none,
    };

    #[test]
    fn duplicate_registrations_are_reported() {
        let err = build_table([&A, &B]).unwrap_err();
        assert_eq!(
            err,
            (
                "X".to_string(),
                "crate-a".to_string(),
                "crate-b".to_string()
            )
        );
        assert!(build_table([&A]).is_ok());
    }
}
