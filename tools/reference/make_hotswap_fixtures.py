#!/usr/bin/env python3
"""Hot-swapping (peft's `hotswap_adapter`) on the committed tiny LLaMA.
Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_hotswap_fixtures.py

Writes under peft/tests/fixtures/:
  adapters/llama_tiny__lora_qv_r2/   LoRA r=2, alpha 5 on q_proj, v_proj (non-zero B): a smaller
                                     rank than lora_qv (r=4, alpha 16), padded when swapped in
  adapters/llama_tiny__lora_q_only/  LoRA r=4, alpha 7 on q_proj only: v_proj is zero-filled
  adapters/llama_tiny__lora_qv_r6/   LoRA r=6 on q_proj, v_proj: a larger rank (peft swaps the
                                     tensors; refused here, where parameters keep their shapes)
  hotswap.safetensors                input_ids / attention_mask, and per swapped-in adapter
                                     <name>.logits: lora_qv loaded as "default", then
                                     hotswap_adapter(model, <folder>, "default"), then forward
"""
import os
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.hotswap import hotswap_adapter
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join("peft", "tests", "fixtures")
IDS = torch.tensor([[1, 17, 45, 99, 3, 64, 127, 8], [1, 5, 9, 2, 120, 33, 7, 61]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])
NEW = [
    ("qv_r2", LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0.1), 81),
    ("q_only", LoraConfig(r=4, lora_alpha=7, target_modules=["q_proj"], init_lora_weights=False, lora_dropout=0.1), 82),
    ("qv_r6", LoraConfig(r=6, lora_alpha=9, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0.1), 83),
]


def base():
    return AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "models", "llama_tiny")).eval()


def main():
    tensors = {"input_ids": IDS, "attention_mask": MASK}
    for name, cfg, seed in NEW:
        torch.manual_seed(seed)
        out = os.path.join(ROOT, "adapters", f"llama_tiny__lora_{name}")
        shutil.rmtree(out, ignore_errors=True)
        get_peft_model(base(), cfg).save_pretrained(out)
    for name in ["qv_r2", "q_only"]:
        pm = PeftModel.from_pretrained(base(), os.path.join(ROOT, "adapters", "llama_tiny__lora_qv"))
        pm.eval()
        hotswap_adapter(pm, os.path.join(ROOT, "adapters", f"llama_tiny__lora_{name}"), adapter_name="default",
                        torch_device="cpu")
        with torch.no_grad():
            tensors[f"{name}.logits"] = pm(input_ids=IDS, attention_mask=MASK).logits.float()
        # The swapped model runs as the new adapter loaded on its own.
        alone = PeftModel.from_pretrained(base(), os.path.join(ROOT, "adapters", f"llama_tiny__lora_{name}")).eval()
        with torch.no_grad():
            want = alone(input_ids=IDS, attention_mask=MASK).logits
        assert (want - tensors[f"{name}.logits"]).abs().max() < 1e-5, name
        print(name, tensors[f"{name}.logits"].abs().max().item())
    save_file(tensors, os.path.join(ROOT, "hotswap.safetensors"))


if __name__ == "__main__":
    main()
