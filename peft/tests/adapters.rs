//! Several named adapters on one model: switching, combining, disabling, deleting, merging,
//! and dropout only in training.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, max_abs_diff};
use peft::{AdapterConfig, ModelInputs, PeftModel};

fn base() -> Box<dyn peft::AdaptableModel> {
    peft::models::load_model(
        &fixtures().join("models/llama_tiny"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn cfg(targets: &str, r: usize, alpha: f64, dropout: f64) -> AdapterConfig {
    AdapterConfig::from_json_str(
        &format!(
            r#"{{"peft_type": "LORA", "r": {r}, "lora_alpha": {alpha}, "lora_dropout": {dropout},
                "target_modules": {targets}, "init_lora_weights": false}}"#
        ),
        "inline",
    )
    .unwrap()
}

fn inputs() -> ModelInputs {
    ModelInputs::from_ids(Tensor::new(&[[1u32, 9, 33, 71, 5, 2]], &Device::Cpu).unwrap())
}

#[test]
fn switching_combining_and_deleting_adapters() {
    let a = || cfg(r#"["q_proj", "v_proj"]"#, 4, 8.0, 0.0);
    let b = || cfg(r#"["v_proj", "down_proj"]"#, 2, 5.0, 0.0);
    let mut model = PeftModel::new(base());
    model.add_adapter("a", a(), 1).unwrap();
    model.add_adapter("b", b(), 2).unwrap();
    assert_eq!(
        model.active_adapters(),
        vec!["a".to_string()],
        "the first adapter is active"
    );

    let mut only_a = PeftModel::new(base());
    only_a.add_adapter("a", a(), 1).unwrap();
    let mut only_b = PeftModel::new(base());
    only_b.add_adapter("b", b(), 2).unwrap();
    let x = inputs();
    let (ya, yb) = (only_a.forward(&x).unwrap(), only_b.forward(&x).unwrap());
    assert_eq!(max_abs_diff(&model.forward(&x).unwrap(), &ya), 0.0);
    model.set_adapter("b").unwrap();
    assert_eq!(max_abs_diff(&model.forward(&x).unwrap(), &yb), 0.0);

    // Both active: equal to merging both.
    model.set_adapters(&["a", "b"]).unwrap();
    let both = model.forward(&x).unwrap();
    assert!(max_abs_diff(&both, &ya) > 1e-3 && max_abs_diff(&both, &yb) > 1e-3);
    model.merge_adapter().unwrap();
    assert_close("merged a+b", &model.forward(&x).unwrap(), &both, 1e-4);
    {
        let off = model.disable_adapters();
        let plain = PeftModel::new(base()).forward(&x).unwrap();
        assert_eq!(
            max_abs_diff(&off.forward(&x).unwrap(), &plain),
            0.0,
            "disabled while merged = base"
        );
    }
    assert_close("re-enabled", &model.forward(&x).unwrap(), &both, 1e-4);
    model.unmerge_adapter().unwrap();

    // Trainable vars follow the active set; counts include every adapter.
    assert_eq!(model.trainable_vars().len(), 2 * (4 + 4));
    model.set_adapter("a").unwrap();
    assert_eq!(model.trainable_vars().len(), 2 * 4);

    model.delete_adapter("a").unwrap();
    assert_eq!(model.active_adapters(), vec!["b".to_string()]);
    assert_eq!(max_abs_diff(&model.forward(&x).unwrap(), &yb), 0.0);
    let (t, all) = model.parameter_counts();
    assert_eq!(all, PeftModel::new(base()).parameter_counts().1 + t);
}

#[test]
fn dropout_applies_in_training_only() {
    let model =
        peft::get_peft_model(base(), cfg(r#"["q_proj", "v_proj"]"#, 4, 8.0, 0.5), 3).unwrap();
    let x = inputs();
    let eval1 = model.forward(&x).unwrap();
    model.set_training(true);
    let train1 = model.forward(&x).unwrap();
    let train2 = model.forward(&x).unwrap();
    model.set_training(false);
    let eval2 = model.forward(&x).unwrap();
    assert_eq!(max_abs_diff(&eval1, &eval2), 0.0);
    assert!(max_abs_diff(&train1, &eval1) > 1e-4);
    assert!(max_abs_diff(&train1, &train2) > 1e-4);
}

/// Merged weights are frozen, as peft merges under `torch.no_grad`: a merged adapter gets no
/// gradient (peft runs only the base layer of a merged LoRA layer), and neither the merged
/// layers nor `merge_and_unload`'s model keep the adapters' graph.
#[test]
fn merged_weights_are_frozen() {
    let ids = Tensor::new(&[[1u32, 9, 33, 71, 5, 2]], &Device::Cpu).unwrap();
    let x = ModelInputs::from_ids(ids.clone());
    let mut model = peft::get_peft_model(
        base(),
        cfg(r#"["q_proj", "v_proj", "embed_tokens"]"#, 4, 8.0, 0.0),
        3,
    )
    .unwrap();
    model.set_training(true);
    let vars = model.trainable_named_vars();
    assert!(
        vars.len() >= 6,
        "q, v and the embedding each have A and B: {}",
        vars.len()
    );
    let grads = model.causal_lm_loss(&x, &ids).unwrap().backward().unwrap();
    for (name, v) in &vars {
        assert!(
            grads.get(v.as_tensor()).is_some(),
            "unmerged: {name} gets a gradient"
        );
    }
    let unmerged = model.forward(&x).unwrap();

    model.merge_adapter().unwrap();
    assert_close("merged", &model.forward(&x).unwrap(), &unmerged, 1e-4);
    let grads = model.causal_lm_loss(&x, &ids).unwrap().backward().unwrap();
    for (name, v) in &vars {
        assert!(
            grads.get(v.as_tensor()).is_none(),
            "merged: {name} gets no gradient"
        );
    }
    model.unmerge_adapter().unwrap();
    assert_eq!(max_abs_diff(&model.forward(&x).unwrap(), &unmerged), 0.0);

    let plain = model.merge_and_unload().unwrap();
    for (name, t) in plain.named_tensors().unwrap() {
        assert!(!t.track_op(), "merge_and_unload: {name} keeps a graph");
    }
}

#[test]
fn bf16_base_runs_close_to_f32() {
    let dir = fixtures().join("adapters/llama_tiny__lora_qv");
    let f32_model = PeftModel::from_pretrained(base(), &dir, false).unwrap();
    let bf16_base = peft::models::load_model(
        &fixtures().join("models/llama_tiny"),
        DType::BF16,
        &Device::Cpu,
    )
    .unwrap();
    let bf16_model = PeftModel::from_pretrained(bf16_base, &dir, false).unwrap();
    let x = inputs();
    let a = f32_model.forward(&x).unwrap();
    let b = bf16_model.forward(&x).unwrap();
    assert_eq!(b.dtype(), DType::BF16);
    let scale = a
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        max_abs_diff(&a, &b) < 0.05 * scale,
        "bf16 drifted: {} vs scale {scale}",
        max_abs_diff(&a, &b)
    );
    // Adapters stay F32 and save as F32.
    let tmp = tempfile::tempdir().unwrap();
    bf16_model.save_pretrained(tmp.path()).unwrap();
    for (_, t) in peft::checkpoint::read_safetensors(
        &tmp.path().join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    {
        assert_eq!(t.dtype(), DType::F32);
    }
}

/// The hooks prompt-learning methods use: input embeddings in place of ids (with virtual tokens
/// prepended) and a KV cache pre-filled with per-layer key/value prefixes.
#[test]
fn input_embedding_and_prefix_hooks() {
    let model = PeftModel::from_pretrained(
        base(),
        &fixtures().join("adapters/llama_tiny__lora_embed"),
        false,
    )
    .unwrap();
    let ids = Tensor::new(&[[1u32, 9, 33, 71, 5, 2]], &Device::Cpu).unwrap();
    let by_ids = model.forward(&ModelInputs::from_ids(ids.clone())).unwrap();
    let embeds = model.base_model().embed_tokens(&ids).unwrap();
    let by_embeds = model
        .forward(&ModelInputs {
            inputs_embeds: Some(embeds.clone()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        max_abs_diff(&by_ids, &by_embeds),
        0.0,
        "embed_tokens includes the embedding adapter"
    );

    // A prefix in the cache: the first three positions' keys/values, then the rest.
    let mut cache = model.new_cache();
    let head = ModelInputs {
        inputs_embeds: Some(embeds.narrow(1, 0, 3).unwrap()),
        ..Default::default()
    };
    model.forward_with_cache(&head, &mut cache).unwrap();
    assert_eq!(cache.seq_len(), 3);
    let prefix = peft::KvCache::from_prefix(
        (0..cache.num_layers())
            .map(|i| cache.get(i).unwrap().clone())
            .collect(),
    );
    let mut cache = prefix;
    let tail = ModelInputs {
        inputs_embeds: Some(embeds.narrow(1, 3, 3).unwrap()),
        attention_mask: Some(Tensor::ones((1, 6), DType::U32, &Device::Cpu).unwrap()),
        ..Default::default()
    };
    let rest = model.forward_with_cache(&tail, &mut cache).unwrap();
    assert_close(
        "prefix + rest",
        &rest,
        &by_ids.narrow(1, 3, 3).unwrap(),
        1e-5,
    );
}

/// A model split into shards with `model.safetensors.index.json` loads like the single file.
#[test]
fn sharded_checkpoints_load() {
    let src = fixtures().join("models/llama_tiny");
    let tensors =
        peft::checkpoint::read_safetensors(&src.join("model.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let (a, b) = tensors.split_at(tensors.len() / 2);
    let mut map = serde_json::Map::new();
    for (part, file) in [
        (a, "model-00001-of-00002.safetensors"),
        (b, "model-00002-of-00002.safetensors"),
    ] {
        peft::checkpoint::write_safetensors(&dir.path().join(file), part).unwrap();
        for (k, _) in part {
            map.insert(k.clone(), serde_json::Value::from(file));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = peft::models::load_model(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let x = inputs();
    assert_eq!(
        max_abs_diff(
            &sharded.forward(&x, None).unwrap(),
            &base().forward(&x, None).unwrap()
        ),
        0.0
    );
    // A shard listed in the index but absent is an error naming it.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = peft::models::load_model(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}
