#!/usr/bin/env bash
# Side-by-side: the same LoRA training and inference job in this project and in PyTorch +
# transformers + peft, on this machine, one after the other (never concurrently), each side at
# each thread count in THREADS (default "1 2"), the best of each side compared. Prints both
# sides' figures and ends with one line:
#   ratio_tokens_per_s=X ratio_peak_rss=Y ratio_infer_speed=W ratio_unmerged_over_merged=Z
# (this project over PyTorch for training tokens/s, training peak RSS and merged inference speed;
# the last is this project's own unmerged time over merged, the median of alternating pairs'
# ratios, so that the VM's drift between pairs cancels). Run it on a quiet machine: a
# concurrent build halves every figure. STEPS (5) and WARMUP (2) set the training run length.
# ROUNDS (1) repeats the whole alternation (this project, PyTorch, this project, ...) that many
# times; each figure is then the median over rounds at a thread count (peak RSS: the largest),
# which is what to quote on a VM whose speed drifts 10-20% between minutes.
# BF16=1 adds the bf16 comparison (before the ratio line): this project's f32 and bf16-weights
# training over BF16_STEPS (20) steps on the same batches (loss curves compared step for step),
# and PyTorch + peft under bf16 autocast for BF16_TORCH_STEPS (1) step, at the last thread count
# (PyTorch's bf16 matmuls run at ~17 GFLOP/s on a CPU without AVX512-BF16: minutes a step).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
THREADS=${THREADS:-"1 2"}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
python3 -c "import torch, transformers, peft" 2>/dev/null || pip install -q torch transformers peft
cargo build --release -q -p peft-benches --bin side_by_side
rs=target/release/side_by_side
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for round in $(seq "${ROUNDS:-1}"); do
    for t in $THREADS; do
        RAYON_NUM_THREADS=$t $rs train --steps "$STEPS" --warmup "$WARMUP" | tee -a "$results"
        python3 tools/bench/pytorch_side.py train --threads "$t" --steps "$STEPS" --warmup "$WARMUP" | tee -a "$results"
        RAYON_NUM_THREADS=$t $rs infer | tee -a "$results"
        python3 tools/bench/pytorch_side.py infer --threads "$t" | tee -a "$results"
    done
done
if [ "${BF16:-0}" = 1 ]; then
    t=${THREADS##* }
    for flag in "" --bf16-weights; do
        RAYON_NUM_THREADS=$t $rs train --steps "${BF16_STEPS:-20}" --warmup 0 $flag | sed 's/"mode": "train"/"mode": "curve"/' | tee -a "$results"
    done
    python3 tools/bench/pytorch_side.py train --threads "$t" --steps "${BF16_TORCH_STEPS:-1}" --warmup 0 --bf16-autocast \
        | sed 's/"mode": "train"/"mode": "curve"/' | tee -a "$results"
fi
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
def best(side, mode, key, high):
    # Median over rounds at each thread count (peak RSS: the largest), then the best count.
    c = [r for r in rows if r["side"] == side and r["mode"] == mode and r.get("dtype", "f32") == "f32"]
    per_threads = []
    for t in sorted({r["threads"] for r in c}):
        runs = [r for r in c if r["threads"] == t]
        m = dict(runs[0])
        for k, v in runs[0].items():
            if isinstance(v, float) and k != "merge_max_diff":
                m[k] = max(r[k] for r in runs) if k == "peak_rss_mb" else median([r[k] for r in runs])
        m["rounds"] = len(runs)
        per_threads.append(m)
    return (max if high else min)(per_threads, key=lambda r: r[key])
rt, pt = best("peft-rs", "train", "tokens_per_s", True), best("pytorch+peft", "train", "tokens_per_s", True)
ri, pi = best("peft-rs", "infer", "merged_s", False), best("pytorch+peft", "infer", "merged_s", False)
print()
if rt["rounds"] > 1:
    for side, mode, key in [("peft-rs", "train", "median_step_s"), ("pytorch+peft", "train", "median_step_s"),
                            ("peft-rs", "infer", "merged_s"), ("pytorch+peft", "infer", "merged_s"),
                            ("peft-rs", "infer", "unmerged_s")]:
        t = (rt if side == "peft-rs" else pt)["threads"] if mode == "train" else (ri if side == "peft-rs" else pi)["threads"]
        runs = [r[key] for r in rows if r["side"] == side and r["mode"] == mode and r["threads"] == t and r.get("dtype", "f32") == "f32"]
        print(f"{side} {mode} {key} per round ({t} threads): " + " ".join(f"{v:.3f}" for v in runs))
    print(f"(medians over {rt['rounds']} rounds below)")
# Unmerged over merged: the median of alternating pairs' ratios (older result files: of medians).
unmerged_over_merged = ri.get("unmerged_over_merged_paired", ri["unmerged_s"] / ri["merged_s"])
print("| | peft-rs | PyTorch + peft | ratio |")
print("|---|---|---|---|")
print(f"| training step (4 x 256 tokens), median | {rt['median_step_s']:.3f} s ({rt['threads']} threads) | {pt['median_step_s']:.3f} s ({pt['threads']} threads) | {pt['median_step_s'] / rt['median_step_s']:.2f}x faster |")
print(f"| training tokens/s | {rt['tokens_per_s']:.0f} | {pt['tokens_per_s']:.0f} | {rt['tokens_per_s'] / pt['tokens_per_s']:.2f} |")
print(f"| training peak RSS | {rt['peak_rss_mb']:.0f} MB | {pt['peak_rss_mb']:.0f} MB | {rt['peak_rss_mb'] / pt['peak_rss_mb']:.2f} |")
print(f"| inference 1 x 256, merged | {ri['merged_s']:.3f} s ({ri['threads']} threads) | {pi['merged_s']:.3f} s ({pi['threads']} threads) | {pi['merged_s'] / ri['merged_s']:.2f}x faster |")
print(f"| inference 1 x 256, unmerged | {ri['unmerged_s']:.3f} s ({unmerged_over_merged:.3f}x merged, paired) | {pi['unmerged_s']:.3f} s | |")
print(f"| trainable / total parameters | {rt['trainable']:,} / {rt['total']:,} | {pt['trainable']:,} / {pt['total']:,} | |")
curves = {(r["side"], r["dtype"]): r for r in rows if r["mode"] == "curve"}
if curves:
    f, h = curves[("peft-rs", "f32")], curves[("peft-rs", "bf16-weights")]
    ac = curves.get(("pytorch+peft", "bf16-autocast"))
    rel = [abs(a - b) / a for a, b in zip(f["losses"], h["losses"])]
    print()
    print(f"bf16 ({len(rel)} steps from the same seed and batches, {f['threads']} threads; medians over all steps):")
    print("| | step | tokens/s | peak RSS | loss after the last step |")
    print("|---|---|---|---|---|")
    print(f"| peft-rs f32 | {f['median_step_s']:.3f} s | {f['tokens_per_s']:.0f} | {f['peak_rss_mb']:.0f} MB | {f['last_loss']:.4f} |")
    print(f"| peft-rs bf16-weights | {h['median_step_s']:.3f} s | {h['tokens_per_s']:.0f} | {h['peak_rss_mb']:.0f} MB | {h['last_loss']:.4f} |")
    if ac:
        print(f"| PyTorch + peft, bf16 autocast ({len(ac['losses'])} step) | {ac['median_step_s']:.3f} s | {ac['tokens_per_s']:.1f} | {ac['peak_rss_mb']:.0f} MB | {ac['last_loss']:.4f} |")
    line = (f"bf16_max_loss_rel_diff={max(rel):.5f} bf16_weights_speed_over_f32={f['median_step_s'] / h['median_step_s']:.3f} "
            f"bf16_weights_rss_over_f32={h['peak_rss_mb'] / f['peak_rss_mb']:.3f}")
    if ac:
        line += f" bf16_weights_speed_over_torch_autocast={ac['median_step_s'] / h['median_step_s']:.2f}"
    print(line)
print()
print(f"ratio_tokens_per_s={rt['tokens_per_s'] / pt['tokens_per_s']:.3f} ratio_peak_rss={rt['peak_rss_mb'] / pt['peak_rss_mb']:.3f} "
      f"ratio_infer_speed={pi['merged_s'] / ri['merged_s']:.3f} ratio_unmerged_over_merged={unmerged_over_merged:.3f}")
PY
