#!/usr/bin/env python3
"""LoftQ (init_lora_weights="loftq", loftq_config {loftq_bits, loftq_iter}) on the committed tiny
LLaMA: the base weight W is replaced by Q = dequant(quant(W - B A)) alternated with the rank-r SVD
of W - Q, peft's peft.utils.loftq_utils.loftq_init.
Produced with torch 2.15, transformers 5.24, peft 0.21.2, bitsandbytes 0.50.2 (CPU backend).

peft's loftq_init runs its arithmetic on "cuda" (or "xpu"); this machine has neither, so the script
runs peft's own function with that one device name replaced by "cpu" (the source is read from the
installed peft and executed unchanged otherwise).

Run from the repository root (peft's LoftQ config needs scipy):
    pip install torch transformers peft bitsandbytes scipy
    python tools/reference/make_loftq_fixtures.py

Writes peft/tests/fixtures/loftq.safetensors: input_ids / attention_mask, and per case <c>:
  <c>.base.<module>    the base weight after the initialisation (the dequantized Q)
  <c>.delta.<module>   scaling * B A of the fresh adapter
  <c>.logits           logits of the fresh model
and peft/tests/fixtures/loftq.json: per case, the LoraConfig kwargs.
"""
import inspect
import json
import os
import sys
import textwrap

import torch
import bitsandbytes.nn.modules as bnb_modules
bnb_modules.has_avx512bf16 = lambda: False  # see make_qdora_fixtures.py
import peft.tuners.lora.layer as lora_layer
import peft.utils.loftq_utils as loftq_utils
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_common import ROOT, IDS, MASK  # noqa: E402


CASES = {
    # NF4, one pass (Q = dequant(quant(W)), B A = the rank-r SVD of W - Q); scaling 2
    "loftq_nf4": dict(r=4, lora_alpha=8, init_lora_weights="loftq",
                      loftq_config={"loftq_bits": 4, "loftq_iter": 1},
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    # NF4, three alternations, a rank pattern
    "loftq_nf4_iter3": dict(r=4, lora_alpha=4, init_lora_weights="loftq",
                            loftq_config={"loftq_bits": 4, "loftq_iter": 3}, rank_pattern={"down_proj": 2},
                            target_modules=["q_proj", "down_proj"]),
    # int8 (per-row absmax), two alternations
    "loftq_int8": dict(r=2, lora_alpha=6, init_lora_weights="loftq",
                       loftq_config={"loftq_bits": 8, "loftq_iter": 2},
                       target_modules=["v_proj", "gate_proj"]),
}


def cpu_loftq_init():
    src = textwrap.dedent(inspect.getsource(loftq_utils.loftq_init))
    src = src.replace('compute_device = "xpu" if is_xpu_available() else "cuda"', 'compute_device = "cpu"')
    assert 'compute_device = "cpu"' in src
    namespace = dict(vars(loftq_utils))
    exec(compile(src, loftq_utils.__file__, "exec"), namespace)
    return namespace["loftq_init"]


def main():
    lora_layer.loftq_init = cpu_loftq_init()
    tensors = {"input_ids": IDS, "attention_mask": MASK}
    for case, cfg in CASES.items():
        base = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "models", "llama_tiny")).eval()
        pm = get_peft_model(base, LoraConfig(**cfg)).eval()
        for name, module in pm.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                path = name.replace("base_model.model.", "", 1)
                a = module.lora_A["default"].weight.detach().float()
                b = module.lora_B["default"].weight.detach().float()
                tensors[f"{case}.base.{path}"] = module.base_layer.weight.detach().float().clone()
                tensors[f"{case}.delta.{path}"] = (module.scaling["default"] * b @ a).contiguous()
        with torch.no_grad():
            tensors[f"{case}.logits"] = pm(input_ids=IDS, attention_mask=MASK).logits.float().contiguous()
    save_file(tensors, os.path.join(ROOT, "loftq.safetensors"))
    with open(os.path.join(ROOT, "loftq.json"), "w") as f:
        json.dump(CASES, f, indent=2)
    print(f"wrote {len(CASES)} LoftQ cases ({len(tensors)} tensors) under {ROOT}")


if __name__ == "__main__":
    main()
