//! Text classification on a real pretrained encoder with real text: which Debian `fortunes`
//! file (computers, politics, science, work) a fortune comes from, with MiniLM-L6
//! (sentence-transformers/all-MiniLM-L6-v2, BERT architecture) as the frozen base.
//!
//! Two ways of training, compared on the same fixed held-out 20%:
//! 1. the classification head alone on the frozen encoder's pooled output;
//! 2. the head plus LoRA (r=8, alpha=16, on query/value, peft's BERT defaults), the head trained
//!    through `modules_to_save` as peft's `SEQ_CLS` task does.
//!
//! `scripts/classify-fortunes.sh` fetches the model and the text and runs:
//! `cargo run --release -p peft --example classify_fortunes -- MODEL_DIR FORTUNES_DIR [OUT_DIR]`

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use peft::models::BertModel;
use peft::rand::rngs::StdRng;
use peft::rand::seq::SliceRandom;
use peft::rand::SeedableRng;
use peft::training::{train_step, Batch, ClassificationBatch};
use peft::{get_peft_model, AdapterConfig, ModelInputs, PeftModel, TaskType};

const CATEGORIES: [&str; 4] = ["computers", "politics", "science", "work"];
const PER_CLASS: usize = 400;
const MAX_TOKENS: usize = 64;
const BATCH: usize = 16;
const SEED: u64 = 7;

struct Example {
    ids: Vec<u32>,
    label: usize,
}

/// Fortunes of one file: entries separated by lines holding a single `%`.
fn read_fortunes(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    Ok(text
        .split("\n%\n")
        .map(|f| f.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|f| f.len() >= 20 && f.len() <= 600)
        .collect())
}

/// A fixed, stratified split: per category, `PER_CLASS` fortunes in a seeded order, the last
/// 20% held out.
fn dataset(dir: &Path, tokenizer: &tokenizers::Tokenizer) -> Result<(Vec<Example>, Vec<Example>)> {
    let mut rng = StdRng::seed_from_u64(SEED);
    let (mut train, mut held_out) = (Vec::new(), Vec::new());
    for (label, name) in CATEGORIES.iter().enumerate() {
        let mut fortunes = read_fortunes(&dir.join(name))?;
        fortunes.sort();
        fortunes.dedup();
        fortunes.shuffle(&mut rng);
        fortunes.truncate(PER_CLASS);
        if fortunes.len() < 50 {
            bail!(
                "{}: only {} fortunes",
                dir.join(name).display(),
                fortunes.len()
            );
        }
        let cut = fortunes.len() * 4 / 5;
        for (i, text) in fortunes.iter().enumerate() {
            let enc = tokenizer
                .encode(text.as_str(), true)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
            let mut ids = enc.get_ids().to_vec();
            if ids.len() > MAX_TOKENS {
                let sep = *ids.last().unwrap_or(&102);
                ids.truncate(MAX_TOKENS - 1);
                ids.push(sep);
            }
            let ex = Example { ids, label };
            if i < cut {
                train.push(ex)
            } else {
                held_out.push(ex)
            }
        }
    }
    train.shuffle(&mut rng);
    Ok((train, held_out))
}

/// Pads a slice of examples into ids, mask and labels.
fn tensors(examples: &[&Example]) -> Result<(Tensor, Tensor, Tensor)> {
    let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for e in examples {
        ids.extend(
            e.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, len - e.ids.len())),
        );
        mask.extend(
            std::iter::repeat_n(1u32, e.ids.len()).chain(std::iter::repeat_n(0, len - e.ids.len())),
        );
    }
    let dev = Device::Cpu;
    let labels: Vec<i64> = examples.iter().map(|e| e.label as i64).collect();
    Ok((
        Tensor::from_vec(ids, (examples.len(), len), &dev)?,
        Tensor::from_vec(mask, (examples.len(), len), &dev)?,
        Tensor::from_vec(labels, examples.len(), &dev)?,
    ))
}

fn accuracy(predicted: &Tensor, labels: &Tensor) -> Result<usize> {
    let p: Vec<u32> = predicted.argmax(D::Minus1)?.to_vec1()?;
    let l: Vec<i64> = labels.to_vec1()?;
    Ok(p.iter()
        .zip(&l)
        .filter(|(p, l)| i64::from(**p) == **l)
        .count())
}

fn base(dir: &Path) -> Result<BertModel> {
    Ok(BertModel::from_folder(
        dir,
        Some((TaskType::SeqCls, CATEGORIES.len())),
        DType::F32,
        &Device::Cpu,
        SEED,
    )?)
}

/// 1. The head alone: pooled features of the frozen encoder, then a linear classifier.
fn head_alone(
    dir: &Path,
    train: &[Example],
    held_out: &[Example],
    epochs: usize,
) -> Result<(f64, f32)> {
    let started = Instant::now();
    let encoder = base(dir)?;
    let features = |set: &[Example]| -> Result<(Tensor, Tensor)> {
        let (mut feats, mut labels) = (Vec::new(), Vec::new());
        for chunk in set.chunks(32) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (ids, mask, l) = tensors(&refs)?;
            feats.push(encoder.pooled_output(&ModelInputs::from_ids(ids).with_mask(Some(mask)))?);
            labels.push(l);
        }
        Ok((Tensor::cat(&feats, 0)?, Tensor::cat(&labels, 0)?))
    };
    let (xs, ys) = features(train)?;
    let (hx, hy) = features(held_out)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let head = candle_nn::linear(xs.dim(1)?, CATEGORIES.len(), vb.pp("classifier"))?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let n = xs.dim(0)?;
    for epoch in 1..=epochs * 10 {
        for start in (0..n).step_by(BATCH) {
            let len = BATCH.min(n - start);
            let logits = candle_nn::Module::forward(&head, &xs.narrow(0, start, len)?)?;
            let (loss, _) = peft::loss::cross_entropy(&logits, &ys.narrow(0, start, len)?)?;
            opt.backward_step(&loss)?;
        }
        if epoch % 10 == 0 {
            let acc =
                accuracy(&candle_nn::Module::forward(&head, &hx)?, &hy)? as f64 / hy.dim(0)? as f64;
            println!(
                "  head alone, epoch {:>3}: held-out accuracy {:.1}%",
                epoch,
                100.0 * acc
            );
        }
    }
    let acc = accuracy(&candle_nn::Module::forward(&head, &hx)?, &hy)? as f64 / hy.dim(0)? as f64;
    Ok((acc, started.elapsed().as_secs_f32()))
}

fn evaluate(model: &PeftModel, set: &[Example]) -> Result<f64> {
    let mut right = 0;
    for chunk in set.chunks(32) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (ids, mask, labels) = tensors(&refs)?;
        right += accuracy(
            &model.forward(&ModelInputs::from_ids(ids).with_mask(Some(mask)))?,
            &labels,
        )?;
    }
    Ok(right as f64 / set.len() as f64)
}

/// 2. The head plus LoRA on the encoder.
fn head_and_lora(
    dir: &Path,
    train: &[Example],
    held_out: &[Example],
    epochs: usize,
    out: &Path,
) -> Result<(f64, f32, String)> {
    let started = Instant::now();
    let config = AdapterConfig::from_json_str(
        r#"{"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1}"#,
        "example",
    )?;
    let model = get_peft_model(Box::new(base(dir)?), config, SEED)?;
    let line = model.parameter_line();
    println!("  {line}");
    let mut opt = AdamW::new(
        model.trainable_vars(),
        ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    for epoch in 1..=epochs {
        model.set_training(true);
        let (mut total, mut steps) = (0.0, 0);
        for chunk in train.chunks(BATCH) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (input_ids, attention_mask, labels) = tensors(&refs)?;
            let batch = Batch::Classification(ClassificationBatch {
                input_ids,
                attention_mask: Some(attention_mask),
                labels,
            });
            total += train_step(&model, &mut opt, &batch, Some(1.0))?.loss;
            steps += 1;
        }
        model.set_training(false);
        let acc = evaluate(&model, held_out)?;
        println!(
            "  head + LoRA, epoch {epoch}: train loss {:.4}, held-out accuracy {:.1}%",
            total / steps as f32,
            100.0 * acc
        );
    }
    model.save_pretrained(out)?;
    let acc = evaluate(&model, held_out)?;
    // The saved adapter gives the same predictions when loaded again.
    let reloaded = PeftModel::from_pretrained(Box::new(base(dir)?), out, false)?;
    let again = evaluate(&reloaded, held_out)?;
    if (again - acc).abs() > 1e-9 {
        bail!("the reloaded adapter scores {again} instead of {acc}");
    }
    Ok((acc, started.elapsed().as_secs_f32(), line))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model_dir = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "models/all-minilm-l6-v2".into()),
    );
    let fortunes = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "/usr/share/games/fortunes".into()),
    );
    let out = PathBuf::from(args.next().unwrap_or_else(|| "out/fortunes-lora".into()));
    let epochs: usize = std::env::var("EPOCHS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let tokenizer = tokenizers::Tokenizer::from_file(model_dir.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", model_dir.join("tokenizer.json").display()))?;
    let (train, held_out) = dataset(&fortunes, &tokenizer)?;
    println!(
        "fortunes {:?}: {} training and {} held-out examples (at most {MAX_TOKENS} tokens)",
        CATEGORIES,
        train.len(),
        held_out.len()
    );
    let (head_acc, head_secs) = head_alone(&model_dir, &train, &held_out, epochs)?;
    let (lora_acc, lora_secs, line) = head_and_lora(&model_dir, &train, &held_out, epochs, &out)?;
    let size = std::fs::metadata(out.join("adapter_model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!("\n| training | held-out accuracy | wall time |");
    println!("|---|---|---|");
    println!(
        "| head alone (frozen MiniLM) | {:.1}% | {head_secs:.0} s |",
        100.0 * head_acc
    );
    println!(
        "| head + LoRA r=8 | {:.1}% | {lora_secs:.0} s |",
        100.0 * lora_acc
    );
    println!(
        "\nLoRA: {line}; adapter saved to {} ({size} bytes)",
        out.display()
    );
    println!("chance: {:.1}%", 100.0 / CATEGORIES.len() as f64);
    Ok(())
}
