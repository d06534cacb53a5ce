#!/usr/bin/env python3
"""DoRA reference fixtures (LoRA with use_dora=True) on the committed tiny models, in the layout
of make_fixtures.py's LoRA cases, so that peft/tests/parity_lora.rs checks every one of them the
same way: adapted, unmasked, base and merged logits, merge_and_unload, the parameter line, greedy
generation with the KV cache, and the loss and every gradient (lora_A, lora_B and
lora_magnitude_vector) of a training step.
Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_dora_fixtures.py
(the models under peft/tests/fixtures/models are read, not regenerated.)

Writes under peft/tests/fixtures/:
  adapters/<model>__<adapter>/        the DoRA adapters as peft saves them
  cases/<model>__<adapter>.safetensors the tensors make_fixtures.make_case writes (gradients named
                                      by the saved keys: grad.<key>.lora_magnitude_vector)
  dora_cases.json                     the case list (model, adapter, parameter line, prompt)
  dora_init.safetensors               fresh adapters' magnitudes: for each case, peft's
                                      lora_magnitude_vector of a new adapter with the default init
                                      (B zero, so the magnitude is the base weight's norm), as
                                      init.<model>__<adapter>.<saved key without base_model.model.>

Every case has alpha != r and a non-zero B (init_lora_weights=False); the magnitudes are moved off
their initial norms (times 1 + 0.2 * randn) so that m / ||W + s B A|| is not 1 and the DoRA scaling
shows in the outputs.
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM
from peft import LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures  # noqa: E402
from make_fixtures import ROOT, make_case  # noqa: E402

ADAPTERS = {
    # attention, MLP, the head and the input embedding; rank and alpha patterns; dropout (off
    # in eval, p = 0 for the gradients)
    "dora_mixed": dict(
        r=4, lora_alpha=12, lora_dropout=0.1, use_dora=True, init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head", "embed_tokens"],
        rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 5},
    ),
    # rsLoRA scaling, biased q/k/v (Qwen2): the bias stays outside the DoRA rescaling
    "dora_rslora": dict(
        r=4, lora_alpha=6, use_dora=True, use_rslora=True, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
    ),
    # GPT-2's Conv1D layers (weights stored [in, out], fan_in_fan_out), biased
    "dora_conv1d": dict(
        r=4, lora_alpha=10, use_dora=True, init_lora_weights=False, fan_in_fan_out=True,
        target_modules=["c_attn", "c_fc", "c_proj"],
    ),
}

CASES = [
    ("llama_tiny", "dora_mixed", LlamaForCausalLM),
    ("qwen2_tiny", "dora_rslora", Qwen2ForCausalLM),
    ("gpt2_tiny", "dora_conv1d", GPT2LMHeadModel),
]


def perturb_magnitude(name, param, generator):
    if "lora_magnitude_vector" in name:
        param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))


def saved_key(name):
    """peft's parameter name -> the saved adapter key without "base_model.model."."""
    name = name.replace("base_model.model.", "", 1)
    return name.replace(".default.weight", "").replace(".default", "")


def main():
    make_fixtures.ADAPTERS.update(ADAPTERS)
    cases, init = [], {}
    for seed, (model_name, adapter_name, cls) in enumerate(CASES, start=50):
        models = {model_name: cls.__new__(cls)}  # make_case only reads the class
        case = make_case(models, model_name, adapter_name, seed, ADAPTERS, perturb_magnitude)
        cases.append(case)
        # make_case names gradients after peft's parameters; the magnitude's parameter is
        # `lora_magnitude_vector.default.weight`, saved as `lora_magnitude_vector`: use the saved key.
        path = os.path.join(ROOT, "cases", f"{model_name}__{adapter_name}.safetensors")
        tensors = load_file(path)
        tensors = {k.removesuffix(".lora_magnitude_vector.weight") + ".lora_magnitude_vector"
                   if k.endswith(".lora_magnitude_vector.weight") else k: v for k, v in tensors.items()}
        save_file(tensors, path)
        # A fresh adapter with the default init: its magnitudes are the weight norms.
        fresh_cfg = dict(ADAPTERS[adapter_name], init_lora_weights=True)
        base = cls.from_pretrained(os.path.join(ROOT, "models", model_name)).eval()
        fresh = get_peft_model(base, LoraConfig(**fresh_cfg))
        for n, p in fresh.named_parameters():
            if "lora_magnitude_vector" in n:
                init[f"init.{model_name}__{adapter_name}.{saved_key(n)}"] = p.detach().clone()
        print(f"{model_name}__{adapter_name}: {case['parameter_line']}")
    with open(os.path.join(ROOT, "dora_cases.json"), "w") as f:
        json.dump(cases, f, indent=2)
    save_file({k: v.contiguous() for k, v in init.items()}, os.path.join(ROOT, "dora_init.safetensors"))
    print(f"wrote {len(cases)} DoRA cases and {len(init)} initial magnitudes under {ROOT}")


if __name__ == "__main__":
    main()
