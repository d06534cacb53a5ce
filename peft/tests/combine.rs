//! Adapter arithmetic (peft's `add_weighted_adapter`) against peft 0.21 on every combination
//! type: the combined adapter's config, its saved tensors (exactly for the factor merges and
//! `cat`; as `B @ A` products for the SVD types, whose factors are defined up to sign) and the
//! logits with it active; the saved adapter reloading to the same outputs; peft's refusals.
//! Reference: tools/reference/make_combine_fixtures.py (torch 2.15, transformers 5.24, peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{assert_close, fixtures};
use peft::{Combination, CombinationType, MajoritySign, PeftModel};

fn data() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("combine.safetensors"), &Device::Cpu).unwrap()
}

fn cases() -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("combine.json")).unwrap())
        .unwrap()
}

fn model_with(model: &str, adapters: &[(&str, &str)]) -> PeftModel {
    let mut m = PeftModel::new(common::base(model));
    for (name, dir) in adapters {
        m.load_adapter(&fixtures().join("adapters").join(dir), name, false)
            .unwrap();
    }
    m
}

fn model_of(case: &serde_json::Value) -> (PeftModel, Vec<String>) {
    let pairs: Vec<(String, String)> = case["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let m = model_with(case["model"].as_str().unwrap(), &refs);
    (m, pairs.into_iter().map(|(a, _)| a).collect())
}

fn combination_of(case: &serde_json::Value) -> Combination {
    let o = &case["options"];
    Combination {
        kind: case["combination_type"]
            .as_str()
            .map(|t| CombinationType::parse(t).unwrap()),
        svd_rank: o["svd_rank"].as_u64().map(|r| r as usize),
        svd_clamp: o["svd_clamp"].as_f64(),
        density: o["density"].as_f64(),
        majority_sign_method: o["majority_sign_method"]
            .as_str()
            .map_or(MajoritySign::Total, |s| MajoritySign::parse(s).unwrap()),
        seed: 0,
    }
}

/// Combines as the case says; returns the model with the combined adapter active.
fn combined(case: &serde_json::Value) -> PeftModel {
    let (mut m, names) = model_of(case);
    let weights: Vec<f64> = case["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    m.add_weighted_adapter(&refs, &weights, "combined", &combination_of(case))
        .unwrap();
    m.set_adapter("combined").unwrap();
    m
}

fn saved(m: &PeftModel, dir: &std::path::Path) -> HashMap<String, Tensor> {
    m.save_adapter("combined", dir).unwrap();
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

fn sorted_strings(v: &serde_json::Value) -> Option<Vec<String>> {
    v.as_array().map(|a| {
        let mut s: Vec<String> = a.iter().map(|x| x.as_str().unwrap().to_string()).collect();
        s.sort();
        s
    })
}

#[test]
fn combined_adapters_match_peft() {
    let d = data();
    for case in cases() {
        let name = case["case"].as_str().unwrap();
        let svd = case["combination_type"]
            .as_str()
            .is_some_and(|t| CombinationType::parse(t).unwrap().uses_svd())
            && case["adapters"].as_array().unwrap().len() > 1;
        let clamped = case["options"].get("svd_clamp").is_some();
        let m = combined(&case);
        let combined_adapter = m.adapter("combined").unwrap();
        assert!(
            !combined_adapter.is_trainable(),
            "{name}: frozen, as in peft"
        );

        // The config peft holds.
        let dir = tempfile::tempdir().unwrap();
        let ours = saved(&m, dir.path());
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let want = &case["combined_config"];
        for key in [
            "peft_type",
            "r",
            "lora_alpha",
            "use_dora",
            "use_rslora",
            "rank_pattern",
            "alpha_pattern",
        ] {
            if let Some(w) = want.get(key) {
                assert_eq!(&config[key], w, "{name}: {key}");
            }
        }
        for key in ["target_modules", "modules_to_save", "feedforward_modules"] {
            if let Some(w) = want.get(key) {
                assert_eq!(
                    sorted_strings(&config[key]),
                    sorted_strings(w),
                    "{name}: {key}"
                );
            }
        }

        // The tensors peft saves.
        let prefix = format!("{name}/");
        let theirs: HashMap<&str, &Tensor> = d
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(&prefix).map(|k| (k, t)))
            .collect();
        let mut ours_keys: Vec<&str> = ours.keys().map(String::as_str).collect();
        let mut their_keys: Vec<&str> = theirs.keys().copied().collect();
        ours_keys.sort();
        their_keys.sort();
        assert_eq!(ours_keys, their_keys, "{name}: saved keys");
        for (key, t) in &ours {
            let theirs_t = theirs[key.as_str()];
            assert_eq!(t.dims(), theirs_t.dims(), "{name}: {key}");
            let factor =
                key.contains("lora_A") || key.contains("lora_B") || key.contains("lora_embedding_");
            if svd && factor {
                continue; // compared as products below
            }
            assert_close(&format!("{name} {key}"), t, theirs_t, 1e-5);
        }
        if svd && !clamped {
            for (key, a) in &ours {
                let b_key = if key.ends_with("lora_A.weight") {
                    key.replace("lora_A.weight", "lora_B.weight")
                } else if key.ends_with("lora_embedding_A") {
                    key.replace("lora_embedding_A", "lora_embedding_B")
                } else {
                    continue;
                };
                let product = |b: &Tensor, a: &Tensor| b.matmul(a).unwrap();
                let want = product(theirs[b_key.as_str()], theirs[key.as_str()]);
                // f32 rounding of peft's SVD grows with the values (embedding deltas reach ~10).
                let scale = common::max_abs_diff(&want, &want.zeros_like().unwrap()).max(1.0);
                assert_close(
                    &format!("{name} {key}: B @ A"),
                    &product(&ours[&b_key], a),
                    &want,
                    2e-6 * scale,
                );
            }
        }

        // The outputs with the combined adapter active (a clamp depends on the singular
        // vectors' signs, LAPACK's in peft: checked on peft's own factors below).
        let logits = m.forward(&common::case_inputs(&d)).unwrap();
        if !clamped {
            assert_close(name, &logits, &d[&format!("{name}.logits")], 1e-4);
        }

        // Saved here, loaded back: the same outputs.
        common::assert_reloads_to(
            name,
            case["model"].as_str().unwrap(),
            dir.path(),
            &common::case_inputs(&d),
            &logits,
        );
    }
}

#[test]
fn svd_clamp_clamps_like_peft_and_bounds_our_factors() {
    let d = data();
    let case = cases()
        .into_iter()
        .find(|c| c["case"] == "svd_clamp")
        .unwrap();
    let q = case["options"]["svd_clamp"].as_f64().unwrap();
    let values = |t: &Tensor| -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    let mut checked = 0;
    for (key, a) in d
        .iter()
        .filter(|(k, _)| k.starts_with("svd_clamp.unclamped/"))
    {
        let Some(b_key) = key
            .strip_suffix("lora_A.weight")
            .map(|p| format!("{p}lora_B.weight"))
        else {
            continue;
        };
        // peft's own SVD factors, clamped here, give peft's clamped factors.
        let (mut us, mut vt) = (values(&d[&b_key]), values(a));
        peft::lora::combine::clamp_factors(&mut us, &mut vt, q);
        let bare = key.strip_prefix("svd_clamp.unclamped/").unwrap();
        let want_a = values(&d[&format!("svd_clamp/{bare}")]);
        let bare_b = b_key.strip_prefix("svd_clamp.unclamped/").unwrap();
        let want_b = values(&d[&format!("svd_clamp/{bare_b}")]);
        for (x, y) in vt.iter().zip(&want_a).chain(us.iter().zip(&want_b)) {
            assert!((x - y).abs() < 1e-6, "{key}: {x} vs {y}");
        }
        checked += 1;
    }
    assert!(checked >= 4, "{checked} modules");
    // Ours: every value within the quantile bound, and some at it.
    let m = combined(&case);
    let dir = tempfile::tempdir().unwrap();
    let ours = saved(&m, dir.path());
    for (key, a) in ours.iter().filter(|(k, _)| k.ends_with("lora_A.weight")) {
        let b = &ours[&key.replace("lora_A.weight", "lora_B.weight")];
        let all: Vec<f64> = values(b).into_iter().chain(values(a)).collect();
        let hi = all.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let at_bound = all.iter().filter(|v| (v.abs() - hi).abs() < 1e-7).count();
        assert!(
            at_bound >= 2,
            "{key}: clamping leaves several values at the bound"
        );
    }
}

#[test]
fn dare_masks_are_seeded_and_prune_about_one_minus_density() {
    let run = |seed: u64| {
        let mut m = model_with(
            "llama_tiny",
            &[
                ("qv", "llama_tiny__lora_qv"),
                ("qvo", "llama_tiny__lora_qvo"),
            ],
        );
        let how = Combination {
            density: Some(0.5),
            seed,
            ..Combination::of(CombinationType::DareLinear)
        };
        m.add_weighted_adapter(&["qv", "qvo"], &[1.0, 1.0], "combined", &how)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        saved(&m, dir.path())
    };
    let (a, b, c) = (run(1), run(1), run(2));
    let key = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight";
    assert_close("same seed", &a[key], &b[key], 0.0);
    assert!(
        common::max_abs_diff(&a[key], &c[key]) > 0.0,
        "another seed, another mask"
    );
    // o_proj is adapted by qvo alone (weight 1, scaling 6/4: A weighted by sqrt(1.5)): DARE
    // keeps about half of its values, rescaled by 2.
    let qvo = candle_core::safetensors::load(
        fixtures()
            .join("adapters")
            .join("llama_tiny__lora_qvo")
            .join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let orig = qvo[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let got = a[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = 1.5f32.sqrt();
    let mut kept = 0;
    for (g, o) in got.iter().zip(&orig) {
        if *g != 0.0 {
            kept += 1;
            assert!((g - o * w * 2.0).abs() < 1e-5, "{g} vs {o}");
        }
    }
    let share = kept as f64 / got.len() as f64;
    assert!((share - 0.5).abs() < 0.15, "kept {share}");
}

#[test]
fn refusals_name_the_problem_and_leave_the_model_as_it_was() {
    let mut m = model_with(
        "llama_tiny",
        &[
            ("qv", "llama_tiny__lora_qv"),
            ("qvo", "llama_tiny__lora_qvo"),
            ("mts", "llama_tiny__lora_mts"),
            ("mts2", "llama_tiny__lora_mts"),
            ("ia3", "llama_tiny__ia3_default"),
            ("prompt", "llama_tiny__prompt_random"),
        ],
    );
    let before = m.adapter_names();
    let err = |m: &mut PeftModel, names: &[&str], weights: &[f64], how: Combination| {
        m.add_weighted_adapter(names, weights, "new", &how)
            .unwrap_err()
            .to_string()
    };
    let linear = Combination::of(CombinationType::Linear);
    let e = err(&mut m, &["qv", "mts"], &[1.0, 1.0], linear.clone());
    assert!(e.contains("one rank") && e.contains("[4, 2]"), "{e}");
    let e = err(&mut m, &["qv", "nope"], &[1.0, 1.0], linear.clone());
    assert!(e.contains("nope"), "{e}");
    let e = err(&mut m, &["qv"], &[1.0, 1.0], linear.clone());
    assert!(e.contains("one weight per adapter"), "{e}");
    let e = err(&mut m, &["qv", "ia3"], &[1.0, 1.0], Combination::default());
    assert!(e.contains("different methods"), "{e}");
    let e = err(
        &mut m,
        &["prompt", "qv"],
        &[1.0, 1.0],
        Combination::default(),
    );
    assert!(e.contains("prompt-learning"), "{e}");
    let e = err(
        &mut m,
        &["mts", "mts2"],
        &[1.0, 1.0],
        Combination::of(CombinationType::Cat),
    );
    assert!(
        e.contains("modules_to_save") && e.contains("lm_head"),
        "{e}"
    );
    let e = err(
        &mut m,
        &["qv", "qvo"],
        &[1.0, 1.0],
        Combination::of(CombinationType::Ties),
    );
    assert!(e.contains("density"), "{e}");
    let e = err(
        &mut m,
        &["ia3", "ia3"],
        &[1.0, 1.0],
        Combination::of(CombinationType::Cat),
    );
    assert!(e.contains("linearly"), "{e}");
    let e = err(
        &mut m,
        &["qv", "mts"],
        &[f64::NAN, 1.0],
        Combination::default(),
    );
    assert!(e.contains("finite"), "{e}");
    let e = err(
        &mut m,
        &["qv", "mts"],
        &[1.0, 1.0],
        Combination {
            svd_clamp: Some(2.0),
            ..Default::default()
        },
    );
    assert!(e.contains("svd_clamp"), "{e}");
    assert_eq!(m.adapter_names(), before);
    // An existing name is an error (peft silently keeps the old adapter).
    m.add_weighted_adapter(&["qv", "mts"], &[1.0, 1.0], "new", &Combination::default())
        .unwrap();
    let e = m
        .add_weighted_adapter(&["qv"], &[1.0], "new", &Combination::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    // The combined adapter is not active until asked for.
    assert_eq!(m.active_adapters(), vec!["qv".to_string()]);
}
