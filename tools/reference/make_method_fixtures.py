#!/usr/bin/env python3
"""Reference fixtures for prompt tuning, p-tuning, prefix tuning and IA3 (run after make_fixtures.py,
which writes the models). Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_method_fixtures.py

Writes, under peft/tests/fixtures/:
  models/llama_tiny/tokenizer.json (+ tokenizer_config.json): a tiny BPE tokenizer for the tiny models
  adapters/<model>__<method>/        adapters saved by peft
  cases/<model>__<method>.safetensors
      input_ids, attention_mask       the batch (a left-padded and a right-padded row)
      logits_adapted, logits_unmasked, logits_base   adapter loaded from disk (inference mode)
      logits_merged                   IA3 only
      generated                       greedy continuation of PROMPT (12 tokens; see greedy())
      train.logits, train.loss        the freshly created adapter in training mode (dropout off)
      param.<name>                    its trainable tensors under peft's in-memory names
      grad.<name>                     their gradients for train.loss
  method_cases.json                   model, method, parameter line, prompt, generated text
"""
import contextlib
import io
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaForCausalLM, Qwen2ForCausalLM
from peft import IA3Config, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import ATTENTION_MASK, INPUT_IDS, PROMPT, ROOT  # noqa: E402

TOKENIZER_TEXT = """The quick brown fox jumps over the lazy dog. A small adapter learns a new task while the model stays frozen.
Low rank updates are cheap to train and cheap to store. Prompt tuning prepends virtual tokens to the input.
Prefix tuning adds keys and values to every attention layer. The tokenizer splits text into pieces."""
TOKENIZER_DIR_REL = "peft/tests/fixtures/models/llama_tiny"
PROMPT_TEXT = "the model learns"


def make_tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60)
    tok.train_from_iterator([TOKENIZER_TEXT] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    out = os.path.join(ROOT, "models", "llama_tiny")
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
             "unk_token": "<unk>", "model_max_length": 256},
            f,
            indent=2,
        )


CASES = [
    ("llama_tiny", "prompt_random", lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    (
        "llama_tiny",
        "prompt_text",
        lambda: PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
            prompt_tuning_init_text="the model learns a task", tokenizer_name_or_path=TOKENIZER_DIR_REL,
        ),
    ),
    ("llama_tiny", "ptuning_mlp", lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=24)),
    (
        "llama_tiny",
        "ptuning_lstm",
        lambda: PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_reparameterization_type="LSTM",
            encoder_hidden_size=16, encoder_num_layers=2,
        ),
    ),
    ("llama_tiny", "prefix_plain", lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    (
        "qwen2_tiny",
        "prefix_proj",
        lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=20),
    ),
    ("llama_tiny", "ia3_default", lambda: IA3Config(task_type="CAUSAL_LM")),
    (
        "qwen2_tiny",
        "ia3_bias",
        lambda: IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
]

CLASSES = {"llama_tiny": LlamaForCausalLM, "qwen2_tiny": Qwen2ForCausalLM}


def greedy(model, ids, n):
    """Greedy continuation by repeated full forward passes through peft's model.

    peft 0.21.2's `generate` hands the prompt to transformers as `past_key_values`, which
    transformers 5.24 ignores in favour of its new `cache` argument: prefix tuning then generates
    without its prefix and prompt tuning / p-tuning misplace later tokens. The forward pass is
    right (it matches to 1e-4), so the reference continuation is built from it.
    """
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return torch.tensor(out)


def param_line(model):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue().strip()


def short_name(n):
    for prefix in ("prompt_encoder.default.", "base_model.model."):
        if n.startswith(prefix):
            n = n[len(prefix):]
    return n.replace(".default", "")


def make_case(model_name, method, make_config, seed):
    base_dir = os.path.join(ROOT, "models", model_name)
    cls = CLASSES[model_name]
    torch.manual_seed(seed)
    model = get_peft_model(cls.from_pretrained(base_dir).eval(), make_config())
    if method.startswith("ia3"):
        # IA3 vectors start at one; move them away so the test sees their effect.
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "ia3_l" in n:
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    line = param_line(model)
    out = {"input_ids": INPUT_IDS.clone(), "attention_mask": ATTENTION_MASK.clone()}

    # The fresh adapter in training mode (encoders active), dropout off.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    labels = INPUT_IDS.masked_fill(ATTENTION_MASK == 0, -100)
    res = model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, labels=labels)
    res.loss.backward()
    out["train.logits"] = res.logits.detach().float()
    out["train.loss"] = res.loss.detach().reshape(1)
    for n, p in model.named_parameters():
        if p.requires_grad:
            out["param." + short_name(n)] = p.detach().clone()
            out["grad." + short_name(n)] = p.grad.detach().clone()
    model.eval()

    adapter_dir = os.path.join(ROOT, "adapters", f"{model_name}__{method}")
    shutil.rmtree(adapter_dir, ignore_errors=True)
    model.save_pretrained(adapter_dir)

    loaded = PeftModel.from_pretrained(cls.from_pretrained(base_dir).eval(), adapter_dir).eval()
    with torch.no_grad():
        out["logits_adapted"] = loaded(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits.float()
        out["logits_unmasked"] = loaded(input_ids=INPUT_IDS[:1]).logits.float()
        with loaded.disable_adapter():
            out["logits_base"] = loaded(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits.float()
        out["generated"] = greedy(loaded, torch.tensor([PROMPT]), 12)
        if method.startswith("ia3"):
            out["logits_merged"] = loaded.merge_and_unload()(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits.float()

    # Text generation through the tokenizer (llama_tiny only).
    text = None
    if model_name == "llama_tiny":
        tok = AutoTokenizer.from_pretrained(base_dir)
        loaded = PeftModel.from_pretrained(cls.from_pretrained(base_dir).eval(), adapter_dir).eval()
        enc = tok(PROMPT_TEXT, return_tensors="pt")
        text = tok.decode(greedy(loaded, enc["input_ids"], 10), skip_special_tokens=True)

    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "cases", f"{model_name}__{method}.safetensors"))
    return {"model": model_name, "method": method, "parameter_line": line, "prompt": PROMPT,
            "prompt_text": PROMPT_TEXT, "generated_text": text}


def main():
    make_tokenizer()
    cases = [make_case(m, name, cfg, seed=50 + i) for i, (m, name, cfg) in enumerate(CASES)]
    with open(os.path.join(ROOT, "method_cases.json"), "w") as f:
        json.dump(cases, f, indent=2)
    print(f"wrote method fixtures under {ROOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
