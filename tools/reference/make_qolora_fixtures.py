#!/usr/bin/env python3
"""OLoRA on a bitsandbytes NF4 base: peft dequantizes the weight, takes its QR factors as the
adapter and re-quantizes the residual W - scaling B A into the 4-bit layer. The committed tiny
LLaMA (make_quant_fixtures.py's tiny_llama) in NF4 with double quantization.
Produced with torch 2.15, transformers 5.24, peft 0.21.2, bitsandbytes 0.50.2 (CPU backend).

Run from the repository root:  python tools/reference/make_qolora_fixtures.py

Writes peft-quant/tests/fixtures/qolora.safetensors:
  nf4.fresh            logits of the fresh OLoRA model (r=4, alpha 10, every linear) on the
                       left-padded batch of qlora.safetensors
  nf4.A.<module>, nf4.B.<module>   the fresh factors (QR of the dequantized weight)
  nf4.residual.<module>            the re-quantized residual, dequantized
"""
import os

import torch
import bitsandbytes.functional as bnbF
import bitsandbytes.nn.modules as bnb_modules
bnb_modules.has_avx512bf16 = lambda: False  # see make_qdora_fixtures.py
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

OUT = os.path.join("peft-quant", "tests", "fixtures")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype=torch.float32)


def main():
    old = load_file(os.path.join(OUT, "qlora.safetensors"))
    ids, mask = old["input_ids"], old["attention_mask"]
    base = AutoModelForCausalLM.from_pretrained(os.path.join(OUT, "tiny_llama"),
                                                quantization_config=BitsAndBytesConfig(**NF4),
                                                device_map="cpu", dtype=torch.float32).eval()
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=10, init_lora_weights="olora",
                                         target_modules=TARGETS)).eval()
    tensors = {}
    with torch.no_grad():
        tensors["nf4.fresh"] = pm(input_ids=ids, attention_mask=mask).logits.float()
    for name, module in pm.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            path = name.replace("base_model.model.", "", 1)
            tensors[f"nf4.A.{path}"] = module.lora_A["default"].weight.detach().float().clone()
            tensors[f"nf4.B.{path}"] = module.lora_B["default"].weight.detach().float().clone()
            w = module.base_layer.weight
            tensors[f"nf4.residual.{path}"] = bnbF.dequantize_4bit(w.data, w.quant_state).float().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "qolora.safetensors"))
    print(f"wrote {len(tensors)} tensors to qolora.safetensors")


if __name__ == "__main__":
    main()
