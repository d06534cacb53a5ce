#!/usr/bin/env python3
"""LoRA with layer_replication (peft's replicate_layers: the decoder stack rebuilt from ranges of
the original, copies sharing the frozen weights, each copy with its own LoRA) on the committed
tiny LLaMAs (2 layers). Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_replication_fixtures.py

For each case <c> writes under peft/tests/fixtures/:
  adapters/<model>__<c>/     the adapter as peft saves it (non-zero B, init_lora_weights=False)
  replication.safetensors    input_ids / attention_mask, and per case: <c>.fresh (logits of a
                             fresh adapter with B = 0: the replicated base), <c>.logits,
                             <c>.merged (merge_and_unload), <c>.loss (labels = ids, padding at
                             -100) and <c>.grad.<saved key> for every trainable tensor
  replication.json           per case: model, parameter line, layer count after replication
  replication_bert.safetensors, replication_bert.json: BERT (BertForSequenceClassification,
                             bert.encoder.layer) with replicated layers: input_ids /
                             attention_mask, logits (eval) and the parameter line
"""
import json
import os
import sys
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_common import ROOT, IDS, MASK, base, param_line, logits  # noqa: E402


CASES = [
    # [0, 1] then layer 1 again: 3 layers
    ("replicate_tail", "llama_tiny", dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                                           layer_replication=[[0, 2], [1, 2]])),
    # reordered and repeated: [1, 0, 1]; Llama 3 RoPE scaling, tied embeddings (transformers 5 Qwen2 reads
    # config.layer_types per layer, which peft does not extend: it fails there)
    ("replicate_reorder", "llama3_rope_tied", dict(r=4, lora_alpha=6, target_modules=["k_proj", "o_proj"],
                                              layer_replication=[[1, 2], [0, 2]])),
]


def main():
    tensors = {"input_ids": IDS, "attention_mask": MASK}
    cases = {}
    for seed, (case, model, cfg) in enumerate(CASES, start=60):
        torch.manual_seed(seed)
        tensors[f"{case}.fresh"] = logits(get_peft_model(base(model), LoraConfig(**cfg)).eval())
        pm = get_peft_model(base(model), LoraConfig(init_lora_weights=False, **cfg)).eval()
        tensors[f"{case}.logits"] = logits(pm)
        out = os.path.join(ROOT, "adapters", f"{model}__{case}")
        shutil.rmtree(out, ignore_errors=True)
        pm.save_pretrained(out)
        again = PeftModel.from_pretrained(base(model), out).eval()
        assert (logits(again) - tensors[f"{case}.logits"]).abs().max() < 1e-6, case
        labels = IDS.masked_fill(MASK == 0, -100)
        loss = pm(input_ids=IDS, attention_mask=MASK, labels=labels).loss
        loss.backward()
        tensors[f"{case}.loss"] = loss.detach().reshape(1)
        for n, p in pm.named_parameters():
            if p.requires_grad:
                tensors[f"{case}.grad.{n.replace('.default.weight', '.weight')}"] = p.grad.detach().clone()
        line = param_line(pm)
        layers = pm.base_model.model.config.num_hidden_layers
        tensors[f"{case}.merged"] = logits(pm.merge_and_unload())
        cases[case] = {"model": model, "parameter_line": line, "num_layers": layers}
        print(case, layers, line)
    # BERT: peft replicates bert.encoder.layer.
    torch.manual_seed(66)
    bert = AutoModelForSequenceClassification.from_pretrained(os.path.join(ROOT, "models", "bert_seqcls")).eval()
    cfg = dict(r=2, lora_alpha=3, target_modules=["query", "value"], layer_replication=[[0, 2], [0, 1]],
               task_type="SEQ_CLS", init_lora_weights=False)
    pm = get_peft_model(bert, LoraConfig(**cfg)).eval()
    out = os.path.join(ROOT, "adapters", "bert_seqcls__replicate")
    shutil.rmtree(out, ignore_errors=True)
    pm.save_pretrained(out)
    bert_tensors = {"input_ids": IDS, "attention_mask": MASK, "logits": logits(pm)}
    save_file(bert_tensors, os.path.join(ROOT, "replication_bert.safetensors"))
    with open(os.path.join(ROOT, "replication_bert.json"), "w") as f:
        json.dump({"parameter_line": param_line(pm),
                   "num_layers": pm.base_model.model.config.num_hidden_layers}, f, indent=2)
    print("bert", param_line(pm))
    save_file(tensors, os.path.join(ROOT, "replication.safetensors"))
    with open(os.path.join(ROOT, "replication.json"), "w") as f:
        json.dump(cases, f, indent=2)
    print(f"wrote {len(CASES)} layer-replication cases ({len(tensors)} tensors) under {ROOT}")


if __name__ == "__main__":
    main()
