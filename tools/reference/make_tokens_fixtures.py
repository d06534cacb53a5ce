#!/usr/bin/env python3
"""LoRA with trainable_token_indices (peft's TrainableTokensWrapper: chosen embedding rows trained
as token_adapter.trainable_tokens_delta, replacing those rows; a head tied to the input embedding
shares them) on the committed tiny models. Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_tokens_fixtures.py

For each case <c> writes under peft/tests/fixtures/:
  adapters/<model>__<c>/   the adapter as peft saves it: LoRA with non-zero B
                           (init_lora_weights=False), the trained rows moved off the originals
                           (+ 0.1 randn)
  tokens.safetensors       input_ids / attention_mask, and per case: <c>.logits (eval),
                           <c>.merged (merge_and_unload), <c>.loss (causal-LM, labels = ids with
                           the padding at -100) and <c>.grad.<saved key> of every trainable tensor,
                           <c>.fresh.<saved key>: the trained rows of a fresh adapter (copies of
                           the base rows)
  tokens.json              per case: model, parameter line, saved keys
"""
import json
import os
import sys
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_common import ROOT, IDS, MASK, base, param_line, logits  # noqa: E402


CASES = [
    # a list: the input embedding (LLaMA, untied head)
    ("tokens_list", "llama_tiny", dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"],
                                        trainable_token_indices=[3, 5, 9, 120])),
    # GPT-2 ties lm_head to wte: the head reads the same trained rows
    ("tokens_tied", "gpt2_tiny", dict(r=2, lora_alpha=6, target_modules=["c_attn"],
                                       trainable_token_indices=[17, 45, 2, 99])),
    # an object: the embedding and the (untied) head, each with its own rows
    ("tokens_named", "llama_tiny", dict(r=2, lora_alpha=3, target_modules=["o_proj"],
                                         trainable_token_indices={"embed_tokens": [1, 7], "lm_head": [7, 99, 64]})),
    # tied, both named with different indices: two separate sets of rows
    ("tokens_untied", "gpt2_tiny", dict(r=2, lora_alpha=4, target_modules=["c_fc"],
                                         trainable_token_indices={"wte": [5, 9], "lm_head": [9, 33]})),
]


def saved_key(name):
    return name.replace(".default.weight", ".weight").replace(".trainable_tokens_delta.default", ".trainable_tokens_delta")


def main():
    tensors = {"input_ids": IDS, "attention_mask": MASK}
    cases = {}
    for seed, (case, model, cfg) in enumerate(CASES, start=70):
        torch.manual_seed(seed)
        fresh = get_peft_model(base(model), LoraConfig(**cfg))
        for n, p in fresh.named_parameters():
            if "trainable_tokens_delta" in n:
                tensors[f"{case}.fresh.{saved_key(n)}"] = p.detach().clone()
        pm = get_peft_model(base(model), LoraConfig(init_lora_weights=False, **cfg))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "trainable_tokens_delta" in n:
                    p.add_(0.1 * torch.randn(p.shape))
        pm.eval()
        tensors[f"{case}.logits"] = logits(pm)
        out = os.path.join(ROOT, "adapters", f"{model}__{case}")
        shutil.rmtree(out, ignore_errors=True)
        pm.save_pretrained(out)
        again = PeftModel.from_pretrained(base(model), out).eval()
        assert (logits(again) - tensors[f"{case}.logits"]).abs().max() < 1e-6, case
        labels = IDS.masked_fill(MASK == 0, -100)
        pm.train()
        for mod in pm.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        loss = pm(input_ids=IDS, attention_mask=MASK, labels=labels).loss
        loss.backward()
        tensors[f"{case}.loss"] = loss.detach().reshape(1)
        for n, p in pm.named_parameters():
            if p.requires_grad:
                tensors[f"{case}.grad.{saved_key(n)}"] = p.grad.detach().float().clone()
        pm.eval()
        line = param_line(pm)
        tensors[f"{case}.merged"] = logits(pm.merge_and_unload())
        cases[case] = {"model": model, "parameter_line": line,
                       "saved_keys": sorted(load_file(os.path.join(out, "adapter_model.safetensors")))}
        print(case, line)
    save_file(tensors, os.path.join(ROOT, "tokens.safetensors"))
    with open(os.path.join(ROOT, "tokens.json"), "w") as f:
        json.dump(cases, f, indent=2)
    print(f"wrote {len(CASES)} trainable-token cases ({len(tensors)} tensors) under {ROOT}")


if __name__ == "__main__":
    main()
