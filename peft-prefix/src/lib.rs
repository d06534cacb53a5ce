//! `peft-prefix`: prefix tuning for peft-rs. **Not implemented yet.**
//!
//! This crate reserves the place of prefix tuning in the workspace. It registers no method:
//! configs with `"peft_type": "PREFIX_TUNING"` are rejected by the registry with the list of
//! methods that are available. The model hook it will use already exists in `peft-core`:
//! a [`peft_core::KvCache`] pre-filled with per-layer key/value prefixes.
