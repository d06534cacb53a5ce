#!/usr/bin/env python3
"""Reference fixtures for the plugin methods of issue 18 (LoHa, LoKr, HRA, OFT, VeRA, FourierFT, MiSS, C3A, ...) on the committed tiny
models (run after make_fixtures.py and make_model_fixtures.py, which write them), in the format
of make_model_fixtures.py, whose make_case does the work. Produced with torch 2.15,
transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_plugin_method_fixtures.py

Writes, under peft/tests/fixtures/:
  adapters/<model>__<method>/         adapters saved by peft
  cases/<model>__<method>.safetensors  inputs, adapted / base / merged logits, greedy
                                       continuation, training-mode logits, loss, parameters and
                                       gradients (see make_model_fixtures.py)
  plugin_method_cases.json            model, method, task, parameter line
peft/tests/parity_models.rs runs these cases with the others.

Every adapter starts random (init_weights=False), so the updates are non-zero, and alpha != r
throughout, with rank and alpha patterns, so scaling mistakes show.
"""
import json
import os
import sys

from transformers import BertForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM, T5ForConditionalGeneration
from peft import C3AConfig, FourierFTConfig, HRAConfig, LoHaConfig, LoKrConfig, MissConfig, OFTConfig, VeraConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_model_fixtures as mmf  # noqa: E402
from make_fixtures import ROOT  # noqa: E402

MODELS = {
    "llama_tiny": (LlamaForCausalLM, "CAUSAL_LM"),
    "bert_seqcls": (BertForSequenceClassification, "SEQ_CLS"),
    "t5_tiny": (T5ForConditionalGeneration, "SEQ_2_SEQ_LM"),
}

# Models only some methods run on (peft refuses GPT-2's Conv1D layers for the others).
EXTRA_MODELS = {
    "vera": {"gpt2_tiny": (GPT2LMHeadModel, "CAUSAL_LM")},
    "fourierft": {"gpt2_tiny": (GPT2LMHeadModel, "CAUSAL_LM")},
}

METHODS = {
    # LoHa: the default targets (q/v, query/value, q/v) plus patterns.
    "loha": lambda task, mt: LoHaConfig(
        task_type=task, r=4, alpha=10, init_weights=False,
        **({"target_modules": ["q_proj", "v_proj", "down_proj"], "rank_pattern": {"down_proj": 2},
            "alpha_pattern": {"v_proj": 3}} if mt == "llama" else {}),
        **({"target_modules": ["q", "v", "wo"], "rank_pattern": {"wo": 6}} if mt == "t5" else {}),
    ),
    # LoKr: full and low-rank factors (r below half a factor's larger side), decompose_both,
    # a fixed decompose_factor.
    "lokr": lambda task, mt: LoKrConfig(
        task_type=task, r=3, alpha=7, init_weights=False,
        **({"target_modules": ["q_proj", "k_proj", "gate_proj", "down_proj"], "decompose_both": True,
            "rank_pattern": {"gate_proj": 8}, "alpha_pattern": {"k_proj": 2}} if mt == "llama" else {}),
        **({"decompose_factor": 4} if mt == "bert" else {}),
        **({"target_modules": ["k", "o", "wi"]} if mt == "t5" else {}),
    ),
    # HRA: an odd r (no symmetric init), Gram-Schmidt on BERT with its targeted biases
    # trained (bias="hra_only"), a layer selection on T5.
    "hra": lambda task, mt: HRAConfig(
        task_type=task, r=4 if mt == "bert" else 3, init_weights=False,
        **({"target_modules": ["q_proj", "o_proj", "up_proj"]} if mt == "llama" else {}),
        **({"apply_GS": True, "bias": "hra_only"} if mt == "bert" else {}),
        **({"target_modules": ["q", "wo"], "layers_to_transform": [1], "layers_pattern": "block"}
           if mt == "t5" else {}),
    ),
    # OFT: block sizes that peft adjusts per layer (20 -> 16 on 64 and 96 features), an
    # embedding, 7 Neumann terms on LLaMA; r instead of the block size, one shared block and
    # COFT (a radius the random blocks exceed) with its biases on BERT; the exact Cayley
    # transform on T5.
    "oft": lambda task, mt: OFTConfig(
        task_type=task, init_weights=False,
        **({"oft_block_size": 20, "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
            "num_cayley_neumann_terms": 7} if mt == "llama" else {}),
        **({"r": 4, "oft_block_size": 0, "block_share": True, "coft": True, "eps": 0.5, "bias": "oft_only"}
           if mt == "bert" else {}),
        **({"oft_block_size": 8, "target_modules": ["q", "wo"], "use_cayley_neumann": False}
           if mt == "t5" else {}),
    ),
    # VeRA: layers of different widths slicing the shared projections, a non-default PRNG key,
    # saved projections on LLaMA and GPT-2 (Conv1D, fan_in_fan_out), projections rebuilt from
    # the key on BERT (save_projection=False) with the targeted biases trained, T5 by default.
    "vera": lambda task, mt: VeraConfig(
        task_type=task, r=6, init_weights=False, projection_prng_key=123 if mt == "bert" else 7,
        **({"target_modules": ["q_proj", "v_proj", "down_proj", "gate_proj"]} if mt == "llama" else {}),
        **({"save_projection": False, "bias": "vera_only"} if mt == "bert" else {}),
        **({"target_modules": ["c_attn", "c_fc", "c_proj"]} if mt == "gpt2" else {}),
    ),
    # FourierFT: a random spectrum (peft's default init), scaling and seeds off their defaults,
    # an n_frequency_pattern on LLaMA, the targeted biases on BERT, Conv1D on GPT-2.
    "fourierft": lambda task, mt: FourierFTConfig(
        task_type=task, n_frequency=40, scaling=60.0, random_loc_seed=11,
        **({"target_modules": ["q_proj", "v_proj", "down_proj"], "n_frequency_pattern": {"down_proj": 25}}
           if mt == "llama" else {}),
        **({"bias": "fourier_only"} if mt == "bert" else {}),
        **({"target_modules": ["c_attn", "c_proj"]} if mt == "gpt2" else {}),
    ),
    # MiSS: a random shared shard whose r leaves a partial block (64 and 96 inputs, r=5) on
    # LLaMA, "bat" on BERT, "mini" on T5 (their zero shards perturbed by make_case).
    "miss": lambda task, mt: MissConfig(
        task_type=task,
        **({"r": 5, "init_weights": False, "target_modules": ["q_proj", "v_proj", "down_proj"]}
           if mt == "llama" else {}),
        **({"r": 16, "init_weights": "bat", "bias": "MiSS_only"} if mt == "bert" else {}),
        **({"r": 4, "mini_r": 8, "init_weights": "mini", "target_modules": ["q", "wo"]} if mt == "t5" else {}),
    ),
    # C3A: peft's default Xavier init with a block_size_pattern on LLaMA, Kaiming with the
    # targeted biases on BERT, Gaussian on T5.
    "c3a": lambda task, mt: C3AConfig(
        task_type=task,
        **({"block_size": 16, "block_size_pattern": {"down_proj": 32},
            "target_modules": ["q_proj", "v_proj", "down_proj"]} if mt == "llama" else {}),
        **({"block_size": 8, "init_weights": "kaiming_uniform", "bias": "c3a_only"} if mt == "bert" else {}),
        **({"block_size": 32, "init_weights": "gaussian", "target_modules": ["q", "wo"]} if mt == "t5" else {}),
    ),
}


def coft_raw_case(models):
    """OFT with COFT saved before any forward pass (make_case saves after the training step, when
    peft has already projected the blocks in place, so reloading cannot show the projection):
    adapters/bert_seqcls__oft_coft_raw and cases/bert_seqcls__oft_coft_raw.safetensors with the
    inputs, the logits of the first forward (which projects) and the projected parameters."""
    import torch
    from safetensors.torch import save_file
    from peft import get_peft_model
    base_model, task = models["bert_seqcls"]
    cls = type(base_model)
    base_dir = os.path.join(ROOT, "models", "bert_seqcls")
    torch.manual_seed(399)
    model = get_peft_model(cls.from_pretrained(base_dir).eval(), METHODS["oft"](task, "bert")).eval()
    name = "bert_seqcls__oft_coft_raw"
    model.save_pretrained(os.path.join(ROOT, "adapters", name))
    out = {"input_ids": mmf.INPUT_IDS.clone(), "attention_mask": mmf.ATTENTION_MASK.clone()}
    with torch.no_grad():
        out["logits_adapted"] = mmf.forward(model, task).float()
    for n, p in model.named_parameters():
        if "oft_R" in n:
            out["param." + mmf.short_name(n)] = p.detach().clone()
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "cases", name + ".safetensors"))


class _AutogradCircularConvolution:
    """peft 0.21.2's `BlockCircularConvolution.backward` returns a wrong gradient for the input
    (it correlates the output gradient with the kernel the wrong way round; the kernel gradient
    and the forward are right): checked against autograd through peft's own
    `get_circulant_fast`, the input gradients differ by O(1) on random data. So C3A cases run
    the same forward through autograd (`x @ get_circulant_fast(w).T`, equal to peft's FFT forward
    to ~1e-6), and their gradients are the true ones, which peft-rs computes."""

    @staticmethod
    def apply(x, w):
        from peft.tuners.c3a.utils import get_circulant_fast
        return x @ get_circulant_fast(w).T


def main():
    mmf.METHODS.update(METHODS)
    mmf.MERGEABLE.update(METHODS)
    models = {}
    for name, (cls, task) in [*MODELS.items(), *(m for e in EXTRA_MODELS.values() for m in e.items())]:
        models[name] = (cls.from_pretrained(os.path.join(ROOT, "models", name)).eval(), task)
    cases = []
    seed = 300
    import peft.tuners.c3a.layer as c3a_layer
    peft_convolution = c3a_layer.BlockCircularConvolution
    for method in METHODS:
        c3a_layer.BlockCircularConvolution = (
            _AutogradCircularConvolution if method == "c3a" else peft_convolution)
        for model_name in [*MODELS, *EXTRA_MODELS.get(method, {})]:
            cases.append(mmf.make_case(models, model_name, method, seed))
            seed += 1
    c3a_layer.BlockCircularConvolution = peft_convolution
    coft_raw_case(models)
    with open(os.path.join(ROOT, "plugin_method_cases.json"), "w") as f:
        json.dump(cases, f, indent=2)
    print(f"wrote {len(cases)} plugin-method cases under {ROOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
