//! `peft_core::torch_rng` against torch's own CPU generator: uniform_ streams, VeRA's
//! kaiming_uniform_, randperm prefixes on both of torch's algorithms.
//! Reference: tools/reference/make_torch_rng_fixtures.py (torch 2.15).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use peft_core::torch_rng::TorchGenerator;
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/torch_rng.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn uniform_streams_are_bit_exact() {
    for case in fixture()["uniform"].as_array().unwrap() {
        let mut g = TorchGenerator::manual_seed(case["seed"].as_u64().unwrap());
        let n = case["n"].as_u64().unwrap() as usize;
        for (bounds, values) in case["bounds"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["values"].as_array().unwrap())
        {
            let (lo, hi) = (bounds[0].as_f64().unwrap(), bounds[1].as_f64().unwrap());
            assert_eq!(g.uniform(n, lo, hi), f32s(values), "seed {}", case["seed"]);
        }
    }
}

#[test]
fn kaiming_uniform_matches_torch() {
    for case in fixture()["kaiming"].as_array().unwrap() {
        let mut g = TorchGenerator::manual_seed(case["seed"].as_u64().unwrap());
        let shape = (
            case["shape"][0].as_u64().unwrap() as usize,
            case["shape"][1].as_u64().unwrap() as usize,
        );
        assert_eq!(g.kaiming_uniform(shape), f32s(&case["values"]));
    }
}

#[test]
fn randperm_prefixes_match_torch() {
    for case in fixture()["randperm"].as_array().unwrap() {
        let mut g = TorchGenerator::manual_seed(case["seed"].as_u64().unwrap());
        let (n, k) = (case["n"].as_u64().unwrap(), case["k"].as_u64().unwrap());
        let want: Vec<u64> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(g.randperm_prefix(n, k as usize), want, "randperm({n})");
    }
}
