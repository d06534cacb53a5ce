#!/usr/bin/env python3
"""One-training-step reference fixtures: the loss and the gradient of every trainable tensor of a
fresh LoRA adapter on the existing tiny T5 (seq2seq) and BERT (sequence classification) model
fixtures (make_model_fixtures.py wrote those; they are read here, not regenerated).
Produced with torch 2.15, transformers 5.24, peft 0.21.2.

Run from the repository root:  python tools/reference/make_training_fixtures.py

Writes, under peft/tests/fixtures/training/:
  t5_seq2seq_lora/            LoRA on models/t5_tiny (SEQ_2_SEQ_LM): r=4, lora_alpha=12, dropout 0,
                              init_lora_weights=False (torch seed 1), targets q, v, wi, every lora_B
                              then scaled by 0.1 (see make_quant_arch_fixtures.py: deltas the size
                              trained adapters have, so that f32 logits stay well-conditioned);
                              base_model_name_or_path "t5_tiny"
  t5_seq2seq_lora.safetensors
      input_ids, attention_mask [2, 6]   row 1 right-padded by 2 (pad id 0)
      labels [2, 4]                      -100 at row 1's last position
      decoder_input_ids [2, 4]           the model's _shift_right(labels): start token 0 prepended,
                                         -100 replaced by pad 0
      logits [2, 4, 128]                 the adapted model in eval mode (no dropout)
      loss [1]                           transformers' loss from labels= (mean CE over the 7
                                         non-ignored positions)
      grad.<name>                        after loss.backward(), every LoRA tensor; <name> is peft's
                                         parameter name without "base_model.model." and ".default",
                                         i.e. the saved adapter key without "base_model.model."
                                         (grad.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight)
  bert_seqcls_lora/           LoRA on models/bert_seqcls (SEQ_CLS, 3 labels): r=4, lora_alpha=12,
                              dropout 0, init_lora_weights=False (torch seed 1), targets query, value,
                              lora_B scaled by 0.1; peft adds modules_to_save ["classifier", "score"]:
                              the classifier copy is perturbed (generator seed 9, 0.5 * randn) so it
                              differs from the base classifier; base_model_name_or_path "bert_seqcls"
  bert_seqcls_lora.safetensors
      input_ids, attention_mask [2, 6]   row 1 right-padded by 2 (pad id 0); token_type_ids all 0
      labels [2]                         int64
      logits [2, 3], loss [1]            eval mode; transformers' single-label cross-entropy
      grad.<name>                        the LoRA tensors and the classifier copy, named as the saved
                                         adapter keys without "base_model.model."
                                         (grad.classifier.weight, grad.classifier.bias)
  The script prints the saved adapter keys and the f64 conditioning check: the same base model and
  saved adapter in float64, max |f32 - f64| of the logits, the loss and the gradients.
"""
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BertForSequenceClassification, T5ForConditionalGeneration
from peft import LoraConfig, PeftModel, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import ROOT  # noqa: E402

OUT = os.path.join(ROOT, "training")

T5_INPUT_IDS = torch.tensor([[13, 27, 5, 88, 41, 1], [9, 64, 120, 1, 0, 0]])
T5_LABELS = torch.tensor([[5, 31, 77, 1], [44, 3, 1, -100]])
BERT_INPUT_IDS = torch.tensor([[2, 17, 45, 99, 8, 3], [2, 60, 11, 3, 0, 0]])
BERT_LABELS = torch.tensor([2, 1])
ATTENTION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def grad_key(name):
    """peft's in-memory parameter name -> the saved adapter key without "base_model.model."."""
    name = name.replace("base_model.model.", "", 1)
    return name.replace(".modules_to_save.default", "").replace(".default", "")


def save_adapter(pm, adapter_dir, model_name):
    shutil.rmtree(adapter_dir, ignore_errors=True)
    pm.save_pretrained(adapter_dir)
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(cfg_path) as f:
        saved = json.load(f)
    saved["base_model_name_or_path"] = model_name
    saved["target_modules"] = sorted(saved["target_modules"])  # a set: hash-seed order
    with open(cfg_path, "w") as f:
        f.write(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as st:
        keys = sorted(st.keys())
    print(f"  saved adapter keys ({len(keys)}):")
    for k in keys:
        print("    " + k)
    return keys


def training_case(name, cls, model_name, lcfg, inputs, labels, perturb_classifier=False):
    print(f"== {name}")
    model_dir = os.path.join(ROOT, "models", model_name)
    base = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(1)
    pm = get_peft_model(base, lcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
        if perturb_classifier:
            g = torch.Generator().manual_seed(9)
            for p in pm.base_model.model.classifier.modules_to_save["default"].parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    pm.eval()
    adapter_dir = os.path.join(OUT, name)
    saved_keys = save_adapter(pm, adapter_dir, model_name)

    tensors = {k: v.clone() for k, v in inputs.items()}
    tensors["labels"] = labels.clone()
    out = pm(**inputs, labels=labels)
    out.loss.backward()
    tensors["logits"] = out.logits.detach().clone()
    tensors["loss"] = out.loss.detach().reshape(1).clone()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            tensors["grad." + grad_key(n)] = p.grad.detach().clone()
    grads = sorted(k[len("grad."):] for k in tensors if k.startswith("grad."))
    assert grads == sorted(k.replace("base_model.model.", "", 1) for k in saved_keys), (grads, saved_keys)

    # Conditioning: the same base model and saved adapter in float64 (and the f32 reload).
    f64 = PeftModel.from_pretrained(cls.from_pretrained(model_dir, dtype=torch.float64), adapter_dir,
                                    is_trainable=True).double().eval()
    out64 = f64(**inputs, labels=labels)
    out64.loss.backward()
    grad64 = {"grad." + grad_key(n): p.grad for n, p in f64.named_parameters() if p.requires_grad}
    assert sorted(grad64) == sorted(k for k in tensors if k.startswith("grad."))
    dlog = (tensors["logits"].double() - out64.logits.detach()).abs().max().item()
    dloss = abs(tensors["loss"].item() - out64.loss.item())
    dgrad = max((tensors[k].double() - g).abs().max().item() for k, g in grad64.items())
    gmax = max(tensors[k].abs().max().item() for k in grad64)
    with torch.no_grad():
        reload = PeftModel.from_pretrained(cls.from_pretrained(model_dir, dtype=torch.float32), adapter_dir).eval()
        dreload = (reload(**inputs).logits - tensors["logits"]).abs().max().item()
    print(f"  f64 conditioning: max |f32 logits - f64 logits| = {dlog:.3e} (logits max |.| "
          f"{tensors['logits'].abs().max().item():.3e}); |loss diff| = {dloss:.3e} (loss {tensors['loss'].item():.6f});"
          f" max |grad diff| = {dgrad:.3e} (grads max |.| {gmax:.3e})")
    print(f"  reloaded f32 adapter: max |logits diff| = {dreload:.3e}")

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, f"{name}.safetensors"))
    print("  tensors:", sorted(tensors))
    return pm, tensors


def main():
    os.makedirs(OUT, exist_ok=True)

    # (a) seq2seq LoRA on T5.
    decoder_input_ids = T5ForConditionalGeneration.from_pretrained(os.path.join(ROOT, "models", "t5_tiny"))._shift_right(T5_LABELS)
    assert decoder_input_ids.tolist() == [[0, 5, 31, 77], [0, 44, 3, 1]], decoder_input_ids
    t5_inputs = {"input_ids": T5_INPUT_IDS, "attention_mask": ATTENTION_MASK, "decoder_input_ids": decoder_input_ids}
    pm, t = training_case(
        "t5_seq2seq_lora", T5ForConditionalGeneration, "t5_tiny",
        LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, init_lora_weights=False, target_modules=["q", "v", "wi"],
                   task_type="SEQ_2_SEQ_LM"),
        t5_inputs, T5_LABELS)
    # labels= alone (transformers shifts them itself) gives the same logits.
    with torch.no_grad():
        alone = pm(input_ids=T5_INPUT_IDS, attention_mask=ATTENTION_MASK, labels=T5_LABELS)
    assert torch.equal(alone.logits, t["logits"]) and torch.equal(alone.loss.reshape(1), t["loss"])

    # (b) SEQ_CLS LoRA on BERT (the classifier is in modules_to_save).
    num_labels = json.load(open(os.path.join(ROOT, "models", "bert_seqcls", "config.json")))["id2label"]
    print(f"bert_seqcls num_labels = {len(num_labels)}")
    _, t = training_case(
        "bert_seqcls_lora", BertForSequenceClassification, "bert_seqcls",
        LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, init_lora_weights=False, target_modules=["query", "value"],
                   task_type="SEQ_CLS"),
        {"input_ids": BERT_INPUT_IDS, "attention_mask": ATTENTION_MASK}, BERT_LABELS, perturb_classifier=True)
    assert t["logits"].shape == (2, len(num_labels))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
