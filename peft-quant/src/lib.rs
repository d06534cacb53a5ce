//! `peft-quant`: quantized frozen base layers for peft-rs. **Not implemented yet.**
//!
//! This crate will provide int8 and NF4 base layers implementing
//! [`peft_core::LinearLike`], so every method runs on a quantized base without knowing it.
//! It provides nothing yet.
