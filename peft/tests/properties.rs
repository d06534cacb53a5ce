//! Property tests: target matching follows peft's rules on random module trees, condensing long
//! target lists never changes what is selected, and configs survive a write/read round trip.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use peft::lora::LoraConfig;
use peft::targets::{
    minimal_target_modules, resolve_target_modules, select_targets, MatchOutcome, TargetMatcher,
};
use peft::{AdapterConfig, LayerIndices, ModuleEntry, ModuleKind, TargetModules, TargetSpec};
use proptest::prelude::*;
use serde_json::Value;

const LEAVES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "up_proj",
    "down_proj",
    "q",
    "v",
    "dense",
];
const GROUPS: &[&str] = &["self_attn", "mlp", "attn", "cross"];

fn module_tree() -> impl Strategy<Value = Vec<ModuleEntry>> {
    (
        1usize..6,
        prop::collection::vec(
            (
                0usize..GROUPS.len(),
                prop::collection::btree_set(0usize..LEAVES.len(), 1..5),
            ),
            1..4,
        ),
    )
        .prop_map(|(layers, groups)| {
            let mut out = vec![ModuleEntry::new("model", ModuleKind::Other("Model"))];
            for i in 0..layers {
                for (g, leaves) in &groups {
                    let group = format!("model.layers.{i}.{}", GROUPS[*g]);
                    if out.iter().any(|m| m.path == group) {
                        continue;
                    }
                    out.push(ModuleEntry::new(&group, ModuleKind::Other("Group")));
                    for l in leaves {
                        out.push(ModuleEntry::new(
                            format!("{group}.{}", LEAVES[*l]),
                            ModuleKind::Linear,
                        ));
                    }
                }
            }
            out.push(ModuleEntry::new("lm_head", ModuleKind::Linear));
            out
        })
}

fn names(modules: &[ModuleEntry]) -> Vec<String> {
    modules.iter().map(|m| m.path.clone()).collect()
}

proptest! {
    #[test]
    fn list_targets_match_exact_names_and_dotted_suffixes(
        modules in module_tree(),
        picks in prop::collection::btree_set(0usize..LEAVES.len(), 1..4),
    ) {
        let targets: Vec<String> = picks.iter().map(|i| LEAVES[*i].to_string()).collect();
        let m = TargetMatcher::new(&TargetSpec::default(), &TargetModules::List(targets.clone()), &[], &[]).unwrap();
        for path in names(&modules) {
            let expected = targets.iter().any(|t| path == *t || path.ends_with(&format!(".{t}")));
            prop_assert_eq!(m.check(&path) == MatchOutcome::Target, expected, "{}", path);
        }
    }

    #[test]
    fn an_escaped_regex_selects_exactly_its_module(modules in module_tree(), pick in any::<prop::sample::Index>()) {
        let all = names(&modules);
        let chosen = pick.get(&all).clone();
        let pattern = chosen.replace('.', r"\.");
        let m = TargetMatcher::new(&TargetSpec::default(), &TargetModules::Regex(pattern), &[], &[]).unwrap();
        for path in &all {
            prop_assert_eq!(m.check(path) == MatchOutcome::Target, *path == chosen);
        }
    }

    #[test]
    fn exclusion_and_layer_selection_hold(
        modules in module_tree(),
        picks in prop::collection::btree_set(0usize..LEAVES.len(), 1..5),
        excluded in 0usize..LEAVES.len(),
        layers in prop::collection::vec(0usize..6, 1..3),
    ) {
        let spec = TargetSpec {
            exclude_modules: Some(TargetModules::List(vec![LEAVES[excluded].to_string()])),
            layers_to_transform: Some(LayerIndices::Many(layers.clone())),
            ..TargetSpec::default()
        };
        let targets = TargetModules::List(picks.iter().map(|i| LEAVES[*i].to_string()).collect());
        if let Ok(selected) = select_targets(&spec, &targets, &modules, &[]) {
            for path in selected {
                let leaf = path.rsplit('.').next().unwrap();
                prop_assert_ne!(leaf, LEAVES[excluded]);
                let index: usize = path.split('.').nth(2).unwrap().parse().unwrap();
                prop_assert!(layers.contains(&index), "{} not in {:?}", path, layers);
            }
        }
    }

    #[test]
    fn condensing_long_lists_selects_the_same_modules(modules in module_tree(), keep in prop::collection::vec(any::<bool>(), 0..200)) {
        let linear: Vec<String> = modules.iter().filter(|m| m.kind == ModuleKind::Linear).map(|m| m.path.clone()).collect();
        let chosen: Vec<String> = linear.iter().zip(keep.iter().chain(std::iter::repeat(&true))).filter(|(_, k)| **k).map(|(n, _)| n.clone()).collect();
        prop_assume!(!chosen.is_empty());
        let full = TargetModules::List(chosen.clone());
        let condensed = resolve_target_modules(&full, &modules, &[], true);
        let a = select_targets(&TargetSpec::default(), &full, &modules, &[]).unwrap();
        let b = select_targets(&TargetSpec::default(), &condensed, &modules, &[]).unwrap();
        prop_assert_eq!(a, b);
        let others: Vec<&str> = modules.iter().map(|m| m.path.as_str()).filter(|p| !chosen.iter().any(|c| c == p)).collect();
        let minimal = minimal_target_modules(&chosen, &others);
        for c in &chosen {
            let covered = minimal.iter().any(|s| c == s || c.ends_with(&format!(".{}", s)));
            prop_assert!(covered, "{} not covered by {:?}", c, minimal);
        }
    }

    #[test]
    fn lora_configs_round_trip(
        r in 1usize..64,
        alpha_int in 1i64..128,
        alpha_is_float in any::<bool>(),
        dropout in 0.0f64..0.9,
        use_rslora in any::<bool>(),
        regex in any::<bool>(),
        targets in prop::collection::btree_set(0usize..LEAVES.len(), 1..4),
        rank_pattern in prop::collection::vec((0usize..LEAVES.len(), 1u64..32), 0..3),
        extra in prop::collection::btree_map("[a-z]{3,8}_future", 0i64..10, 0..3),
        init in 0usize..3,
    ) {
        let mut obj = serde_json::Map::new();
        obj.insert("peft_type".into(), Value::from("LORA"));
        obj.insert("r".into(), Value::from(r));
        obj.insert("lora_alpha".into(), if alpha_is_float { Value::from(alpha_int as f64 + 0.5) } else { Value::from(alpha_int) });
        obj.insert("lora_dropout".into(), Value::from(dropout));
        obj.insert("use_rslora".into(), Value::from(use_rslora));
        let t: Vec<String> = targets.iter().map(|i| LEAVES[*i].to_string()).collect();
        obj.insert("target_modules".into(), if regex { Value::from(format!(".*\\.({})", t.join("|"))) } else { Value::from(t) });
        let rp: serde_json::Map<String, Value> = rank_pattern.iter().map(|(i, v)| (LEAVES[*i].to_string(), Value::from(*v))).collect();
        obj.insert("rank_pattern".into(), Value::Object(rp));
        obj.insert("init_lora_weights".into(), [Value::from(true), Value::from(false), Value::from("gaussian")][init].clone());
        obj.insert("task_type".into(), Value::from("CAUSAL_LM"));
        for (k, v) in &extra {
            obj.insert(k.clone(), Value::from(*v));
        }
        let first = AdapterConfig::from_value(Value::Object(obj.clone()), "generated").unwrap();
        let text = first.to_json_string();
        let second = AdapterConfig::from_json_str(&text, "written").unwrap();
        prop_assert_eq!(second.to_json_string(), text.clone());
        // Pattern keys are written sorted (as peft's sort_keys does), so compare after one write.
        let third = AdapterConfig::from_json_str(&second.to_json_string(), "rewritten").unwrap();
        let a = second.method_as::<LoraConfig>().unwrap();
        let b = third.method_as::<LoraConfig>().unwrap();
        prop_assert_eq!(a, b);
        prop_assert_eq!(&first.method_as::<LoraConfig>().unwrap().targets, &a.targets);
        // Every field we were given is in the written file with the same value.
        let written: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
        for (k, v) in &obj {
            prop_assert_eq!(&written[k], v, "{}", k);
        }
    }
}
