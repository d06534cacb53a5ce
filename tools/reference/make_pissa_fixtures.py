#!/usr/bin/env python3
"""PiSSA and OLoRA (init_lora_weights="pissa" / "olora": the base weight is decomposed, the adapter
starts as its leading factors and the base keeps the residual) and their conversion to a plain
LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...)), on the committed tiny
models. Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_pissa_fixtures.py

For each case <c> (model, LoraConfig), writes under peft/tests/fixtures/:
  adapters/<model>__<c>_init/       the adapter right after get_peft_model, saved with
                                    init_lora_weights=True (peft's recipe; the conversion rewrites
                                    this folder's config, as here)
  adapters/<model>__<c>/            the adapter after "training" (every factor moved by 0.05 randn,
                                    DoRA magnitudes by 1 + 0.1 randn), saved as is (its config says
                                    pissa/olora: loading it reruns the decomposition on the base)
  adapters/<model>__<c>_converted/  the same adapter converted to a plain LoRA of twice the rank
                                    over the original base (not for DoRA, which peft cannot convert)
  pissa.safetensors                 input_ids / attention_mask, and per case:
    <c>.residual.<module>   the base weight after the initialisation (stored layout)
    <c>.delta.<module>      scaling * B A of the fresh adapter, [out, in]
    <c>.A.<module>, <c>.B.<module>  the fresh factors (equal across libraries for OLoRA; up to
                            the sign of each singular pair for PiSSA)
    <c>.fresh_logits        logits of the fresh model (the base's, up to rounding)
    <c>.trained_logits      logits after the factors moved
    <c>.converted_logits    the original base with the converted adapter (= trained_logits)
    <c>.loss, <c>.grad.<saved key>  causal-LM loss (labels = input_ids, mask -> -100) of the
                            fresh model and the gradient of each factor
"""
import os
import sys
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_common import ROOT, IDS, MASK, base, logits  # noqa: E402


CASES = [
    # exact SVD; square, tall (up) and wide (down, v) weights; rank and alpha patterns
    ("pissa_mixed", "llama_tiny", dict(
        r=4, lora_alpha=6, init_lora_weights="pissa",
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3})),
    # GPT-2's Conv1D (weights stored [in, out]), rsLoRA
    ("pissa_conv1d", "gpt2_tiny", dict(
        r=4, lora_alpha=10, init_lora_weights="pissa", use_rslora=True, fan_in_fan_out=True,
        target_modules=["c_attn", "c_fc"])),
    # QR of the weight as stored; k (wide: 32 x 64), o, up
    ("olora_mixed", "llama_tiny", dict(
        r=4, lora_alpha=12, init_lora_weights="olora",
        target_modules=["k_proj", "o_proj", "up_proj"], rank_pattern={"o_proj": 6})),
    # DoRA over the residual (its magnitude is the residual's norm), biased q/k/v (Qwen2)
    ("olora_dora", "qwen2_tiny", dict(
        r=4, lora_alpha=6, init_lora_weights="olora", use_dora=True,
        target_modules=["q_proj", "k_proj", "v_proj"])),
]


def saved_key(name):
    name = name.replace(".default.weight", ".weight").replace(".default", "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def main():
    tensors = {"input_ids": IDS, "attention_mask": MASK}
    for seed, (case, model, cfg) in enumerate(CASES, start=90):
        torch.manual_seed(seed)
        pm = get_peft_model(base(model), LoraConfig(**cfg))
        pm.eval()
        for name, module in pm.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                path = name.replace("base_model.model.", "", 1)
                a = module.lora_A["default"].weight.detach().float()
                b = module.lora_B["default"].weight.detach().float()
                tensors[f"{case}.residual.{path}"] = module.base_layer.weight.detach().float().clone()
                tensors[f"{case}.delta.{path}"] = (module.scaling["default"] * b @ a).contiguous()
                tensors[f"{case}.A.{path}"] = a.clone()
                tensors[f"{case}.B.{path}"] = b.clone()
        tensors[f"{case}.fresh_logits"] = logits(pm)
        # One causal-LM step's loss and gradients of the fresh adapter.
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
        pm.zero_grad()
        pm.eval()

        init_dir = os.path.join(ROOT, "adapters", f"{model}__{case}_init")
        trained_dir = os.path.join(ROOT, "adapters", f"{model}__{case}")
        converted_dir = os.path.join(ROOT, "adapters", f"{model}__{case}_converted")
        for d in (init_dir, trained_dir, converted_dir):
            shutil.rmtree(d, ignore_errors=True)
        init = pm.peft_config["default"].init_lora_weights
        pm.peft_config["default"].init_lora_weights = True
        pm.save_pretrained(init_dir)
        pm.peft_config["default"].init_lora_weights = init

        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.1 * torch.randn(p.shape))
                elif "lora_" in n:
                    p.add_(0.05 * torch.randn(p.shape))
        tensors[f"{case}.trained_logits"] = logits(pm)
        pm.save_pretrained(trained_dir)
        # peft reloads it by rerunning the decomposition on the original base.
        again = PeftModel.from_pretrained(base(model), trained_dir).eval()
        assert (logits(again) - tensors[f"{case}.trained_logits"]).abs().max() < 1e-5, case
        if not cfg.get("use_dora"):
            pm.save_pretrained(converted_dir, path_initial_model_for_weight_conversion=init_dir)
            conv = PeftModel.from_pretrained(base(model), converted_dir).eval()
            tensors[f"{case}.converted_logits"] = logits(conv)
            gap = (tensors[f"{case}.converted_logits"] - tensors[f"{case}.trained_logits"]).abs().max()
            print(case, "converted vs trained", gap.item())
        print(case, "fresh vs base", (tensors[f"{case}.fresh_logits"] - logits(base(model))).abs().max().item())
    save_file(tensors, os.path.join(ROOT, "pissa.safetensors"))
    print(f"wrote {len(CASES)} PiSSA/OLoRA cases ({len(tensors)} tensors) under {ROOT}")


if __name__ == "__main__":
    main()
