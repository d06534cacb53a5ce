#!/usr/bin/env python3
"""LoRA `bias` ("all", "lora_only") and `lora_bias` reference fixtures on the committed tiny
models, in the layout of make_fixtures.py's LoRA cases, so that peft/tests/parity_lora.rs checks
every one of them the same way: adapted, unmasked, base (adapter disabled: trained base biases
stay, as in peft) and merged logits, merge_and_unload, the parameter line, greedy generation with
the KV cache, and the loss and every gradient (lora_A, lora_B, lora_B.bias and the trained base
biases) of a training step.
Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_bias_fixtures.py
(the models under peft/tests/fixtures/models are read, not regenerated.)

Writes under peft/tests/fixtures/:
  adapters/<model>__<adapter>/         the adapters as peft saves them (with bias="all" the file
                                       holds every bias of the model: `<path>.base_layer.bias` for
                                       LoRA-wrapped layers, `<path>.bias` for the rest, norms too)
  cases/<model>__<adapter>.safetensors the tensors make_fixtures.make_case writes
  bias_cases.json                      the case list (model, adapter, parameter line, prompt)

Every case has alpha != r and non-zero B; the trained base biases are moved off the base's
values (plus 0.1 randn) before saving, so loading them shows in the outputs.
"""
import json
import os
import sys

import torch
from transformers import GPT2LMHeadModel, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures  # noqa: E402
from make_fixtures import ROOT, make_case  # noqa: E402

ADAPTERS = {
    # every bias of GPT-2 (Conv1D layers, targeted or not, and the LayerNorms) trained and saved
    "bias_all": dict(
        r=4, lora_alpha=10, bias="all", init_lora_weights=False, fan_in_fan_out=True,
        target_modules=["c_attn", "mlp.c_proj"], rank_pattern={"c_attn": 2},
    ),
    # the biases of the adapted layers only, and a bias on lora_B (Qwen2's biased q/k/v)
    "bias_lora_only": dict(
        r=4, lora_alpha=6, bias="lora_only", lora_bias=True,
        target_modules=["q_proj", "k_proj", "v_proj"], alpha_pattern={"v_proj": 9},
    ),
    # lora_bias alone, on GPT-2's Conv1D layers
    "lora_bias": dict(
        r=4, lora_alpha=12, lora_bias=True, init_lora_weights=False, fan_in_fan_out=True,
        target_modules=["c_attn", "c_fc"],
    ),
}

CASES = [
    ("gpt2_tiny", "bias_all", GPT2LMHeadModel),
    ("qwen2_tiny", "bias_lora_only", Qwen2ForCausalLM),
    ("gpt2_tiny", "lora_bias", GPT2LMHeadModel),
]


def perturb_bias(name, param, generator):
    if name.endswith(".bias") and "lora_" not in name and param.requires_grad:
        param.add_(0.1 * torch.randn(param.shape, generator=generator))


def trained(name):
    return "lora_" in name or name.endswith(".bias")


def main():
    make_fixtures.ADAPTERS.update(ADAPTERS)
    cases = []
    for seed, (model_name, adapter_name, cls) in enumerate(CASES, start=70):
        models = {model_name: cls.__new__(cls)}  # make_case only reads the class
        bias = ADAPTERS[adapter_name].get("bias", "none")
        if bias == "all":
            pred = trained
        elif bias == "lora_only":
            def pred(n):
                return "lora_" in n or n.endswith("base_layer.bias")
        else:
            def pred(n):
                return "lora_" in n
        case = make_case(models, model_name, adapter_name, seed, ADAPTERS, perturb_bias, pred)
        cases.append(case)
        print(f"{model_name}__{adapter_name}: {case['parameter_line']}")
    with open(os.path.join(ROOT, "bias_cases.json"), "w") as f:
        json.dump(cases, f, indent=2)
    print(f"wrote {len(cases)} bias cases under {ROOT}")


if __name__ == "__main__":
    main()
