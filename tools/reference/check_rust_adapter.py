#!/usr/bin/env python3
"""Loads an adapter saved by peft-rs into Python peft and compares the logits.

Usage: python tools/reference/check_rust_adapter.py MODEL_DIR ADAPTER_DIR
ADAPTER_DIR must hold check.safetensors (input_ids, logits) as written by
`cargo run --release -p peft --example finetune_lora -- MODEL_DIR ADAPTER_DIR`.
Exits non-zero if the largest difference exceeds 1e-4.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel


def main():
    model_dir, adapter_dir = sys.argv[1], sys.argv[2]
    data = load_file(f"{adapter_dir}/check.safetensors")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"]).logits.float()
    diff = (logits - data["logits"]).abs().max().item()
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=data["input_ids"]).logits.float()
    # Prompt tuning and p-tuning logits include the virtual positions: compare the real ones.
    effect = (base_logits - data["logits"][:, -base_logits.shape[1]:]).abs().max().item()
    print(f"python peft vs peft-rs: max |logit difference| = {diff:.3e} (adapter effect {effect:.3e})")
    sys.exit(0 if diff <= 1e-4 and effect > 1e-3 else 1)


if __name__ == "__main__":
    main()
