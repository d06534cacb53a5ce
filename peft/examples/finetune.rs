//! Fine-tunes an adapter (LoRA by default) on a causal-LM objective with candle's AdamW, then
//! saves it in peft's layout and loads it back: the Rust counterpart of the example in peft's
//! README.
//!
//! ```text
//! cargo run --release -p peft --example finetune -- [MODEL_DIR] [OUT_DIR] [lora|ia3|prompt|p_tuning|prefix]
//! ```
//! MODEL_DIR is any LLaMA/Mistral/Qwen2 Hugging Face folder (default: the tiny test model).
//! OUT_DIR receives the adapter plus `check.safetensors` (inputs and the adapted logits), which
//! `tools/reference/check_rust_adapter.py MODEL_DIR OUT_DIR` compares against Python peft.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use peft::lora::LoraConfig;
use peft::training::{causal_lm_step, CausalLmBatch};
use peft::{get_peft_model, AdapterConfig, ModelInputs, PeftModel, TaskType};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_dir = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama_tiny")
    });
    let out_dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("peft-rs-example"));
    let method = args.next().unwrap_or_else(|| "lora".to_string());
    let device = Device::Cpu;

    // model = AutoModelForCausalLM.from_pretrained(model_id)
    let base = peft::models::load_model(&model_dir, DType::F32, &device)?;
    let vocab = base.info().vocab_size as u32;

    // peft_config = LoraConfig(r=16, lora_alpha=32, task_type=TaskType.CAUSAL_LM)
    // model = get_peft_model(model, peft_config)
    let config = match method.as_str() {
        "lora" => AdapterConfig::new(LoraConfig::new(16, 32.0).with_dropout(0.05)),
        "ia3" => AdapterConfig::from_json_str(r#"{"peft_type": "IA3"}"#, "example")?,
        "loha" => AdapterConfig::from_json_str(
            r#"{"peft_type": "LOHA", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}"#,
            "example",
        )?,
        "lokr" => AdapterConfig::from_json_str(
            r#"{"peft_type": "LOKR", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}"#,
            "example",
        )?,
        "hra" => AdapterConfig::from_json_str(
            r#"{"peft_type": "HRA", "r": 8, "target_modules": ["q_proj", "v_proj"]}"#,
            "example",
        )?,
        "oft" => AdapterConfig::from_json_str(
            r#"{"peft_type": "OFT", "oft_block_size": 16, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}"#,
            "example",
        )?,
        "vera" => AdapterConfig::from_json_str(
            r#"{"peft_type": "VERA", "r": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}"#,
            "example",
        )?,
        "fourierft" => AdapterConfig::from_json_str(
            r#"{"peft_type": "FOURIERFT", "n_frequency": 100, "target_modules": ["q_proj", "v_proj"]}"#,
            "example",
        )?,
        "miss" => AdapterConfig::from_json_str(
            r#"{"peft_type": "MISS", "r": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}"#,
            "example",
        )?,
        "c3a" => AdapterConfig::from_json_str(
            r#"{"peft_type": "C3A", "block_size": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}"#,
            "example",
        )?,
        "prompt" => AdapterConfig::from_json_str(r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}"#, "example")?,
        "p_tuning" => AdapterConfig::from_json_str(
            r#"{"peft_type": "P_TUNING", "num_virtual_tokens": 8, "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 32}"#,
            "example",
        )?,
        "prefix" => AdapterConfig::from_json_str(r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8, "prefix_projection": true}"#, "example")?,
        other => anyhow::bail!("unknown method {other}: lora, ia3, loha, lokr, hra, oft, vera, fourierft, miss, c3a, prompt, p_tuning or prefix"),
    }
    .with_task_type(TaskType::CausalLm);
    let model = get_peft_model(base, config, 0)?;
    // model.print_trainable_parameters()
    println!("{}", model.parameter_line());

    // An ordinary training loop: teach the model to continue a counting pattern.
    let ids: Vec<u32> = (0..4 * 32)
        .map(|i| 3 + (i * 5) % (vocab - 3).min(60))
        .collect();
    let ids = Tensor::from_vec(ids, (4, 32), &device)?;
    let batch = CausalLmBatch::from_ids(ids.clone(), None)?;
    let mut opt = AdamW::new(
        model.trainable_vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    model.set_training(true);
    for step in 1..=40 {
        let stats = causal_lm_step(&model, &mut opt, &batch, Some(1.0))?;
        if step % 10 == 0 {
            println!("step {step:>3}  loss {:.4}", stats.loss);
        }
    }
    model.set_training(false);

    // model.save_pretrained(out_dir)
    model.save_pretrained(&out_dir)?;
    let logits = model.forward(&ModelInputs::from_ids(ids.clone()))?;
    peft::checkpoint::write_safetensors(
        &out_dir.join("check.safetensors"),
        &[
            ("input_ids".into(), ids.to_dtype(DType::I64)?),
            ("logits".into(), logits.clone()),
        ],
    )?;
    println!("saved adapter to {}", out_dir.display());

    // model = PeftModel.from_pretrained(base, out_dir)
    let reloaded = PeftModel::from_pretrained(
        peft::models::load_model(&model_dir, DType::F32, &device)?,
        &out_dir,
        false,
    )?;
    let again = reloaded.forward(&ModelInputs::from_ids(ids))?;
    let diff = (again - logits)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    println!("reloaded: max |logit difference| = {diff:e}");
    Ok(())
}
