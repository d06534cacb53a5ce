//! `peft-ptuning`: p-tuning for peft-rs. **Not implemented yet.**
//!
//! This crate reserves the place of p-tuning (virtual tokens from an MLP or LSTM prompt
//! encoder) in the workspace. It registers no method: configs with `"peft_type": "P_TUNING"`
//! are rejected by the registry with the list of methods that are available.
