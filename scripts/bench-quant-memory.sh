#!/usr/bin/env bash
# Peak memory and speed of LoRA training on SmolLM2-135M with the frozen base in f32, kept in
# its GGUF Q4_1 blocks, and in NF4 (QLoRA, from a `peft quantize`d folder so no f32 copy is ever
# loaded). Two optimizer steps of 4 x 128 packed tokens each; prints one line per base.
# Run on a quiet machine. Needs scripts/fetch-smollm2.sh and data/fortunes (finetune-fortunes.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
gguf=$(scripts/fetch-smollm2.sh | tail -n 1)
[ -f data/fortunes/train.jsonl ] || python3 scripts/fortunes-data.py data/fortunes
cargo build --release -q -p peft-cli
peft=target/release/peft
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
/usr/bin/time -f "quantize to nf4: %e s, peak RSS %M KB" $peft quantize --model "$gguf" --to nf4 --out "$tmp/nf4" > /dev/null
for base in f32 gguf nf4; do
    case $base in
        f32) args=(--model "$gguf") ;;
        gguf) args=(--model "$gguf" --quant gguf) ;;
        nf4) args=(--model "$tmp/nf4") ;;
    esac
    out=$($peft train "${args[@]}" --data data/fortunes/train.jsonl --out "$tmp/run-$base" \
        --max-steps 2 --batch-size 4 --seq-len 128 --packing --no-progress --seed 0 2>/dev/null)
    echo "$base base: $(echo "$out" | grep -o 'in [0-9.]* s ([0-9]* tokens/s)') $(echo "$out" | grep 'peak resident')"
done
