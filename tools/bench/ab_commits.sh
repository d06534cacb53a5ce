#!/usr/bin/env bash
# Before/after on the CPU, same run: builds `side_by_side` and `peft` at two commits and runs
# them alternately (ROUNDS rounds): the side-by-side LoRA training step (f32, 4 x 256 tokens,
# LLaMA-shaped 12 x 768) and a SmolLM2-135M QLoRA run (NF4 base, the quantized tiles).
#
#   tools/bench/ab_commits.sh OLD_COMMIT [NEW_COMMIT=HEAD]     (ROUNDS=3, QSTEPS=6)
#
# Run it on a quiet machine: nothing else building or benchmarking.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
OLD=$1
NEW=${2:-HEAD}
ROUNDS=${ROUNDS:-3}
QSTEPS=${QSTEPS:-6}
W=${AB_DIR:-/tmp/peft-ab}
mkdir -p "$W"
build() { # commit tag
    rm -rf "$W/src-$2"
    git worktree add -f --detach "$W/src-$2" "$1" >/dev/null 2>&1
    # Shares this checkout's target folder: the dependencies are built once.
    # Two builds: `--bin` would filter peft-cli's binary out of a single one.
    (cd "$W/src-$2" && CARGO_TARGET_DIR=$ROOT/target cargo build --release -q -p peft-benches --bin side_by_side \
        && CARGO_TARGET_DIR=$ROOT/target cargo build --release -q -p peft-cli)
    cp "$ROOT/target/release/side_by_side" "$W/side_by_side-$2"
    cp "$ROOT/target/release/peft" "$W/peft-$2"
    git worktree remove --force "$W/src-$2"
}
build "$OLD" old
build "$NEW" new
gguf=$(scripts/fetch-smollm2.sh | tail -n 1)
python3 - "$W/data.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(64):
        f.write(json.dumps({"text": f"Line {i}: the quick brown fox jumps over the lazy dog, again and again, {i * 7} times."}) + "\n")
PY
echo "round tag side_by_side(tokens/s) qlora_nf4(tokens/s)"
for r in $(seq "$ROUNDS"); do
    for tag in old new; do
        sbs=$("$W/side_by_side-$tag" train | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["tokens_per_s"], 1))')
        rm -rf "$W/out-$tag"
        "$W/peft-$tag" train --model "$gguf" --quant nf4 --data "$W/data.jsonl" --max-steps "$QSTEPS" \
            --batch-size 4 --seq-len 64 --seed 0 --log-every 1 --no-progress --out "$W/out-$tag" >"$W/q-$tag.log" 2>&1
        q=$(python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "tokens_per_s" in l]
print(round(sum(r["tokens_per_s"] for r in rows[1:]) / max(1, len(rows) - 1), 1))' "$W/out-$tag/metrics.jsonl")
        echo "$r $tag $sbs $q"
    done
done
