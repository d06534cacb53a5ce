#!/usr/bin/env python3
"""Turns Debian's `fortunes` package (plain-text fortune files under /usr/share/games/fortunes)
into JSONL for `peft train`: one {"text": ...} record per fortune, deduplicated, those longer
than MAX_CHARS characters dropped, shuffled with a fixed seed and split 90/10 into
train.jsonl / eval.jsonl in the output folder (default data/fortunes).

Usage: scripts/fortunes-data.py [OUT_DIR]
"""
import glob
import json
import os
import random
import sys

MAX_CHARS = 400
SRC = "/usr/share/games/fortunes"


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "data/fortunes"
    files = sorted(f for f in glob.glob(os.path.join(SRC, "*")) if os.path.isfile(f) and "." not in os.path.basename(f))
    if not files:
        sys.exit(f"no fortune files in {SRC}: install the Debian package `fortunes`")
    seen, texts = set(), []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for para in f.read().split("\n%\n"):
                text = para.strip("\n").rstrip()
                if text.strip() and len(text) <= MAX_CHARS and text not in seen:
                    seen.add(text)
                    texts.append(text)
    random.Random(0).shuffle(texts)
    n_eval = len(texts) // 10
    os.makedirs(out, exist_ok=True)
    for name, part in [("eval.jsonl", texts[:n_eval]), ("train.jsonl", texts[n_eval:])]:
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            for t in part:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    print(f"{len(texts) - n_eval} train / {n_eval} eval fortunes from {len(files)} files into {out}")


if __name__ == "__main__":
    main()
