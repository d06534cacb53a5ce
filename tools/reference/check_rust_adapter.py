#!/usr/bin/env python3
"""Loads an adapter saved by peft-rs into Python peft and compares the logits.

Usage: python tools/reference/check_rust_adapter.py MODEL_DIR ADAPTER_DIR
ADAPTER_DIR must hold check.safetensors as written by peft-rs, e.g.
`cargo run --release -p peft --example finetune_lora -- MODEL_DIR ADAPTER_DIR`.

The model kind comes from MODEL_DIR/config.json (see model_kind):
  causal LM        (the default)  input_ids, logits [B, T(+virtual tokens), V]
  seq2seq          (T5, mT5, ...) input_ids, attention_mask (optional), decoder_input_ids,
                                  logits [B, T_dec, V]
  sequence classification (BERT *ForSequenceClassification, or an adapter with task_type
                          SEQ_CLS over a bare encoder: the head has logits.shape[-1] classes)
                                  input_ids, attention_mask (optional), logits [B, num_labels]
Exits non-zero if the largest difference exceeds 1e-4 or if the adapter changes no logit by
more than 1e-3 (an adapter with no effect proves nothing).
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification
from peft import PeftModel


def model_kind(model_dir, adapter_dir):
    """"seq2seq", "seq_cls" or "causal", from the adapter's task_type SEQ_CLS (a classifier
    trained over a bare encoder, whose head the adapter holds), else config.json's
    architectures, else its model_type / is_encoder_decoder."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        task = json.load(f).get("task_type")
    archs = cfg.get("architectures") or []
    if task == "SEQ_CLS" or any(a.endswith("ForSequenceClassification") for a in archs):
        return "seq_cls"
    if any(a.endswith("ForConditionalGeneration") for a in archs) or cfg.get("is_encoder_decoder") \
            or cfg.get("model_type") in ("t5", "mt5", "umt5", "bart", "mbart"):
        return "seq2seq"
    return "causal"


def check_causal(model_dir, adapter_dir, data):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"]).logits.float()
    diff = (logits - data["logits"]).abs().max().item()
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=data["input_ids"]).logits.float()
    # Prompt tuning and p-tuning logits include the virtual positions: compare the real ones.
    effect = (base_logits - data["logits"][:, -base_logits.shape[1]:]).abs().max().item()
    return diff, effect


def check_encoder(model_dir, adapter_dir, data, auto_cls, keys, **load_args):
    """Seq2seq and sequence classification: the logits have the same shape with and without the
    adapter (prompt learning adds virtual tokens to the encoder input only). The base logits come
    from the bare model before peft wraps it (disable_adapter() fails for prompt learning on models
    without prepare_inputs_for_generation, e.g. BERT heads)."""
    inputs = {k: data[k] for k in keys if k in data}
    base = auto_cls.from_pretrained(model_dir, dtype=torch.float32, **load_args).eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits.float()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    diff = (logits - data["logits"]).abs().max().item()
    effect = (base_logits - data["logits"]).abs().max().item()
    return diff, effect


def main():
    model_dir, adapter_dir = sys.argv[1], sys.argv[2]
    data = load_file(f"{adapter_dir}/check.safetensors")
    kind = model_kind(model_dir, adapter_dir)
    if kind == "seq2seq":
        diff, effect = check_encoder(model_dir, adapter_dir, data, AutoModelForSeq2SeqLM,
                                     ["input_ids", "attention_mask", "decoder_input_ids"])
    elif kind == "seq_cls":
        diff, effect = check_encoder(model_dir, adapter_dir, data, AutoModelForSequenceClassification,
                                     ["input_ids", "attention_mask"], num_labels=data["logits"].shape[-1])
    else:
        diff, effect = check_causal(model_dir, adapter_dir, data)
    tag = "" if kind == "causal" else f"[{kind}] "
    print(f"{tag}python peft vs peft-rs: max |logit difference| = {diff:.3e} (adapter effect {effect:.3e})")
    sys.exit(0 if diff <= 1e-4 and effect > 1e-3 else 1)


if __name__ == "__main__":
    main()
