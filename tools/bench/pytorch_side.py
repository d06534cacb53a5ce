#!/usr/bin/env python3
"""PyTorch + transformers + peft half of scripts/bench-vs-pytorch.sh: the same job as
benches/src/bin/side_by_side.rs, printed as one JSON line.

    python tools/bench/pytorch_side.py train|infer --threads N [--steps 5 --warmup 2 | --runs 7]

The job: LlamaForCausalLM (hidden 768, 12 layers, 12 heads, ffn 2048, vocab 32000, tied
embeddings, random weights, seed 0), LoRA r=16 alpha 32 on q,k,v,o (init_lora_weights=False),
batch 4 x 256 tokens, AdamW (lr 1e-4), f32 (or, with --bf16-autocast, under bf16 autocast), eager
attention. train: median step time after
warm-up, tokens/s, peak RSS of the process; infer: median 1 x 256 forward, adapter unmerged and
merged (torch.no_grad, eval mode).
"""
import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def model(dora=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=32000, max_position_embeddings=512,
                      tie_word_embeddings=True, attn_implementation="eager")
    base = LlamaForCausalLM(cfg)
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM",
                      use_dora=dora)
    return get_peft_model(base, lcfg)


def ids(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32000, (batch, length), generator=g)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


def train(steps, warmup, bf16=False, dora=False):
    m = model(dora)
    m.train()
    trainable, total = m.get_nb_trainable_parameters()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    times, losses = [], []
    for step in range(warmup + steps):
        x = ids(4, 256, step)
        start = time.perf_counter()
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        secs = time.perf_counter() - start
        losses.append(out.loss.item())
        if step >= warmup:
            times.append(secs)
    s = median(times)
    return {"side": "pytorch+peft", "mode": "train", "dora": dora, "dtype": "bf16-autocast" if bf16 else "f32",
            "threads": torch.get_num_threads(), "median_step_s": round(s, 4),
            "tokens_per_s": round(4 * 256 / s, 1), "peak_rss_mb": round(peak_rss_mb()), "trainable": trainable,
            "total": total, "first_loss": losses[0], "last_loss": losses[-1], "losses": [round(v, 5) for v in losses]}


def infer(runs):
    m = model()
    m.eval()
    x = ids(1, 256, 7)

    def timed():
        with torch.no_grad():
            m(input_ids=x)
            t = []
            for _ in range(runs):
                start = time.perf_counter()
                m(input_ids=x)
                t.append(time.perf_counter() - start)
        return median(t)

    unmerged = timed()
    m.merge_adapter()
    merged = timed()
    return {"side": "pytorch+peft", "mode": "infer", "threads": torch.get_num_threads(), "unmerged_s": round(unmerged, 4),
            "merged_s": round(merged, 4), "peak_rss_mb": round(peak_rss_mb())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "infer"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--bf16-autocast", action="store_true",
                    help="train under torch.autocast(cpu, bfloat16): bf16 matmuls, f32 weights")
    ap.add_argument("--dora", action="store_true", help="the same adapter as DoRA (use_dora=True)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(train(a.steps, a.warmup, a.bf16_autocast, a.dora) if a.mode == "train" else infer(a.runs)))


if __name__ == "__main__":
    main()
