#!/usr/bin/env python3
"""DoRA on bitsandbytes bases (QDoRA): the committed tiny LLaMA (make_quant_fixtures.py's
tiny_llama) loaded in NF4 with double quantization and in int8, a DoRA adapter on every linear.
Produced with torch 2.15, transformers 5.24, peft 0.21.2, bitsandbytes 0.50.2 (CPU backend).

Run from the repository root:
    pip install torch transformers peft bitsandbytes
    python tools/reference/make_qdora_fixtures.py
(peft-quant/tests/fixtures/tiny_llama is read, not regenerated; the script first checks that this
environment reproduces the committed QLoRA logits, so both fixture sets come from one reference.)

Writes under peft-quant/tests/fixtures/:
  qdora_adapter/        DoRA r=4, alpha 10, every linear, non-zero B (init_lora_weights=False),
                        magnitudes moved off their initial norms (times 1 + 0.2 randn), as peft
                        saves it (made on the NF4 base)
  qdora.safetensors     nf4.adapted: logits of the left-padded batch of qlora.safetensors in
                        training mode, nf4.loss, nf4.grad.<saved key> for every lora_A, lora_B and
                        lora_magnitude_vector; nf4.merged: logits after merge_and_unload (peft
                        re-quantizes W'); int8.adapted: the same adapter on the int8 base (eval);
                        nf4.init.<saved key>: the magnitudes of a fresh default-init DoRA adapter
                        on the NF4 base (the dequantized weights' row norms)
"""
import os
import shutil

import torch
import bitsandbytes.nn.modules as bnb_modules
# On a CPU with AVX512-BF16, bitsandbytes 0.50's Linear4bit repacks its weights to bfloat16 in
# eval mode for a fused inference kernel, which moves the logits by ~1e-2. The reference is the
# float32 dequantize-and-matmul path (what training takes, and what a CPU without AVX512-BF16
# runs): turn the repacking off so the fixtures do not depend on the machine.
bnb_modules.has_avx512bf16 = lambda: False
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from make_quant_fixtures import save_adapter

OUT = os.path.join("peft-quant", "tests", "fixtures")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype=torch.float32)


def load(qcfg):
    m = AutoModelForCausalLM.from_pretrained(os.path.join(OUT, "tiny_llama"),
                                             quantization_config=BitsAndBytesConfig(**qcfg),
                                             device_map="cpu", dtype=torch.float32)
    return m.eval()


def saved_key(name):
    """peft's parameter name -> its key in adapter_model.safetensors, less "base_model.model."."""
    name = name.replace("base_model.model.", "", 1).replace(".default", "")
    return name.removesuffix(".lora_magnitude_vector.weight") + ".lora_magnitude_vector" \
        if name.endswith(".lora_magnitude_vector.weight") else name


def main():
    old = load_file(os.path.join(OUT, "qlora.safetensors"))
    ids, mask, labels = old["input_ids"], old["attention_mask"], old["labels"]

    # This environment reproduces the committed QLoRA case.
    check = PeftModel.from_pretrained(load(NF4), os.path.join(OUT, "qlora_adapter"))
    with torch.no_grad():
        got = check(input_ids=ids, attention_mask=mask).logits
    real = mask.unsqueeze(-1).float()
    diff = ((got - old["nf4.adapted"]) * real).abs().max().item()
    assert diff < 1e-5, f"this environment does not reproduce qlora.safetensors ({diff})"

    tensors = {}
    torch.manual_seed(11)
    cfg = dict(r=4, lora_alpha=10, lora_dropout=0.0, use_dora=True, init_lora_weights=False,
               target_modules=TARGETS)
    pm = get_peft_model(load(NF4), LoraConfig(**cfg))
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    adapter_dir = os.path.join(OUT, "qdora_adapter")
    shutil.rmtree(adapter_dir, ignore_errors=True)
    save_adapter(pm, adapter_dir)

    pm.train()
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    tensors["nf4.adapted"] = out.logits.detach()
    tensors["nf4.loss"] = out.loss.detach().reshape(1)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            tensors[f"nf4.grad.{saved_key(n)}"] = p.grad.detach().clone()
    pm.eval()
    merged = pm.merge_and_unload()
    with torch.no_grad():
        tensors["nf4.merged"] = merged(input_ids=ids, attention_mask=mask).logits

    i8 = PeftModel.from_pretrained(load(dict(load_in_8bit=True)), adapter_dir).eval()
    with torch.no_grad():
        tensors["int8.adapted"] = i8(input_ids=ids, attention_mask=mask).logits

    fresh = get_peft_model(load(NF4), LoraConfig(**dict(cfg, init_lora_weights=True)))
    for n, p in fresh.named_parameters():
        if "lora_magnitude_vector" in n:
            tensors[f"nf4.init.{saved_key(n)}"] = p.detach().clone()

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "qdora.safetensors"))
    print(f"wrote {adapter_dir} and {len(tensors)} tensors to qdora.safetensors")


if __name__ == "__main__":
    main()
