#!/usr/bin/env python3
"""LoRA with ensure_weight_tying on models whose lm_head is tied to the input embedding: the head
is taken out of target_modules, the embedding put in, and the head's LoRA is tied to the
embedding's (lora_A = lora_embedding_B^T, lora_B = lora_embedding_A^T, sharing storage).
Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_tying_fixtures.py

For each case <c> writes under peft/tests/fixtures/:
  adapters/<model>__<c>/   the adapter as peft saves it (non-zero B, init_lora_weights=False, the
                           embedding's factors scaled by 0.2); both layers' factors are saved
  tying.safetensors        input_ids / attention_mask, and per case: <c>.logits, <c>.merged
                           (merge_and_unload), <c>.loss (labels = ids, padding at -100) and
                           <c>.grad.<saved key> for every trainable tensor (peft's tied factors
                           are separate leaves over one storage: each has its own gradient)
  tying.json               per case: model, parameter line, the saved target_modules

peft 0.21 itself does not reload these adapters as saved (see the note in main()).
"""
import json
import os
import sys
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_common import ROOT, IDS, MASK, base, param_line, logits  # noqa: E402


CASES = [
    # GPT-2 (wte tied to lm_head): the head targeted, the embedding added by peft
    ("tied_head", "gpt2_tiny", dict(r=2, lora_alpha=5, target_modules=["c_attn", "lm_head"],
                                     ensure_weight_tying=True)),
    # a tied LLaMA, both the embedding and the head targeted
    ("tied_both", "llama3_rope_tied", dict(r=4, lora_alpha=6, target_modules=["q_proj", "embed_tokens", "lm_head"],
                                            ensure_weight_tying=True)),
]


def saved_key(name):
    return name.replace(".default.weight", ".weight").replace(".default", "")


def main():
    tensors = {"input_ids": IDS, "attention_mask": MASK}
    cases = {}
    for seed, (case, model, cfg) in enumerate(CASES, start=40):
        torch.manual_seed(seed)
        pm = get_peft_model(base(model), LoraConfig(init_lora_weights=False, **cfg)).eval()
        with torch.no_grad():
            # init_lora_weights=False draws the embedding's factors from N(0, 1), which puts the
            # logits in the hundreds; scale them down (in place: the head's tied views follow).
            for n, p in pm.named_parameters():
                if "lora_embedding" in n:
                    p.mul_(0.2)
        tensors[f"{case}.logits"] = logits(pm)
        out = os.path.join(ROOT, "adapters", f"{model}__{case}")
        shutil.rmtree(out, ignore_errors=True)
        pm.save_pretrained(out)
        # peft 0.21 reloads this adapter without the head's LoRA: its saved target_modules name
        # the embedding only, and with the head no longer targeted it ties nothing. The adapter
        # files hold both layers' factors, so a loader that ties from them reproduces `logits`.
        again = PeftModel.from_pretrained(base(model), out).eval()
        print(case, "peft's own reload differs by", (logits(again) - tensors[f"{case}.logits"]).abs().max().item())
        labels = IDS.masked_fill(MASK == 0, -100)
        loss = pm(input_ids=IDS, attention_mask=MASK, labels=labels).loss
        loss.backward()
        tensors[f"{case}.loss"] = loss.detach().reshape(1)
        for n, p in pm.named_parameters():
            if p.requires_grad:
                tensors[f"{case}.grad.{saved_key(n)}"] = p.grad.detach().clone().contiguous()
        line = param_line(pm)
        with open(os.path.join(out, "adapter_config.json")) as f:
            targets = json.load(f)["target_modules"]
        tensors[f"{case}.merged"] = logits(pm.merge_and_unload())
        cases[case] = {"model": model, "parameter_line": line, "target_modules": sorted(targets)}
        print(case, line, sorted(targets))
    save_file(tensors, os.path.join(ROOT, "tying.safetensors"))
    with open(os.path.join(ROOT, "tying.json"), "w") as f:
        json.dump(cases, f, indent=2)
    print(f"wrote {len(CASES)} weight-tying cases ({len(tensors)} tensors) under {ROOT}")


if __name__ == "__main__":
    main()
