#!/usr/bin/env bash
# Writes the same LoraConfig with peft 0.17, 0.18, 0.19 and 0.20 into
# peft/tests/fixtures/configs/lora-peft-<version>.json (the parser must read all of them).
# Each version is unpacked from its wheel into its own folder; 0.17 needs transformers 4.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
for spec in peft==0.17.0 peft==0.18.0 peft==0.19.0 peft==0.20.0 transformers==4.56.2 tokenizers==0.22.1 \
    huggingface-hub==0.35.3; do
    pip download -q --no-deps --only-binary=:all: -d "$work/w" "$spec"
done
for pkg in transformers tokenizers huggingface_hub; do
    mkdir -p "$work/old"; (cd "$work/old" && unzip -q -o "$work"/w/${pkg}-*.whl)
done
for v in 0.17.0 0.18.0 0.19.0 0.20.0; do
    mkdir -p "$work/$v"; (cd "$work/$v" && unzip -q -o "$work/w/peft-$v-py3-none-any.whl")
    extra=""; [ "$v" = 0.17.0 ] && extra=":$work/old"
    PYTHONPATH="$work/$v$extra" python3 - "$v" "$root" <<'PY'
import json, os, sys, tempfile
from peft import LoraConfig
v, root = sys.argv[1], sys.argv[2]
c = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, task_type="CAUSAL_LM")
d = tempfile.mkdtemp()
c.save_pretrained(d)
with open(os.path.join(d, "adapter_config.json")) as f, open(os.path.join(root, "peft/tests/fixtures/configs", f"lora-peft-{v}.json"), "w") as g:
    g.write(f.read())
PY
done
rm -rf "$work"
