#!/usr/bin/env python3
"""Mixed-adapter batches (peft's `adapter_names=`): each row of a batch runs its own adapter,
`"__base__"` none, on the committed tiny models and adapters.
Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_mixed_fixtures.py
(the models and adapters under peft/tests/fixtures are read; one more T5 adapter is written.)

Writes under peft/tests/fixtures/:
  adapters/t5_tiny__lora_o_wi/   a second T5 LoRA adapter (o and wi, r=2, alpha 5, non-zero B), so
                                 T5 rows can take two adapters
  mixed_batch.json               the cases: model, adapters (name, folder), the per-row names of
                                 the forward batch and of the generation batch
  mixed_batch.safetensors        per case <case>.input_ids / .attention_mask (/ .decoder_input_ids)
                                 and .logits of the forward with adapter_names; .gen_input_ids /
                                 .gen_attention_mask (left padded) and .generated, greedy decoding
                                 of 6 new tokens with adapter_names (the decoder's tokens for T5)

The adapters (alpha != r, non-zero B) reach attention, MLP, the input embedding, the output head
and (a case of its own) a modules_to_save copy of the head, so rows differ in every kind of layer.
"""
import json
import os
import shutil

import torch
from peft import LoraConfig, PeftModelForCausalLM, PeftModelForSeq2SeqLM, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

ROOT = os.path.join("peft", "tests", "fixtures")

CASES = [
    {
        "case": "llama_mixed",
        "model": "llama_tiny",
        "adapters": [["qv", "llama_tiny__lora_qv"], ["embed", "llama_tiny__lora_embed"],
                     ["patterns", "llama_tiny__lora_patterns"]],
        "adapter_names": ["qv", "__base__", "embed", "qv", "patterns"],
        "gen_adapter_names": ["embed", "patterns", "__base__", "qv"],
    },
    {
        # a modules_to_save copy of the head (peft cannot also put LoRA on lm_head then). peft's
        # ModulesToSaveWrapper raises KeyError for a row whose adapter has no copy, so only
        # "mts" and base rows here.
        "case": "llama_mts",
        "model": "llama_tiny",
        "adapters": [["mts", "llama_tiny__lora_mts"], ["qv", "llama_tiny__lora_qv"]],
        "adapter_names": ["__base__", "mts", "mts", "__base__", "mts"],
        "gen_adapter_names": ["mts", "__base__", "mts", "__base__"],
    },
    {
        "case": "gpt2_mixed",
        "model": "gpt2_tiny",
        "adapters": [["plain", "gpt2_tiny__lora"], ["biased", "gpt2_tiny__lora_bias"]],
        "adapter_names": ["biased", "plain", "__base__", "biased", "plain"],
        "gen_adapter_names": ["plain", "biased", "biased", "__base__"],
    },
    {
        "case": "t5_mixed",
        "model": "t5_tiny",
        "adapters": [["qv", "t5_tiny__lora"], ["ffn", "t5_tiny__lora_o_wi"]],
        "adapter_names": ["ffn", "__base__", "qv", "ffn", "qv"],
        "gen_adapter_names": ["qv", "ffn", "__base__", "ffn"],
    },
]

IDS = torch.tensor([
    [1, 17, 45, 99, 3, 64, 127, 8],
    [0, 0, 1, 23, 77, 5, 90, 31],
    [1, 5, 9, 2, 120, 33, 7, 61],
    [0, 0, 0, 1, 88, 14, 42, 19],
    [1, 101, 3, 58, 6, 9, 11, 70],
])
MASK = (IDS != 0).long()
MASK[:, 0] = torch.where(IDS[:, 0] == 1, 1, MASK[:, 0])
GEN_IDS = torch.tensor([
    [1, 17, 45, 99, 3],
    [0, 0, 1, 23, 77],
    [0, 1, 5, 9, 2],
    [1, 88, 14, 42, 19],
])
GEN_MASK = (GEN_IDS != 0).long()
DECODER_IDS = torch.tensor([[0, 5, 9, 3], [0, 44, 2, 7], [0, 12, 12, 90], [0, 1, 8, 20], [0, 66, 4, 31]])


def t5_second_adapter():
    base = AutoModelForSeq2SeqLM.from_pretrained(os.path.join(ROOT, "models", "t5_tiny")).eval()
    torch.manual_seed(91)
    cfg = LoraConfig(r=2, lora_alpha=5, target_modules=["o", "wi"], init_lora_weights=False,
                     task_type="SEQ_2_SEQ_LM")
    pm = get_peft_model(base, cfg)
    out = os.path.join(ROOT, "adapters", "t5_tiny__lora_o_wi")
    shutil.rmtree(out, ignore_errors=True)
    pm.save_pretrained(out)


def main():
    t5_second_adapter()
    tensors = {}
    for case in CASES:
        name, model = case["case"], case["model"]
        seq2seq = model.startswith("t5")
        auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        wrapper = PeftModelForSeq2SeqLM if seq2seq else PeftModelForCausalLM
        base = auto.from_pretrained(os.path.join(ROOT, "models", model)).eval()
        (first, first_dir), *rest = case["adapters"]
        pm = wrapper.from_pretrained(base, os.path.join(ROOT, "adapters", first_dir), adapter_name=first)
        for adapter, folder in rest:
            pm.load_adapter(os.path.join(ROOT, "adapters", folder), adapter_name=adapter)
        pm.eval()
        kwargs = dict(input_ids=IDS, attention_mask=MASK)
        if seq2seq:
            kwargs["decoder_input_ids"] = DECODER_IDS
            tensors[f"{name}.decoder_input_ids"] = DECODER_IDS
        with torch.no_grad():
            logits = pm(**kwargs, adapter_names=case["adapter_names"]).logits
            # Self-check: each row equals that row alone with its adapter active.
            for i, a in enumerate(case["adapter_names"]):
                row = {k: v[i:i + 1] for k, v in kwargs.items()}
                if a == "__base__":
                    with pm.disable_adapter():
                        want = pm(**row).logits
                else:
                    pm.set_adapter(a)
                    want = pm(**row).logits
                assert (want[0] - logits[i]).abs().max() < 1e-5, (name, i, a)
            pm.set_adapter(first)
            gen = pm.generate(input_ids=GEN_IDS, attention_mask=GEN_MASK, adapter_names=case["gen_adapter_names"],
                              max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        tensors[f"{name}.input_ids"] = IDS
        tensors[f"{name}.attention_mask"] = MASK
        tensors[f"{name}.logits"] = logits.float()
        tensors[f"{name}.gen_input_ids"] = GEN_IDS
        tensors[f"{name}.gen_attention_mask"] = GEN_MASK
        tensors[f"{name}.generated"] = gen[:, 1:] if seq2seq else gen[:, GEN_IDS.shape[1]:]
        print(name, tensors[f"{name}.generated"].tolist())
    with open(os.path.join(ROOT, "mixed_batch.json"), "w") as f:
        json.dump(CASES, f, indent=2)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, os.path.join(ROOT, "mixed_batch.safetensors"))
    print("wrote", len(CASES), "mixed-batch cases")


if __name__ == "__main__":
    main()
