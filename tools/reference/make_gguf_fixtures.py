#!/usr/bin/env python3
"""Reference fixtures for the real GGUF base (SmolLM2-135M-Instruct, Q4_1) loaded by
transformers (`gguf_file=`, dequantized to f32) with a LoRA adapter made by Python peft.
Produced with torch 2.15, transformers 5.24, peft 0.21.2, gguf 0.17.

Run from the repository root, after scripts/fetch-smollm2.sh:
    python tools/reference/make_gguf_fixtures.py

Writes, under peft/tests/fixtures/gguf/ (no model weights: the tests read the GGUF the fetch
script downloads):
  tokenizer_cases.json     [{text, ids}] for a few hundred strings: fortune lines (Debian's
                           `fortunes` package when installed, else none), chat markup, digits,
                           whitespace runs, non-ASCII text; ids from transformers' GGUF tokenizer
                           (no special tokens added, as `tokenizer(text, add_special_tokens=False)`)
  chat_template.json       messages and the rendered chat template (add_generation_prompt=True)
  lora_adapter/            adapter_config.json + adapter_model.safetensors (r=2, alpha=7,
                           q/k/v, non-zero B)
  logits.safetensors       input_ids, attention_mask (left padding in row 1),
                           base.head / adapted.head: logits[..., :1024] at every position,
                           base.last / adapted.last: full logits at the last position,
                           base.argmax / adapted.argmax: argmax at every position
  generate.json            prompt ids and the greedy continuation (24 tokens) of base and adapted
"""
import glob
import json
import os
import random
import shutil

import torch
from peft import LoraConfig, get_peft_model, PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(ROOT, "models", "smollm2")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = os.path.join(ROOT, "peft", "tests", "fixtures", "gguf")


def tokenizer_strings():
    texts = []
    files = sorted(glob.glob("/usr/share/games/fortunes/*.u8"))
    rng = random.Random(7)
    lines = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for para in fh.read().split("\n%\n"):
                if para.strip():
                    lines.append(para)
    rng.shuffle(lines)
    texts.extend(lines[:260])
    texts += [
        "Hello world, it's 2026!  Ünïcode  tabs\tand\nnewlines",
        "<|im_start|>user\nWhat is 12345 * 678?<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|>",
        "   leading spaces and trailing   ",
        "\n\n\ndouble\n\nnewlines\r\n",
        "numbers: 3.14159 1,000,000 0x1F 1e-9",
        "I'm sure they'll say we've done it, don't you think?  DON'T",
        "日本語のテキストと中文字符",
        "emoji 🙂🚀 and combining é vs é",
        "code: fn main() { println!(\"{}\", x[0] >> 2); }",
        "URL https://example.org/a?b=c&d=e#f",
        "",
        " ",
        "a",
        "Straße naïve café résumé",
        "<file_sep><filename>README.md",
    ]
    return texts


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF)
    cases = [{"text": t, "ids": tok(t, add_special_tokens=False).input_ids} for t in tokenizer_strings()]
    with open(os.path.join(OUT, "tokenizer_cases.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False, indent=0)

    messages = [
        {"role": "user", "content": "Tell me a fortune."},
        {"role": "assistant", "content": "You will write Rust today."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    chat = {
        "messages": messages,
        "rendered": tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        "rendered_no_generation_prompt": tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False),
    }
    with open(os.path.join(OUT, "chat_template.json"), "w") as f:
        json.dump(chat, f, ensure_ascii=False, indent=1)

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=GGUF, dtype=torch.float32)
    model.eval()

    prompts = ["The quick brown fox jumps over the lazy dog because", "A fortune:"]
    enc = [tok(p).input_ids for p in prompts]
    width = max(len(e) for e in enc)
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])

    def run(m):
        with torch.no_grad():
            return m(input_ids=input_ids, attention_mask=mask).logits

    base = run(model)
    prompt = tok("Once upon a time, in a small village,").input_ids
    gen_base = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=pad)[0, len(prompt):].tolist()

    cfg = LoraConfig(r=2, lora_alpha=7, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapter_dir = os.path.join(OUT, "lora_adapter")
    shutil.rmtree(adapter_dir, ignore_errors=True)
    peft_model.save_pretrained(adapter_dir)
    # Record the base as the GGUF path relative to the repository, not this machine's folder.
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(cfg_path) as f:
        saved = json.load(f)
    saved["base_model_name_or_path"] = "models/smollm2/" + GGUF
    with open(cfg_path, "w") as f:
        f.write(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    del peft_model

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=GGUF, dtype=torch.float32)
    adapted_model = PeftModel.from_pretrained(model, adapter_dir)
    adapted_model.eval()
    adapted = run(adapted_model)
    gen_adapted = adapted_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=pad)[0, len(prompt):].tolist()

    tensors = {"input_ids": input_ids.to(torch.int64), "attention_mask": mask.to(torch.int64)}
    for name, logits in [("base", base), ("adapted", adapted)]:
        tensors[f"{name}.head"] = logits[..., :1024].contiguous()
        tensors[f"{name}.last"] = logits[:, -1, :].contiguous()
        tensors[f"{name}.argmax"] = logits.argmax(-1).to(torch.int64)
    save_file(tensors, os.path.join(OUT, "logits.safetensors"))
    with open(os.path.join(OUT, "generate.json"), "w") as f:
        json.dump({"prompt": prompt, "base": gen_base, "adapted": gen_adapted,
                   "base_text": tok.decode(gen_base), "adapted_text": tok.decode(gen_adapted)}, f, indent=1)
    print("wrote", OUT, "base:", tok.decode(gen_base), "| adapted:", tok.decode(gen_adapted))


if __name__ == "__main__":
    main()
