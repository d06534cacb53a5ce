#!/usr/bin/env python3
"""Reference fixtures for peft-quant on GPT-2, T5 and BERT: tiny random models loaded by
transformers with BitsAndBytesConfig (NF4 with double quantization, and int8; bitsandbytes'
CPU backend) and QLoRA on them. The LLaMA counterpart is make_quant_fixtures.py.
Produced with torch 2.15, transformers 5.24, peft 0.21.2, bitsandbytes 0.50.2.

Run from the repository root:
    pip install torch transformers peft bitsandbytes safetensors numpy
    python tools/reference/make_quant_arch_fixtures.py

Writes, under peft-quant/tests/fixtures/, for <arch> in gpt2, t5, bert:
  tiny_<arch>/           config.json + model.safetensors (f32, random, torch seed 0, every
                         LayerNorm / T5LayerNorm weight spread 0.5..3 so int8 outliers occur)
      gpt2  GPT2LMHeadModel  n_embd 128, n_layer 2, n_head 4, n_positions 64, vocab 200, tied
      t5    T5ForConditionalGeneration  d_model 128, d_kv 32, 4 heads, d_ff 256, 2+2 layers,
            vocab 200, 8 relative buckets, relu, tied (scale_decoder_outputs), pad/start 0
      bert  BertForSequenceClassification  hidden 128, 2 layers, 4 heads, intermediate 256,
            vocab 200, 64 positions, 3 labels
  tiny_<arch>_nf4/       transformers save_pretrained of the same model loaded in NF4 with
                         double quantization (compute dtype float32)
  tiny_<arch>_int8/      the same loaded with load_in_8bit=True
  qlora_<arch>_adapter/  LoRA r=4 alpha 12, dropout 0, non-zero B (init_lora_weights=False, B then
                         scaled by 0.1: see arch_fixtures) on
                         every linear that bitsandbytes quantized; base_model_name_or_path
                         "tiny_<arch>". bert: SEQ_CLS, so peft also saves the classifier
                         (modules_to_save); its copy is perturbed (seed 9) before saving so
                         that it differs from the base classifier and the fixture tests it
  qlora_<arch>.safetensors
      input_ids, attention_mask [2, 7] (row 0 left-padded by 2, pad id 0)
      gpt2: labels = input_ids with -100 at padding; t5: decoder_input_ids, labels [2, 5];
      bert: labels [2] (int64)
      f32.logits                 the f32 model (eval)
      nf4.base, int8.base        logits of the quantized models without adapter (eval)
      nf4.adapted                get_peft_model on the NF4 model (eval mode, so dropout off)
      nf4.loss [1], nf4.grad.<name>  loss with labels and gradients of two LoRA tensors (names
                                 without "base_model.model." and ".default")
      int8.adapted               PeftModel.from_pretrained(int8 model, qlora_<arch>_adapter)
  All NF4 logits come from bitsandbytes' f32 path (dequantize_4bit, then an f32 linear; see
  no_bf16_fast_path), as on a CPU without AVX512-BF16 and as in the LLaMA fixtures.
  gpt2 / t5 use the logits of the LM head ([2, 7, 200] / [2, 5, 200]); bert [2, 3].
  gpt2 position ids are arange(7) in both rows: transformers does not derive them from the
  attention mask, the padding only masks keys. bert: token_type_ids all zero, positions arange.

What transformers 5.24 saves (`describe` prints it when the script runs):
  bitsandbytes replaces nn.Linear and transformers' Conv1D, except llm_int8_skip_modules when
  given, else get_keys_to_not_convert (tied weights, the output embedding, the last
  parameter's name with ".weight" stripped) plus the model's _keep_in_fp32_modules.
      gpt2  quantized (8): transformer.h.*.attn.{c_attn,c_proj}, transformer.h.*.mlp.{c_fc,c_proj}
            dense: lm_head (tied to transformer.wte; not saved), wte, wpe, ln_1/ln_2/ln_f
      t5    quantized (28): {encoder,decoder}.block.*.layer.0.SelfAttention.{q,k,v,o},
            decoder.block.*.layer.1.EncDecAttention.{q,k,v,o}, every DenseReluDense.wi
            dense: every DenseReluDense.wo (T5's _keep_in_fp32_modules = ["wo"]), lm_head (the
            tied output embedding), shared, relative_attention_bias [8, 4], layer norms
      bert  quantized (13): bert.encoder.layer.*.attention.self.{query,key,value},
            *.attention.output.dense, *.intermediate.dense, *.output.dense, bert.pooler.dense
            dense: classifier (llm_int8_skip_modules=["classifier"], see arch_specs: by default
            transformers quantizes it, "classifier.bias" naming no module, and peft's SEQ_CLS
            modules_to_save copy of a Linear4bit then fails), the embeddings, LayerNorms
  GPT-2's Conv1D weights ([in, out] in the f32 checkpoint, e.g. c_attn [128, 384], mlp.c_proj
  [512, 128]) are transposed before quantizing: the NF4 quant_state "shape" and the int8
  weight are [out, in] like nn.Linear (c_attn: shape [384, 128], int8 [384, 128]; mlp.c_proj:
  [128, 512]).
  A 4-bit module <m> (here c_attn, out*in = 49152) is saved as
      <m>.weight                                   U8 [24576, 1]  (out*in/2, two codes a byte)
      <m>.weight.absmax                            U8 [768]       (out*in/64, double-quant codes)
      <m>.weight.nested_absmax                     F32 [3]        (ceil(768/256))
      <m>.weight.nested_quant_map                  F32 [256]      (the dynamic map)
      <m>.weight.quant_map                         F32 [16]       (the NF4 code)
      <m>.weight.quant_state.bitsandbytes__nf4     U8 [169]       JSON {"quant_type": "nf4",
          "blocksize": 64, "dtype": "float32", "shape": [384, 128], "nested_blocksize": 256,
          "nested_dtype": "float32", "nested_offset": <f32>}   (its length varies: 168..170)
      <m>.bias                                     F32 [384]      (T5 has no biases)
  an int8 module as <m>.weight I8 [out, in], <m>.SCB F32 [out], <m>.weight_format U8 [] (0,
  "row"), <m>.bias F32 [out]. Every other tensor is F32.
  config.json quantization_config, nf4:
      {"_load_in_4bit": true, "_load_in_8bit": false, "bnb_4bit_compute_dtype": "float32",
       "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_use_double_quant": true, "llm_int8_enable_fp32_cpu_offload": false,
       "llm_int8_has_fp16_weight": false, "llm_int8_skip_modules": null,
       "llm_int8_threshold": 6.0, "load_in_4bit": true, "load_in_8bit": false,
       "quant_method": "bitsandbytes"}
  int8: "_load_in_4bit"/"load_in_4bit" false, "_load_in_8bit"/"load_in_8bit" true,
  "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": false, the rest the same.
  bert: "llm_int8_skip_modules": ["classifier"] in both.
  T5 (f32, nf4 and int8 alike): of the tied embeddings only shared.weight is saved
  (encoder.embed_tokens, decoder.embed_tokens and lm_head are absent); config.json has
  "tie_word_embeddings": true and "scale_decoder_outputs": true (decoder output times
  d_model^-0.5 before lm_head). GPT-2's config.json keeps bos/eos 50256 (outside the vocab;
  transformers warns, harmlessly).
  The adapters have fan_in_fan_out false (peft's bnb LoRA layers force it): lora_A [r, in],
  lora_B [out, r] for GPT-2's Conv1D too. bert's adapter also holds
  base_model.model.classifier.{weight,bias} (modules_to_save ["classifier", "score"]).
  Sanity, max |quantized - f32| logits (f32 logits max |.|): gpt2 nf4 0.31, int8 0.036 (1.74);
  t5 nf4 1.98, int8 0.31 (7.90); bert nf4 0.013, int8 0.0011 (0.13). An f32 model given the
  dequantize_4bit weights reproduces nf4.base to 1e-6, and reloading the saved folders (and
  the adapters) reproduces every logit exactly.
"""
import copy
import json
import os
import shutil

import torch
import bitsandbytes.nn.modules as bnb_modules
# On a CPU with AVX512-BF16, bitsandbytes 0.50's Linear4bit repacks its weights to bfloat16 in
# eval mode for a fused inference kernel, which moves the logits by ~1e-2. The reference is the
# float32 dequantize-and-matmul path (what training takes, and what a CPU without AVX512-BF16
# runs): turn the repacking off so the fixtures do not depend on the machine.
bnb_modules.has_avx512bf16 = lambda: False
import bitsandbytes as bnb
from peft import LoraConfig, get_peft_model, PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BitsAndBytesConfig,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "peft-quant", "tests", "fixtures")

INPUT_IDS = torch.tensor([[0, 0, 5, 17, 42, 99, 3], [8, 150, 9, 23, 77, 64, 2]])
ATTENTION_MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])


def arch_specs():
    return {
        "gpt2": dict(
            cls=GPT2LMHeadModel,
            config=lambda: GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=64, vocab_size=200),
            task_type="CAUSAL_LM",
            targets=["c_attn", "c_proj", "c_fc"],
            grads=["transformer.h.0.attn.c_attn.lora_A", "transformer.h.1.mlp.c_proj.lora_B"],
            inputs=lambda: {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK},
            labels=lambda: INPUT_IDS.masked_fill(ATTENTION_MASK == 0, -100),
        ),
        "t5": dict(
            cls=T5ForConditionalGeneration,
            config=lambda: T5Config(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2,
                                    vocab_size=200, relative_attention_num_buckets=8, feed_forward_proj="relu",
                                    decoder_start_token_id=0, pad_token_id=0),
            task_type="SEQ_2_SEQ_LM",
            targets=["q", "k", "v", "o", "wi"],
            grads=["encoder.block.0.layer.0.SelfAttention.q.lora_A", "decoder.block.1.layer.2.DenseReluDense.wi.lora_B"],
            inputs=lambda: {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
                            "decoder_input_ids": torch.tensor([[0, 5, 9, 31, 2], [0, 44, 3, 3, 7]])},
            labels=lambda: torch.tensor([[5, 9, 31, 2, 1], [44, 3, 3, 7, 1]]),
        ),
        "bert": dict(
            cls=BertForSequenceClassification,
            config=lambda: BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=256, vocab_size=200, max_position_embeddings=64,
                                      num_labels=3),
            task_type="SEQ_CLS",
            targets=["query", "key", "value", "dense"],
            grads=["bert.encoder.layer.0.attention.self.query.lora_A", "bert.encoder.layer.1.output.dense.lora_B"],
            inputs=lambda: {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK},
            labels=lambda: torch.tensor([2, 0]),
            # Without it transformers quantizes the classifier too (get_keys_to_not_convert keeps
            # "classifier.bias", the last parameter's name, which names no module), and peft's
            # modules_to_save copy of a Linear4bit fails ("only Tensors of floating point dtype
            # can require gradients"). With any llm_int8_skip_modules, transformers skips only those.
            skip=["classifier"],
        ),
    }


def is_norm(module):
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("LayerNorm")


def drop_extras(folder):
    for extra in ("generation_config.json",):
        p = os.path.join(folder, extra)
        if os.path.exists(p):
            os.remove(p)


def no_bf16_fast_path(model):
    """On a CPU with AVX512-BF16, bitsandbytes' Linear4bit runs eval-mode, no-grad forwards
    through a repacked bf16 kernel (activations in bf16), which moves T5's logits by ~0.1; the
    f32 path (dequantize_4bit, then an f32 linear) is what every other case and the LLaMA
    fixtures use, so the fast path is switched off."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def quantized_modules(model):
    quant, dense = [], []
    for name, m in model.named_modules():
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            quant.append(name)
        elif isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
            dense.append(name)
    return quant, dense


def describe(folder, module):
    """Prints the quantization_config and the tensors of one quantized module of a saved folder."""
    with open(os.path.join(folder, "config.json")) as f:
        print("  quantization_config", json.dumps(json.load(f).get("quantization_config"), sort_keys=True))
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as st:
        keys = sorted(st.keys())
        dtypes = sorted({str(st.get_slice(k).get_dtype()) for k in keys if not k.startswith(module + ".")})
        print(f"  {len(keys)} tensors; dtypes outside {module}: {dtypes}")
        for k in keys:
            if k.startswith(module + "."):
                t = st.get_tensor(k)
                extra = ""
                if "quant_state" in k:
                    extra = " " + bytes(t.tolist()).decode()
                print(f"    {k} {t.dtype} {list(t.shape)}{extra}")
        print("  embeddings/heads saved:", [k for k in keys if any(s in k for s in ("shared", "embed", "wte", "wpe", "lm_head", "classifier", "pooler"))])


def outlier_hook(counter):
    def hook(_m, args):
        counter[0] += int((args[0].abs() >= 6.0).sum())
    return hook


def build(arch, spec):
    torch.manual_seed(0)
    m = spec["cls"](spec["config"]())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in m.modules():
            if is_norm(module):
                module.weight.copy_(0.5 + 2.5 * torch.rand(module.weight.shape, generator=g))
    m.eval()
    base_dir = os.path.join(OUT, f"tiny_{arch}")
    shutil.rmtree(base_dir, ignore_errors=True)
    m.save_pretrained(base_dir)
    drop_extras(base_dir)
    return m, base_dir


def pm_dense_logits(m, adapter_dir, inputs):
    """Logits of the f32 model with the adapter (the dense counterpart of nf4.adapted)."""
    with torch.no_grad():
        dense = PeftModel.from_pretrained(copy.deepcopy(m), adapter_dir).eval()
        return dense(**inputs).logits.double()


def arch_fixtures(arch, spec):
    m, base_dir = build(arch, spec)
    inputs = spec["inputs"]()
    labels = spec["labels"]()
    tensors = dict(inputs)
    tensors["labels"] = labels
    with torch.no_grad():
        tensors["f32.logits"] = m(**inputs).logits
    print(f"== {arch}")
    adapter_dir = os.path.join(OUT, f"qlora_{arch}_adapter")
    skip = spec.get("skip")
    for tag, qcfg in [
        ("nf4", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)),
        ("int8", BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)),
    ]:
        q = spec["cls"].from_pretrained(base_dir, quantization_config=qcfg, device_map="cpu", dtype=torch.float32)
        q.eval()
        no_bf16_fast_path(q)
        quant, dense = quantized_modules(q)
        leaves = sorted({n.split(".")[-1] for n in quant})
        print(f" {tag}: quantized {len(quant)} modules {leaves}; dense linears {dense}")
        assert leaves == sorted(spec["targets"]), (leaves, spec["targets"])
        qdir = os.path.join(OUT, f"tiny_{arch}_{tag}")
        shutil.rmtree(qdir, ignore_errors=True)
        q.save_pretrained(qdir)
        drop_extras(qdir)
        describe(qdir, quant[0])
        counter = [0]
        handles = [q.get_submodule(n).register_forward_pre_hook(outlier_hook(counter)) for n in quant]
        with torch.no_grad():
            tensors[f"{tag}.base"] = q(**inputs).logits
        for h in handles:
            h.remove()
        diff = (tensors[f"{tag}.base"] - tensors["f32.logits"]).abs().max().item()
        print(f"  max |{tag}.base - f32| = {diff:.3e} (f32 logits max |.| {tensors['f32.logits'].abs().max().item():.3e});"
              f" activations >= 6 entering quantized linears: {counter[0]}")
        if tag == "nf4":
            torch.manual_seed(1)
            lcfg = LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, init_lora_weights=False,
                              target_modules=spec["targets"], task_type=spec["task_type"])
            pm = get_peft_model(q, lcfg)
            # B at a tenth of init_lora_weights=False's scale (still non-zero, alpha != r):
            # deltas the size trained adapters have. With B as large as A, T5's unnormalised
            # residual stream makes the adapted f32 logits ill-conditioned: PyTorch's own f32
            # result differs from its f64 result by 2.6e-4, so no f32 implementation can be
            # held to 1e-4 there (`f64 noise` below prints the margin for each architecture).
            with torch.no_grad():
                for name, p in pm.named_parameters():
                    if "lora_B" in name:
                        p.mul_(0.1)
            if arch == "bert":
                g = torch.Generator().manual_seed(9)
                saved_cls = pm.base_model.model.classifier.modules_to_save["default"]
                with torch.no_grad():
                    for p in saved_cls.parameters():
                        p.add_(0.5 * torch.randn(p.shape, generator=g))
            pm.eval()
            shutil.rmtree(adapter_dir, ignore_errors=True)
            pm.save_pretrained(adapter_dir)
            cfg_path = os.path.join(adapter_dir, "adapter_config.json")
            with open(cfg_path) as f:
                saved = json.load(f)
            saved["base_model_name_or_path"] = f"tiny_{arch}"
            saved["target_modules"] = sorted(saved["target_modules"])  # a set: hash-seed order
            with open(cfg_path, "w") as f:
                f.write(json.dumps(saved, indent=2, sort_keys=True) + "\n")
            out = pm(**inputs, labels=labels)
            out.loss.backward()
            with torch.no_grad():
                f64 = copy.deepcopy(m).double()
                f64 = PeftModel.from_pretrained(f64, adapter_dir).double().eval()
                ref = f64(**inputs).logits
                print(f"  f64 noise: max |f32 model + adapter - f64 model + adapter| = "
                      f"{(pm_dense_logits(m, adapter_dir, inputs) - ref).abs().max().item():.3e}")
            tensors["nf4.adapted"] = out.logits.detach()
            tensors["nf4.loss"] = out.loss.detach().reshape(1)
            for name, p in pm.named_parameters():
                if p.grad is not None and any(f"{g}." in name for g in spec["grads"]):
                    key = name.replace("base_model.model.", "").replace(".default", "")
                    tensors[f"nf4.grad.{key}"] = p.grad.detach().clone()
            assert sum(k.startswith("nf4.grad.") for k in tensors) == 2
            with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as st:
                print("  adapter tensors:", len(list(st.keys())), "non-LoRA:", [k for k in st.keys() if "lora_" not in k])
        else:
            pm = PeftModel.from_pretrained(q, adapter_dir)
            pm.eval()
            with torch.no_grad():
                tensors["int8.adapted"] = pm(**inputs).logits
            print("  max |int8.adapted - nf4.adapted| =",
                  f"{(tensors['int8.adapted'] - tensors['nf4.adapted']).abs().max().item():.3e}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, f"qlora_{arch}.safetensors"))
    print(" ", sorted(tensors))


def main():
    os.makedirs(OUT, exist_ok=True)
    for arch, spec in arch_specs().items():
        arch_fixtures(arch, spec)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
