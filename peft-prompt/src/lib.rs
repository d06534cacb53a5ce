//! `peft-prompt`: prompt tuning for peft-rs. **Not implemented yet.**
//!
//! This crate reserves the place of prompt tuning in the workspace. It registers no method:
//! configs with `"peft_type": "PROMPT_TUNING"` are rejected by the registry with the list of
//! methods that are available. The model hook it will use already exists in `peft-core`:
//! [`peft_core::ModelInputs::inputs_embeds`] with virtual tokens prepended.
