#!/usr/bin/env bash
# A real fine-tune, measured: SmolLM2-135M-Instruct (GGUF, dequantized to f32) + LoRA on
# Debian's `fortunes` (text nobody here wrote), with a fixed 10% held-out split.
# Reports held-out perplexity of the base and of the adapter, wall time, tokens/s and the
# adapter's size. Outputs in out/fortunes/ (adapter, checkpoints, metrics.jsonl, loss.png,
# report.json). Sequences are packed into SEQ-token blocks for training and evaluation alike.
# Tunables: STEPS (default 80), BATCH (4), SEQ (128), LR (1e-3), QUANT (unset: f32 base;
# nf4 / int8 / ...: the base kept quantized, i.e. QLoRA), TARGETS (unset: the default
# q_proj,v_proj; e.g. all-linear), REUSE_BASE_EVAL=1 (keep an earlier base_eval.json). Outputs in out/fortunes[-$QUANT][-$TARGETS]/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
STEPS=${STEPS:-80}
BATCH=${BATCH:-4}
SEQ=${SEQ:-128}
LR=${LR:-1e-3}
QUANT=${QUANT:-}
TARGETS=${TARGETS:-}
out=out/fortunes${QUANT:+-$QUANT}${TARGETS:+-$TARGETS}
quant_args=()
if [ -n "$QUANT" ]; then quant_args=(--quant "$QUANT"); fi
target_args=()
if [ -n "$TARGETS" ]; then target_args=(--target-modules "$TARGETS"); fi

gguf=$(scripts/fetch-smollm2.sh | tail -n 1)
if [ ! -d /usr/share/games/fortunes ]; then
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q fortunes; else sudo apt-get install -y -q fortunes; fi
fi
python3 scripts/fortunes-data.py data/fortunes
cargo build --release -q -p peft-cli
peft=target/release/peft
mkdir -p "$out"

echo "== base model on the held-out split"
if [ -n "${REUSE_BASE_EVAL:-}" ] && [ -f "$out/base_eval.json" ]; then
    cat "$out/base_eval.json"  # REUSE_BASE_EVAL=1: the base was measured before, same split
else
$peft eval --model "$gguf" "${quant_args[@]}" --data data/fortunes/eval.jsonl --seq-len "$SEQ" --packing --json | tee "$out/base_eval.json"
fi

echo "== LoRA fine-tune ($STEPS steps of $BATCH sequences)"
start=$(date +%s.%N)
$peft train --model "$gguf" "${quant_args[@]}" "${target_args[@]}" --data data/fortunes/train.jsonl --out "$out" \
    --max-steps "$STEPS" --batch-size "$BATCH" --seq-len "$SEQ" --packing --lr "$LR" \
    --warmup-steps 8 --schedule cosine --save-every 40 --log-every 1 --seed 0 --no-progress
end=$(date +%s.%N)

echo "== adapter on the held-out split"
$peft eval --model "$gguf" "${quant_args[@]}" --adapter "$out" --data data/fortunes/eval.jsonl --seq-len "$SEQ" --packing --json | tee "$out/adapter_eval.json"

python3 - "$out" "$start" "$end" <<'PY'
import json, os, sys
out, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
base = json.load(open(os.path.join(out, "base_eval.json")))
adapted = json.load(open(os.path.join(out, "adapter_eval.json")))
steps = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]
last = steps[-1]
report = {
    "base_perplexity": base["perplexity"],
    "adapter_perplexity": adapted["perplexity"],
    "eval_tokens": base["tokens"],
    "train_steps": last["step"],
    "train_tokens": last["tokens"],
    "train_seconds": last["elapsed_s"],
    "train_tokens_per_s": last["tokens_per_s"],
    "wall_seconds_train_command": end - start,
    "adapter_bytes": os.path.getsize(os.path.join(out, "adapter_model.safetensors")),
}
json.dump(report, open(os.path.join(out, "report.json"), "w"), indent=1)
print(json.dumps(report, indent=1))
PY
