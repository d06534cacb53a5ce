#!/usr/bin/env python3
"""Regenerates the reference fixtures under peft/tests/fixtures/ with Python peft + transformers
(LoRA here, then the other methods through make_method_fixtures.py).

Every expected number in the Rust parity tests comes from this script; none is hand-written.
Run:  pip install torch transformers peft safetensors && python tools/reference/make_fixtures.py
Produced with torch 2.15 (CPU), transformers 5.24, peft 0.21.2.

Layout (all small):
  models/<name>/            tiny random models saved by transformers (config.json + model.safetensors)
  adapters/<name>/          LoRA adapters saved by peft (adapter_config.json + adapter_model.safetensors)
  cases/<name>.safetensors  input_ids, attention_mask and logits (adapted, merged, base) for one
                            (model, adapter) pair, plus a greedy continuation
  cases.json                the case list: model, adapter, parameter line, generation prompt
  param_lines.json          print_trainable_parameters lines for configs built without weights
"""
import contextlib
import io
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from peft import LoraConfig, PeftModel, get_peft_model

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "peft", "tests", "fixtures")
ROOT = os.path.normpath(ROOT)


def perturb(model, seed):
    """Replace HF's small init with larger random weights so logits carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5))
    return model


def make_models():
    models = {}
    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    models["llama_tiny"] = perturb(LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)), 1)
    torch.manual_seed(0)
    models["llama3_rope_tied"] = perturb(
        LlamaForCausalLM(
            LlamaConfig(
                **common,
                tie_word_embeddings=True,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            )
        ),
        2,
    )
    torch.manual_seed(0)
    models["qwen2_tiny"] = perturb(Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)), 3)
    torch.manual_seed(0)
    models["mistral_tiny"] = perturb(
        MistralForCausalLM(MistralConfig(**common, sliding_window=4, head_dim=16)), 4
    )
    for name, m in models.items():
        m.eval()
        path = os.path.join(ROOT, "models", name)
        shutil.rmtree(path, ignore_errors=True)
        m.save_pretrained(path)
    return models


# Inputs: row 0 full, row 1 left-padded, row 2 right-padded.
INPUT_IDS = torch.tensor(
    [
        [1, 17, 45, 99, 3, 64, 127, 8],
        [0, 0, 1, 23, 77, 5, 90, 31],
        [1, 50, 51, 52, 9, 0, 0, 0],
    ]
)
ATTENTION_MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 0, 0],
    ]
)
PROMPT = [1, 17, 45, 99, 3]

ADAPTERS = {
    # alpha != r, non-zero B (init_lora_weights=False), dropout (inactive in eval)
    "lora_qv": dict(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    # all-linear with exclusion, per-module ranks/alphas and rsLoRA
    "lora_patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        exclude_modules=["o_proj"],
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3},
        use_rslora=True,
        init_lora_weights=False,
    ),
    # a regex target
    "lora_regex": dict(r=3, lora_alpha=5, target_modules=r".*layers\.1\.self_attn\.(k|o)_proj", init_lora_weights=False),
    # layer selection
    "lora_layers": dict(
        r=2, lora_alpha=7, target_modules=["gate_proj", "up_proj"], layers_to_transform=[0], layers_pattern="layers",
        init_lora_weights=False,
    ),
    # embedding + head + attention
    "lora_embed": dict(r=4, lora_alpha=12, target_modules=["embed_tokens", "lm_head", "q_proj"], init_lora_weights=False),
    # default targets (null target_modules) with gaussian init and a perturbed B
    "lora_default": dict(r=8, lora_alpha=32, init_lora_weights="gaussian", task_type="CAUSAL_LM"),
    # a full trainable copy of the head beside LoRA (the copy is perturbed below)
    "lora_mts": dict(r=2, lora_alpha=6, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
}

CASES = [
    ("llama_tiny", "lora_qv"),
    ("llama_tiny", "lora_patterns"),
    ("llama_tiny", "lora_regex"),
    ("llama_tiny", "lora_layers"),
    ("llama_tiny", "lora_embed"),
    ("llama3_rope_tied", "lora_default"),
    ("qwen2_tiny", "lora_qv"),
    ("mistral_tiny", "lora_patterns"),
    ("llama_tiny", "lora_mts"),
]


def param_line(model):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue().strip()


def make_case(models, model_name, adapter_name, seed, adapters=None, perturb_more=None, trained=None):
    """One (model, adapter) case. `adapters` (default ADAPTERS) maps names to LoraConfig kwargs;
    `perturb_more(name, param, generator)`, when given, may change any parameter further before
    saving (make_dora_fixtures.py moves the DoRA magnitudes off their initial norms);
    `trained(name)`, when given, says which parameters take gradients (default: the LoRA
    tensors and modules_to_save copies; make_bias_fixtures.py adds the trained base biases)."""
    base_dir = os.path.join(ROOT, "models", model_name)
    cls = type(models[model_name])
    base = cls.from_pretrained(base_dir).eval()
    torch.manual_seed(seed)
    cfg = LoraConfig(**(adapters or ADAPTERS)[adapter_name])
    model = get_peft_model(base, cfg)
    # Make every B non-zero even where the init left it zero (gaussian init).
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_A" in n:
                if p.abs().sum() == 0:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            if "modules_to_save" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            if perturb_more is not None:
                perturb_more(n, p, g)
    line = param_line(model)
    adapter_dir = os.path.join(ROOT, "adapters", f"{model_name}__{adapter_name}")
    shutil.rmtree(adapter_dir, ignore_errors=True)
    model.save_pretrained(adapter_dir)

    if (model_name, adapter_name) == ("llama_tiny", "lora_qv"):
        # The older pickled format, for the loader of adapter_model.bin.
        bin_dir = adapter_dir + "_bin"
        shutil.rmtree(bin_dir, ignore_errors=True)
        model.save_pretrained(bin_dir, safe_serialization=False)

    # Reload from disk so the numbers are those of the saved checkpoint.
    base = cls.from_pretrained(base_dir).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    out = {"input_ids": INPUT_IDS.clone(), "attention_mask": ATTENTION_MASK.clone()}
    with torch.no_grad():
        out["logits_adapted"] = model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits.float()
        out["logits_unmasked"] = model(input_ids=INPUT_IDS[:1]).logits.float()
        with model.disable_adapter():
            out["logits_base"] = model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits.float()
        gen = model.generate(
            input_ids=torch.tensor([PROMPT]),
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        out["generated"] = gen[0, len(PROMPT):].clone()
    # Gradients of the causal-LM loss (labels = ids, padding ignored) w.r.t. every LoRA tensor,
    # in training mode with dropout disabled so the numbers are deterministic.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad_(trained(n) if trained else ("lora_" in n or "modules_to_save" in n))
    labels = INPUT_IDS.masked_fill(ATTENTION_MASK == 0, -100)
    loss = model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, labels=labels).loss
    loss.backward()
    out["loss"] = loss.detach().reshape(1)
    for n, p in model.named_parameters():
        if p.grad is not None:
            key = n.replace(".modules_to_save.default", "").replace(".default", "")
            out["grad." + key] = p.grad.detach().clone()
    model.eval()
    with torch.no_grad():
        merged = model.merge_and_unload()
        out["logits_merged"] = merged(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits.float()
    os.makedirs(os.path.join(ROOT, "cases"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "cases", f"{model_name}__{adapter_name}.safetensors"))
    return {"model": model_name, "adapter": adapter_name, "parameter_line": line, "prompt": PROMPT}


def make_param_lines():
    """Parameter lines for larger configs, built from configs (the Rust side builds the same shapes)."""
    out = []
    specs = [
        (
            "llama",
            dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False),
            dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        ),
        (
            "qwen2",
            dict(hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=500, tie_word_embeddings=True),
            dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"down_proj": 16}),
        ),
        (
            "mistral",
            dict(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=3, vocab_size=300, tie_word_embeddings=False),
            dict(r=6, lora_alpha=12, target_modules=["embed_tokens", "q_proj", "k_proj", "lm_head"]),
        ),
    ]
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    for model_type, mcfg, lcfg in specs:
        cfg_cls, model_cls = classes[model_type]
        torch.manual_seed(0)
        model = get_peft_model(model_cls(cfg_cls(**mcfg)), LoraConfig(**lcfg))
        config = model.base_model.model.config.to_dict()
        out.append({"model_config": config, "lora_config": lcfg, "parameter_line": param_line(model)})
    return out


def main():
    os.makedirs(ROOT, exist_ok=True)
    models = make_models()
    cases = [make_case(models, m, a, seed=i) for i, (m, a) in enumerate(CASES)]
    with open(os.path.join(ROOT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=2)
    with open(os.path.join(ROOT, "param_lines.json"), "w") as f:
        json.dump(make_param_lines(), f, indent=2, default=str)
    print(f"wrote fixtures under {ROOT}", file=sys.stderr)
    # The method fixtures use these models (and add a tokenizer to llama_tiny): refresh them too.
    import make_method_fixtures

    make_method_fixtures.main()


if __name__ == "__main__":
    main()
