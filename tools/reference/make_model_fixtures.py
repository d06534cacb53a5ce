#!/usr/bin/env python3
"""Reference fixtures for GPT-2, T5/mT5 and BERT with every method (LoRA, IA3, prompt tuning,
p-tuning, prefix tuning). Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_model_fixtures.py

Writes, under peft/tests/fixtures/:
  models/<model>/                   tiny random models (larger-than-default weights)
  adapters/<model>__<method>/       adapters saved by peft
  cases/<model>__<method>.safetensors
      input_ids, attention_mask (and decoder_input_ids for seq2seq)
      logits_adapted, logits_base   adapter loaded from disk (inference mode)
      logits_merged                 LoRA and IA3
      generated                     greedy continuation (LM and seq2seq models)
      train.logits, train.loss      the freshly created adapter in training mode (dropout off)
      param.<name>, grad.<name>     its trainable tensors (peft's in-memory names) and gradients
  model_cases.json                  model, method, task, parameter line
  count_cases.json                  parameter lines for configs counted without weights
"""
import contextlib
import io
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import ATTENTION_MASK, INPUT_IDS, ROOT, perturb  # noqa: E402

DECODER_INPUT_IDS = torch.tensor([[0, 5, 9, 31, 2], [0, 44, 3, 3, 7], [0, 12, 13, 14, 15]])


def make_models():
    models = {}
    torch.manual_seed(0)
    models["gpt2_tiny"] = (
        perturb(GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                           bos_token_id=1, eos_token_id=2)), 11),
        "CAUSAL_LM",
    )
    torch.manual_seed(0)
    models["t5_tiny"] = (
        perturb(T5ForConditionalGeneration(T5Config(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
                                                     num_heads=4, vocab_size=128, relative_attention_num_buckets=8,
                                                     relative_attention_max_distance=16, decoder_start_token_id=0,
                                                     eos_token_id=1, pad_token_id=0)), 12),
        "SEQ_2_SEQ_LM",
    )
    torch.manual_seed(0)
    models["mt5_tiny"] = (
        perturb(MT5ForConditionalGeneration(MT5Config(d_model=64, d_kv=16, d_ff=80, num_layers=2, num_decoder_layers=2,
                                                       num_heads=4, vocab_size=128, relative_attention_num_buckets=8,
                                                       relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                                                       tie_word_embeddings=False, decoder_start_token_id=0,
                                                       eos_token_id=1, pad_token_id=0)), 13),
        "SEQ_2_SEQ_LM",
    )
    bert_cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=128,
                    max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
    torch.manual_seed(0)
    models["bert_seqcls"] = (perturb(BertForSequenceClassification(BertConfig(**bert_cfg, num_labels=3)), 14), "SEQ_CLS")
    torch.manual_seed(0)
    models["bert_tokcls"] = (perturb(BertForTokenClassification(BertConfig(**bert_cfg, num_labels=5)), 15), "TOKEN_CLS")
    torch.manual_seed(0)
    models["bert_base"] = (perturb(BertModel(BertConfig(**bert_cfg)), 16), "FEATURE_EXTRACTION")
    for name, (m, _) in models.items():
        m.eval()
        path = os.path.join(ROOT, "models", name)
        shutil.rmtree(path, ignore_errors=True)
        m.save_pretrained(path)
    return models


METHODS = {
    "lora": lambda task, mt: LoraConfig(task_type=task, r=4, lora_alpha=12, init_lora_weights=False,
                                        **({"target_modules": ["c_attn", "c_fc"]} if mt == "gpt2" else {})),
    "ia3": lambda task, mt: IA3Config(task_type=task),
    "prompt": lambda task, mt: PromptTuningConfig(task_type=task, num_virtual_tokens=3),
    "ptuning": lambda task, mt: PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=20),
    "prefix": lambda task, mt: PrefixTuningConfig(task_type=task, num_virtual_tokens=3),
}

# Methods whose adapters merge into the weights (their cases record merged logits); other
# generators add theirs.
MERGEABLE = {"lora", "ia3"}


def param_line(model):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    return buf.getvalue().strip()


def short_name(n):
    n = n.replace(".modules_to_save.default", "")
    for prefix in ("prompt_encoder.default.", "base_model.model.", "base_model."):
        if n.startswith(prefix):
            n = n[len(prefix):]
    return n.replace(".default", "")


def forward(model, task, train=False):
    kwargs = dict(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK)
    if task == "SEQ_2_SEQ_LM":
        kwargs["decoder_input_ids"] = DECODER_INPUT_IDS
    out = model(**kwargs)
    if task == "FEATURE_EXTRACTION":
        return out.last_hidden_state
    return out.logits


def loss_of(model, task, logits):
    """A loss every task shares: the causal-LM / seq2seq loss, or cross-entropy on fixed labels."""
    if task == "CAUSAL_LM":
        labels = INPUT_IDS.masked_fill(ATTENTION_MASK == 0, -100)
        return model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, labels=labels).loss
    if task == "SEQ_2_SEQ_LM":
        return model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, decoder_input_ids=DECODER_INPUT_IDS,
                     labels=DECODER_INPUT_IDS).loss
    if task == "SEQ_CLS":
        return torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2, 1]))
    if task == "TOKEN_CLS":
        n = logits.shape[-1]
        labels = (torch.arange(logits.shape[0] * logits.shape[1]) % n).reshape(logits.shape[:2])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, n), labels.reshape(-1))
    return (logits ** 2).mean()


def greedy(model, task, n):
    out = []
    with torch.no_grad():
        if task == "CAUSAL_LM":
            ids = INPUT_IDS[:1, :5]
            for _ in range(n):
                nxt = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        else:
            dec = torch.tensor([[0]])
            for _ in range(n):
                logits = model(input_ids=INPUT_IDS[:1], attention_mask=ATTENTION_MASK[:1], decoder_input_ids=dec).logits
                nxt = int(logits[0, -1].argmax())
                out.append(nxt)
                dec = torch.cat([dec, torch.tensor([[nxt]])], 1)
    return torch.tensor(out)


def make_case(models, model_name, method, seed):
    base_model, task = models[model_name]
    cls = type(base_model)
    base_dir = os.path.join(ROOT, "models", model_name)
    mt = base_model.config.model_type
    torch.manual_seed(seed)
    model = get_peft_model(cls.from_pretrained(base_dir).eval(), METHODS[method](task, mt))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            if "modules_to_save" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            # MiSS's "bat" and "mini" shards start at zero whatever init_weights says.
            if "miss_block" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    line = param_line(model)
    out = {"input_ids": INPUT_IDS.clone(), "attention_mask": ATTENTION_MASK.clone()}
    if task == "SEQ_2_SEQ_LM":
        out["decoder_input_ids"] = DECODER_INPUT_IDS.clone()

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # Attention dropout kept as a float (T5Attention.dropout, ...) is off too.
        for attr in ("dropout", "dropout_prob", "attention_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    model.train()
    logits = forward(model, task)
    loss = loss_of(model, task, logits)
    loss.backward()
    out["train.logits"] = logits.detach().float()
    out["train.loss"] = loss.detach().reshape(1)
    for n, p in model.named_parameters():
        if p.requires_grad:
            out["param." + short_name(n)] = p.detach().clone()
            out["grad." + short_name(n)] = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
    model.eval()

    adapter_dir = os.path.join(ROOT, "adapters", f"{model_name}__{method}")
    shutil.rmtree(adapter_dir, ignore_errors=True)
    model.save_pretrained(adapter_dir)
    loaded = PeftModel.from_pretrained(cls.from_pretrained(base_dir).eval(), adapter_dir).eval()
    with torch.no_grad():
        out["logits_adapted"] = forward(loaded, task).float()
        # The adapter disabled is the bare base model (peft's disable_adapter() context fails for
        # prompt learning on models without prepare_inputs_for_generation, e.g. BERT heads).
        out["logits_base"] = forward(cls.from_pretrained(base_dir).eval(), task).float()
        if task in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
            out["generated"] = greedy(loaded, task, 8)
        if method in MERGEABLE:
            out["logits_merged"] = forward(loaded.merge_and_unload(), task).float()
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "cases", f"{model_name}__{method}.safetensors"))
    return {"model": model_name, "method": method, "task_type": task, "parameter_line": line}


def count_cases():
    """peft's line for mt0-large (the seed's number) and a tied T5, from configs only (meta tensors).

    transformers 5.24 forces `tie_word_embeddings=True` for T5 and mT5 configs (its config
    classes overwrite the saved value), but mt0-large's checkpoint has a separate `lm_head`
    (config.json says `"tie_word_embeddings": false`), so the head is untied here by hand to
    count the model as it is stored.
    """
    out = []
    mt0 = json.load(open(os.path.join(ROOT, "model_configs", "mt0-large.json")))
    t5 = T5Config(d_model=256, d_kv=32, d_ff=512, num_layers=3, num_heads=8, vocab_size=1000).to_dict()
    for model_cfg, lcfg in [
        (mt0, dict(task_type="SEQ_2_SEQ_LM", r=8, lora_alpha=32, lora_dropout=0.1)),
        (t5, dict(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=["q", "k", "v", "o", "wi", "wo"])),
    ]:
        cfg_cls, model_cls = (MT5Config, MT5ForConditionalGeneration) if model_cfg["model_type"] == "mt5" else (T5Config, T5ForConditionalGeneration)
        cfg = cfg_cls.from_dict(model_cfg)
        with torch.device("meta"):
            model = model_cls(cfg)
            if model_cfg.get("tie_word_embeddings") is False:
                model.lm_head.weight = torch.nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        peft_model = get_peft_model(model, LoraConfig(**lcfg))
        out.append({"model_config": model_cfg, "adapter_config": {**lcfg, "peft_type": "LORA"},
                    "parameter_line": param_line(peft_model)})
    return out


def main():
    models = make_models()
    cases = []
    seed = 200
    for model_name in models:
        for method in METHODS:
            seed += 1
            try:
                cases.append(make_case(models, model_name, method, seed))
            except ValueError as e:
                # Combinations the reference itself cannot run are recorded, not faked; e.g. prefix
                # tuning on BERT: transformers 5's BertModel takes no past_key_values.
                print(f"reference cannot run {model_name} + {method}: {e}", file=sys.stderr)
                cases.append({"model": model_name, "method": method, "task_type": models[model_name][1],
                              "skipped": f"the reference cannot run this combination: {e}"})
    with open(os.path.join(ROOT, "model_cases.json"), "w") as f:
        json.dump(cases, f, indent=2)
    with open(os.path.join(ROOT, "count_cases.json"), "w") as f:
        json.dump(count_cases(), f, indent=2)
    print(f"wrote model fixtures under {ROOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
