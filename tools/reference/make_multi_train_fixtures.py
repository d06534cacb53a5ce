#!/usr/bin/env python3
"""Training two LoRA adapters at once (peft's `set_adapter([...])` on the tuner: both active and
trainable) on the committed tiny LLaMA: the loss and the gradient of every adapter parameter.
Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_multi_train_fixtures.py

Writes peft/tests/fixtures/multi_train.safetensors: input_ids, attention_mask, labels (-100 on
the padded positions), loss (transformers' causal-LM loss with qv and qvo both active), and
grad/<adapter>/<key> for every parameter of both adapters (keys as saved, without the adapter
name). qv (q, v; r=4, alpha 16) and qvo (q, v, o; r=4, alpha 6) share q_proj and v_proj.
"""
import os

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join("peft", "tests", "fixtures")
IDS = torch.tensor([[1, 17, 45, 99, 3, 64, 127, 8], [1, 5, 9, 2, 120, 33, 7, 61]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])


def main():
    base = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "models", "llama_tiny"))
    pm = PeftModel.from_pretrained(base, os.path.join(ROOT, "adapters", "llama_tiny__lora_qv"), adapter_name="qv",
                                   is_trainable=True)
    pm.load_adapter(os.path.join(ROOT, "adapters", "llama_tiny__lora_qvo"), adapter_name="qvo", is_trainable=True)
    pm.base_model.set_adapter(["qv", "qvo"])
    pm.eval()  # no dropout: the comparison is exact
    labels = IDS.masked_fill(MASK == 0, -100)
    out = pm(input_ids=IDS, attention_mask=MASK, labels=labels)
    out.loss.backward()
    tensors = {"input_ids": IDS, "attention_mask": MASK, "labels": labels, "loss": out.loss.detach().reshape(1)}
    n = 0
    for name, p in pm.named_parameters():
        if not p.requires_grad:
            continue
        for adapter in ["qv", "qvo"]:
            if f".{adapter}." in name:
                key = name.replace(f".{adapter}.", ".")
                tensors[f"grad/{adapter}/{key}"] = p.grad.detach().clone()
                n += 1
    assert n == 8 + 12, n
    save_file(tensors, os.path.join(ROOT, "multi_train.safetensors"))
    print("loss", out.loss.item(), "grads", n)


if __name__ == "__main__":
    main()
