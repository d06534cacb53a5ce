#!/usr/bin/env python3
"""Reference fixtures for peft-quant: bitsandbytes' NF4 / FP4 / int8 quantization (its CPU
backend) and QLoRA on a tiny LLaMA loaded by transformers with BitsAndBytesConfig.
Produced with torch 2.15, transformers 5.24, peft 0.21.2, bitsandbytes 0.50.2.

Run from the repository root:
    pip install torch transformers peft bitsandbytes
    python tools/reference/make_quant_fixtures.py

Writes peft-quant/src/bnb_tables.rs (the measured thresholds of bitsandbytes' native 8-bit
blockwise quantizer) and, under peft-quant/tests/fixtures/:
  blockwise.safetensors  seeded matrices and what bitsandbytes makes of them:
      dynamic_map                       create_dynamic_map() (the 8-bit code of double quant)
      nf4.w [65, 256] (row 7 all zero, rows scaled 1e-3..1e2)
      nf4.dq.{packed,absmax,nested_absmax,offset,deq}   quantize_4bit(nf4, blocksize 64,
                                        compress_statistics=True) and dequantize_4bit
      nf4.plain.{packed,absmax,deq}     the same without double quantization
      nf4.b128.{packed,absmax,deq}      blocksize 128, no double quantization
      fp4.dq.{packed,deq}               FP4 with double quantization
      nf4.x [5, 256], nf4.y             matmul_4bit(x, w_q.t(), state) (what Linear4bit runs)
      int8.w [48, 96]; int8.{cb, scb, deq}   Int8Params quantization (weights through float16,
                                        int8_vectorwise_quant), int8_vectorwise_dequant
      int8.x [7, 96] with entries >= 6; int8.bias [48]
      int8.y_t0 / int8.y_t6             MatMul8bitLt's forward with threshold 0 and 6
                                        (activations through float16, int8 x int8 product,
                                        outlier columns in float32)
  tiny_llama/            config.json + model.safetensors (f32, random, seed 0, norm weights
                         spread 0.5..3 so int8 outliers occur)
  tiny_llama_nf4/        transformers save_pretrained of the same model loaded in NF4 with
                         double quantization (the bitsandbytes checkpoint format)
  tiny_llama_int8/       the same in int8
  qlora_adapter/         LoRA r=4 alpha 12 on every linear, non-zero B (peft)
  qlora.safetensors      input_ids, attention_mask (left padding), labels; logits of
                         nf4.base / nf4.adapted / int8.base / int8.adapted; nf4.loss and
                         nf4.grad.<name> (gradients of two LoRA tensors under the NF4 base)
"""
import json
import os
import shutil
import struct

import numpy as np

import torch
import bitsandbytes.nn.modules as bnb_modules
# On a CPU with AVX512-BF16, bitsandbytes 0.50's Linear4bit repacks its weights to bfloat16 in
# eval mode for a fused inference kernel, which moves the logits by ~1e-2. The reference is the
# float32 dequantize-and-matmul path (what training takes, and what a CPU without AVX512-BF16
# runs): turn the repacking off so the fixtures do not depend on the machine.
bnb_modules.has_avx512bf16 = lambda: False
import bitsandbytes.functional as F
from bitsandbytes.functional import create_dynamic_map
from peft import LoraConfig, get_peft_model, PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "peft-quant", "tests", "fixtures")


def _key(f):
    b = np.asarray(f, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(b < 0, -(b & 0x7FFFFFFF), b)


def _unkey(k):
    k = np.asarray(k, dtype=np.int64)
    return np.where(k < 0, (-k) | 0x80000000, k).astype(np.uint32).view(np.float32)


def _bnb_dynamic_indices(z):
    """bitsandbytes' CPU quantize_blockwise (dynamic code) of values already in [-1, 1]: each
    block of 256 gets a leading 1.0 so its absmax is 1 and the values are quantized as given."""
    z = np.asarray(z, dtype=np.float32)
    blocks = (len(z) + 254) // 255
    a = np.zeros((blocks, 256), dtype=np.float32)
    a[:, 0] = 1.0
    flat = np.zeros(blocks * 255, dtype=np.float32)
    flat[: len(z)] = z
    a[:, 1:] = flat.reshape(blocks, 255)
    q, absmax = torch.ops.bitsandbytes.quantize_blockwise(torch.from_numpy(a.reshape(-1)), create_dynamic_map(), 256)
    assert (absmax.numpy() == 1.0).all()
    return q.numpy().reshape(blocks, 256)[:, 1:].reshape(-1)[: len(z)].astype(np.int64)


def dynamic_thresholds():
    """The 255 f32 thresholds of bitsandbytes' native CPU `quantize_blockwise` with the dynamic
    code: index(z) = number of thresholds <= z. Its binary search (BinSearch Direct2 plus a
    nearest-neighbour check) is not plain round-to-nearest (0.0 maps to code 131, for one), so
    the step function is measured by bisection over f32 values, then checked on 400k values."""
    ks = np.arange(1, 256)
    lo = np.full(255, _key(np.float32(-1.0)), dtype=np.int64)
    hi = np.full(255, _key(np.float32(1.0)), dtype=np.int64)
    assert _bnb_dynamic_indices([-1.0])[0] == 0 and _bnb_dynamic_indices([1.0])[0] == 255
    while (hi - lo > 1).any():
        mid = (lo + hi) // 2
        up = _bnb_dynamic_indices(_unkey(mid)) >= ks
        hi = np.where(up, mid, hi)
        lo = np.where(up, lo, mid)
    t = _unkey(hi)
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.uniform(-1, 1, 200000), rng.standard_normal(200000) * 0.01, [0.0, -0.0, 1e-7]]).astype(np.float32)
    assert (np.searchsorted(t, z, side="right") == _bnb_dynamic_indices(z)).all()
    return t


def write_rust_tables(thresholds):
    bits = [struct.unpack("<I", struct.pack("<f", float(v)))[0] for v in thresholds]
    rows = "\n".join("    " + ", ".join(f"0x{b:08x}" for b in bits[i:i + 8]) + "," for i in range(0, len(bits), 8))
    text = (
        "//! Generated by tools/reference/make_quant_fixtures.py from bitsandbytes 0.50.2; do not edit.\n\n"
        "/// Thresholds of bitsandbytes' native CPU `quantize_blockwise` with the dynamic code, as f32\n"
        "/// bit patterns: the index of a normalised value `z` is the number of thresholds `<= z`.\n"
        f"pub(crate) const DYNAMIC_THRESHOLD_BITS: [u32; 255] = [\n{rows}\n];\n"
    )
    with open(os.path.join(ROOT, "peft-quant", "src", "bnb_tables.rs"), "w") as f:
        f.write(text)


def blockwise():
    g = torch.Generator().manual_seed(3)
    thresholds = dynamic_thresholds()
    write_rust_tables(thresholds)
    t = {"dynamic_map": create_dynamic_map(), "dynamic_thresholds": torch.from_numpy(thresholds)}
    w = torch.randn(65, 256, generator=g)
    w = w * torch.logspace(-3, 2, 65).unsqueeze(1)
    w[7] = 0.0
    w[11, 5] = 40.0  # a spike that dominates its block
    t["nf4.w"] = w
    for tag, quant_type, blocksize, nested in [
        ("nf4.dq", "nf4", 64, True),
        ("nf4.plain", "nf4", 64, False),
        ("nf4.b128", "nf4", 128, False),
        ("fp4.dq", "fp4", 64, True),
    ]:
        packed, st = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
        t[f"{tag}.packed"] = packed.reshape(-1).contiguous()
        t[f"{tag}.absmax"] = st.absmax.contiguous()
        if nested:
            t[f"{tag}.nested_absmax"] = st.state2.absmax.contiguous()
            t[f"{tag}.offset"] = st.offset.reshape(1).float()
        t[f"{tag}.deq"] = F.dequantize_4bit(packed, st)
        if tag == "nf4.dq":
            x = torch.randn(5, 256, generator=g)
            import bitsandbytes as bnb
            t["nf4.x"] = x
            t["nf4.y"] = bnb.matmul_4bit(x, packed.t(), quant_state=st)

    w8 = torch.randn(48, 96, generator=g) * torch.logspace(-2, 1, 48).unsqueeze(1)
    cb, scb, _ = F.int8_vectorwise_quant(w8.to(torch.float16))
    t["int8.w"] = w8
    t["int8.cb"] = cb.float()  # candle reads no int8 tensors; the values are exact in f32
    t["int8.scb"] = scb
    t["int8.deq"] = F.int8_vectorwise_dequant(cb, scb).float()
    x = torch.randn(7, 96, generator=g)
    x[2, 10] = 7.5
    x[4, 10] = -3.0
    x[5, 50] = -9.25
    x[6] = 0.0
    bias = torch.randn(48, generator=g)
    t["int8.x"] = x
    t["int8.bias"] = bias
    for threshold in (0.0, 6.0):
        ca, sca, cols = torch.ops.bitsandbytes.int8_vectorwise_quant(x.to(torch.float16), threshold)
        if threshold > 0:
            y, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(x.clone(), ca, cb, sca, scb, cols, bias)
        else:
            y = torch.ops.bitsandbytes.int8_scaled_mm(ca, cb, sca, scb, bias=bias, dtype=torch.float32)
        t[f"int8.y_t{int(threshold)}"] = y.float().contiguous()
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, "blockwise.safetensors"))


def save_adapter(pm, adapter_dir, base="tiny_llama"):
    """peft's save_pretrained, with the base named as the committed fixture folder (not the
    temporary path it was loaded from) and the config written with sorted keys."""
    pm.save_pretrained(adapter_dir)
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(cfg_path) as f:
        saved = json.load(f)
    saved["base_model_name_or_path"] = base
    with open(cfg_path, "w") as f:
        f.write(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def tiny_models():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=200, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0)
    m = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + 2.5 * torch.rand(p.shape, generator=g))
    base_dir = os.path.join(OUT, "tiny_llama")
    shutil.rmtree(base_dir, ignore_errors=True)
    m.save_pretrained(base_dir)

    input_ids = torch.tensor([[0, 0, 5, 17, 42, 99, 3], [8, 150, 9, 23, 77, 64, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    labels = input_ids.masked_fill(mask == 0, -100)
    tensors = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    adapter_dir = os.path.join(OUT, "qlora_adapter")
    for tag, qcfg in [
        ("nf4", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)),
        ("int8", BitsAndBytesConfig(load_in_8bit=True)),
    ]:
        q = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=qcfg, device_map="cpu",
                                                 dtype=torch.float32)
        q.eval()
        qdir = os.path.join(OUT, f"tiny_llama_{tag}")
        shutil.rmtree(qdir, ignore_errors=True)
        q.save_pretrained(qdir)
        for extra in ("generation_config.json",):
            p = os.path.join(qdir, extra)
            if os.path.exists(p):
                os.remove(p)
        with torch.no_grad():
            tensors[f"{tag}.base"] = q(input_ids=input_ids, attention_mask=mask).logits
        if tag == "nf4":
            lcfg = LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, init_lora_weights=False,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
            pm = get_peft_model(q, lcfg)
            shutil.rmtree(adapter_dir, ignore_errors=True)
            save_adapter(pm, adapter_dir)
            out = pm(input_ids=input_ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            tensors["nf4.adapted"] = out.logits.detach()
            tensors["nf4.loss"] = out.loss.detach().reshape(1)
            for name, p in pm.named_parameters():
                if p.grad is not None and ("layers.0.self_attn.q_proj.lora_A" in name or "layers.1.mlp.down_proj.lora_B" in name):
                    key = name.replace("base_model.model.", "").replace(".default", "")
                    tensors[f"nf4.grad.{key}"] = p.grad.detach().clone()
        else:
            pm = PeftModel.from_pretrained(q, adapter_dir)
            pm.eval()
            with torch.no_grad():
                tensors["int8.adapted"] = pm(input_ids=input_ids, attention_mask=mask).logits
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "qlora.safetensors"))
    print(sorted(tensors))


def main():
    os.makedirs(OUT, exist_ok=True)
    blockwise()
    tiny_models()
    print("wrote", OUT)


if __name__ == "__main__":
    main()
