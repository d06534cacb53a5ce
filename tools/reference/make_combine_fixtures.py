#!/usr/bin/env python3
"""Adapter arithmetic (peft's `add_weighted_adapter`) on the committed tiny models and adapters.
Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_combine_fixtures.py
(the models and adapters under peft/tests/fixtures are read; three more adapters are written.)

Writes under peft/tests/fixtures/:
  adapters/llama_tiny__lora_qvo/   LoRA r=4, alpha 6 on q, v, o (non-zero B): same rank as
                                   lora_qv with another alpha and one more module
  adapters/gpt2_tiny__lora_proj/   LoRA r=4, alpha 3 on c_attn and attn.c_proj (Conv1D)
  adapters/llama_tiny__ia3_qv/     IA3 on q, v, down_proj (feed-forward), random vectors
  combine.json                     the cases: model, adapters (name, folder), weights, the
                                   combination and its options, and the combined config as peft
                                   holds it (r, lora_alpha, target_modules, modules_to_save)
  combine.safetensors              per case <case>/<key> for every tensor of the combined
                                   adapter's state dict (peft's saved keys), <case>.logits with
                                   only the combined adapter active, and input_ids /
                                   attention_mask; for svd_clamp cases also the unclamped
                                   factors <case>.unclamped/<key> (the clamp step is checked on
                                   peft's own SVD, whose singular vectors' signs are LAPACK's)

Inputs: alpha != r, non-zero B, rank and alpha patterns with rsLoRA, negative weights, an
embedding and the output head, Conv1D layers, a modules_to_save copy, DoRA. DARE cases use
density 1 (no random pruning: peft's torch.bernoulli mask cannot be reproduced elsewhere).
"""
import json
import os
import shutil

import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join("peft", "tests", "fixtures")

IDS = torch.tensor([[1, 17, 45, 99, 3, 64, 127, 8], [1, 5, 9, 2, 120, 33, 7, 61]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])

QV = ["qv", "llama_tiny__lora_qv"]
QVO = ["qvo", "llama_tiny__lora_qvo"]
EMBED = ["embed", "llama_tiny__lora_embed"]
PATTERNS = ["patterns", "llama_tiny__lora_patterns"]
MTS = ["mts", "llama_tiny__lora_mts"]
DORA = ["dora", "llama_tiny__dora_mixed"]
GPT2 = ["plain", "gpt2_tiny__lora"]
GPT2_PROJ = ["proj", "gpt2_tiny__lora_proj"]
IA3_A = ["ia3", "llama_tiny__ia3_default"]
IA3_B = ["ia3_qv", "llama_tiny__ia3_qv"]


def case(name, model, adapters, weights, combination=None, **options):
    return {"case": name, "model": model, "adapters": adapters, "weights": weights,
            "combination_type": combination, "options": options}


CASES = [
    case("linear", "llama_tiny", [QV, QVO], [0.7, -0.4], "linear"),
    case("linear_single", "llama_tiny", [QVO], [1.5], "svd"),  # one adapter: peft uses linear
    case("cat", "llama_tiny", [QV, QVO, EMBED], [0.6, 0.5, -0.3], "cat"),
    case("cat_patterns", "llama_tiny", [PATTERNS, QV], [0.8, 0.4], "cat"),
    case("svd", "llama_tiny", [QV, EMBED], [0.9, 0.6], "svd"),
    case("svd_rank", "llama_tiny", [QV, QVO], [0.5, 0.5], "svd", svd_rank=3),
    case("svd_patterns", "llama_tiny", [QVO, PATTERNS], [1.0, -0.7], "svd"),
    case("svd_clamp", "llama_tiny", [QV, QVO], [0.8, 0.6], "svd", svd_clamp=0.9),
    case("ties", "llama_tiny", [QV, QVO], [0.7, 0.6], "ties", density=0.5),
    case("ties_frequency", "llama_tiny", [QV, QVO], [1.0, -0.5], "ties", density=0.7,
         majority_sign_method="frequency"),
    case("ties_svd", "llama_tiny", [QV, EMBED], [0.7, 0.5], "ties_svd", density=0.6),
    case("magnitude_prune", "llama_tiny", [QV, QVO], [0.6, 0.9], "magnitude_prune", density=0.4),
    case("magnitude_prune_svd", "llama_tiny", [QV, QVO, EMBED], [0.5, 0.5, 0.5],
         "magnitude_prune_svd", density=0.5, svd_rank=5),
    case("dare_linear", "llama_tiny", [QV, QVO], [0.7, 0.3], "dare_linear", density=1.0),
    case("dare_ties", "llama_tiny", [QV, QVO], [0.7, 0.3], "dare_ties", density=1.0),
    case("dare_linear_svd", "llama_tiny", [QV, QVO], [0.7, 0.3], "dare_linear_svd", density=1.0),
    case("dare_ties_svd", "llama_tiny", [QV, QVO], [0.7, -0.3], "dare_ties_svd", density=1.0),
    case("mts_first", "llama_tiny", [MTS, QV], [1.0, 0.5], "cat"),
    case("dora", "llama_tiny", [DORA, QVO], [0.6, 0.8], "svd"),
    case("gpt2_svd", "gpt2_tiny", [GPT2, GPT2_PROJ], [0.8, 0.5], "svd"),
    case("gpt2_cat", "gpt2_tiny", [GPT2, GPT2_PROJ], [0.8, -0.5], "cat"),
    case("gpt2_linear", "gpt2_tiny", [GPT2, GPT2_PROJ], [0.8, 0.5], "linear"),
    case("ia3", "llama_tiny", [IA3_A, IA3_B], [0.6, 0.5]),
]


def base(model):
    return AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "models", model)).eval()


def write_adapter(model, folder, cfg, seed):
    torch.manual_seed(seed)
    pm = get_peft_model(base(model), cfg)
    out = os.path.join(ROOT, "adapters", folder)
    shutil.rmtree(out, ignore_errors=True)
    pm.save_pretrained(out)


def new_adapters():
    write_adapter("llama_tiny", QVO[1], LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj"],
                                                   init_lora_weights=False), 71)
    write_adapter("gpt2_tiny", GPT2_PROJ[1], LoraConfig(r=4, lora_alpha=3, target_modules=["c_attn", "attn.c_proj"],
                                                        init_lora_weights=False, fan_in_fan_out=True,
                                                        task_type="CAUSAL_LM"), 72)
    write_adapter("llama_tiny", IA3_B[1], IA3Config(target_modules=["q_proj", "v_proj", "down_proj"],
                                                    feedforward_modules=["down_proj"], init_ia3_weights=False,
                                                    task_type="CAUSAL_LM"), 73)


def combined_config(cfg):
    d = cfg.to_dict()
    tm = d.get("target_modules")
    out = {"peft_type": str(d["peft_type"].value if hasattr(d["peft_type"], "value") else d["peft_type"]),
           "target_modules": sorted(tm) if isinstance(tm, (list, set)) else tm,
           "modules_to_save": d.get("modules_to_save")}
    for key in ["r", "lora_alpha", "use_dora", "use_rslora", "rank_pattern", "alpha_pattern"]:
        if key in d:
            out[key] = d[key]
    ff = d.get("feedforward_modules")
    if ff is not None:
        out["feedforward_modules"] = sorted(ff) if isinstance(ff, (list, set)) else ff
    return out


def main():
    new_adapters()
    tensors = {"input_ids": IDS, "attention_mask": MASK}
    for c in CASES:
        name = c["case"]
        (first, first_dir), *rest = c["adapters"]
        pm = PeftModel.from_pretrained(base(c["model"]), os.path.join(ROOT, "adapters", first_dir),
                                       adapter_name=first)
        for adapter, folder in rest:
            pm.load_adapter(os.path.join(ROOT, "adapters", folder), adapter_name=adapter)
        names = [a for a, _ in c["adapters"]]
        kwargs = {}
        if c["combination_type"] is not None:
            kwargs["combination_type"] = c["combination_type"]
        kwargs.update(c["options"])
        if getattr(pm.peft_config[first], "use_dora", False):
            # The combined adapter is injected with the first one's init_lora_weights, and DoRA's
            # magnitude is computed at injection: with `false` (random B, as every committed
            # adapter was made) it is a random draw. peft-rs starts it as the default
            # initialisation does (B = 0, so the magnitude is ||W||); ask peft for the same.
            pm.peft_config[first].init_lora_weights = True
        torch.manual_seed(0)
        pm.add_weighted_adapter(names, c["weights"], "combined", **kwargs)
        pm.set_adapter("combined")
        pm.eval()
        with torch.no_grad():
            logits = pm(input_ids=IDS, attention_mask=MASK).logits
        tensors[f"{name}.logits"] = logits.float()
        for k, v in get_peft_model_state_dict(pm, adapter_name="combined").items():
            tensors[f"{name}/{k}"] = v.detach().float().clone()  # a copy: state dicts hold the live parameters
        if "svd_clamp" in c["options"]:
            unclamped = {k: v for k, v in c["options"].items() if k != "svd_clamp"}
            pm.add_weighted_adapter(names, c["weights"], "unclamped", combination_type=c["combination_type"],
                                    **unclamped)
            for k, v in get_peft_model_state_dict(pm, adapter_name="unclamped").items():
                tensors[f"{name}.unclamped/{k}"] = v.detach().float().clone()
        c["combined_config"] = combined_config(pm.peft_config["combined"])
        print(name, c["combined_config"].get("r"), logits.abs().max().item())
    with open(os.path.join(ROOT, "combine.json"), "w") as f:
        json.dump(CASES, f, indent=2)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, os.path.join(ROOT, "combine.safetensors"))
    print("wrote", len(CASES), "combination cases")


if __name__ == "__main__":
    main()
