#!/usr/bin/env python3
"""peft's get_layer_status / get_model_status on the committed tiny models and adapters.
Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_status_fixtures.py

Writes peft/tests/fixtures/status.json: per case the model, the adapters loaded (name, folder,
is_trainable, in order), the adapter made active (with inference_mode = not is_trainable, so
that it stays as loaded), whether it was then merged, and peft's
`dataclasses.asdict` of every TunerLayerStatus and of the TunerModelStatus.
"""
import dataclasses
import json
import os

from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = os.path.join("peft", "tests", "fixtures")

CASES = [
    {"case": "three_loras", "model": "llama_tiny",
     "adapters": [["qv", "llama_tiny__lora_qv", False], ["qvo", "llama_tiny__lora_qvo", True],
                  ["mts", "llama_tiny__lora_mts", True]],
     "active": "mts", "merge": False},
    {"case": "merged", "model": "llama_tiny",
     "adapters": [["qv", "llama_tiny__lora_qv", True], ["embed", "llama_tiny__lora_embed", False]],
     "active": "embed", "merge": True},
    {"case": "dora_gpt2", "model": "gpt2_tiny",
     "adapters": [["plain", "gpt2_tiny__lora", True], ["dora", "gpt2_tiny__dora_conv1d", True]],
     "active": "dora", "merge": False},
    {"case": "ia3", "model": "llama_tiny",
     "adapters": [["ia3", "llama_tiny__ia3_default", True], ["ia3_qv", "llama_tiny__ia3_qv", False]],
     "active": "ia3", "merge": False},
]


def main():
    for c in CASES:
        base = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "models", c["model"])).eval()
        (first, first_dir, trainable), *rest = c["adapters"]
        pm = PeftModel.from_pretrained(base, os.path.join(ROOT, "adapters", first_dir), adapter_name=first,
                                       is_trainable=trainable)
        for name, folder, trainable in rest:
            pm.load_adapter(os.path.join(ROOT, "adapters", folder), adapter_name=name, is_trainable=trainable)
        # peft's set_adapter makes the adapter trainable unless inference_mode=True; peft-rs keeps
        # an adapter as loaded (frozen or trainable), so ask peft for the same.
        trainable = {name: t for name, _, t in c["adapters"]}
        pm.set_adapter(c["active"], inference_mode=not trainable[c["active"]])
        if c["merge"]:
            pm.merge_adapter()
        c["layer_status"] = [dataclasses.asdict(s) for s in pm.get_layer_status()]
        c["model_status"] = dataclasses.asdict(pm.get_model_status())
        print(c["case"], len(c["layer_status"]), "layers")
    with open(os.path.join(ROOT, "status.json"), "w") as f:
        json.dump(CASES, f, indent=1)


if __name__ == "__main__":
    main()
