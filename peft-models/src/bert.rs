//! BERT (and BERT-architecture encoders such as MiniLM) as a training-capable
//! [`AdaptableModel`], with transformers' task heads: `BertForSequenceClassification`
//! (`SEQ_CLS`, logits `[B, num_labels]` from the pooled first token),
//! `BertForTokenClassification` (`TOKEN_CLS`, logits `[B, T, num_labels]`) and `BertModel`
//! (`FEATURE_EXTRACTION`, the last hidden state `[B, T, hidden]`). A head missing from the
//! checkpoint (a fresh classifier on a pretrained encoder) is initialised as transformers does.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use peft_core::json::{parse_object, ConfigFields};
use peft_core::layers::{DenseEmbedding, DenseLinear, EmbeddingSlot, LinearSlot};
use peft_core::{
    AdaptableModel, KvCache, ModelInfo, ModelInputs, ModuleEntry, ModuleKind, PeftError, Result,
    TaskType,
};
use serde_json::{Map, Value};

use crate::ops::{self, AttentionMask};
use crate::weights::ModelWeights;

/// A resolved BERT configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// MLP size.
    pub intermediate_size: usize,
    /// MLP activation.
    pub hidden_act: String,
    /// Position embeddings.
    pub max_position_embeddings: usize,
    /// Segment embeddings.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Padding id.
    pub pad_token_id: Option<u32>,
    /// Classes of the head (`num_labels` or the size of `id2label`).
    pub num_labels: usize,
    /// Initializer std (fresh heads, random models).
    pub initializer_range: f64,
    /// The head: `SEQ_CLS`, `TOKEN_CLS` or `FEATURE_EXTRACTION`.
    pub task_type: TaskType,
    /// The config.json object as read.
    pub raw: Map<String, Value>,
}

impl BertConfig {
    /// Resolves a parsed `config.json`; the head comes from `architectures` (and `num_labels`
    /// or `id2label`) unless `head` gives the task and the number of labels.
    pub fn from_map(
        raw: Map<String, Value>,
        source: &str,
        head: Option<(TaskType, usize)>,
    ) -> Result<Self> {
        let task = head.map(|(t, _)| t);
        let mut f = ConfigFields::new(source, raw.clone());
        let arch = raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or("BertModel");
        let task_type = task.unwrap_or(if arch.ends_with("ForSequenceClassification") {
            TaskType::SeqCls
        } else if arch.ends_with("ForTokenClassification") {
            TaskType::TokenCls
        } else {
            TaskType::FeatureExtraction
        });
        if !matches!(
            task_type,
            TaskType::SeqCls | TaskType::TokenCls | TaskType::FeatureExtraction
        ) {
            return Err(PeftError::config_value(
                source,
                "task",
                "SEQ_CLS, TOKEN_CLS or FEATURE_EXTRACTION",
                task_type,
            ));
        }
        let id2label = raw
            .get("id2label")
            .and_then(Value::as_object)
            .map(|m| m.len());
        let num_labels = match (head, f.take_raw("num_labels")) {
            (Some((_, n)), _) => n,
            (None, Some(v)) => v
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| f.type_error("num_labels", "an integer", &v))?,
            (None, None) => id2label.unwrap_or(2),
        };
        if let Some(kind) = f.take_opt_string("position_embedding_type")? {
            if kind != "absolute" {
                return Err(PeftError::Unsupported {
                    source_name: source.into(),
                    key: "position_embedding_type".into(),
                    value: format!("\"{kind}\""),
                    reason: "only absolute position embeddings are implemented".into(),
                });
            }
        }
        let hidden_size = f.take_usize("hidden_size", 768)?;
        let num_attention_heads = f.take_usize("num_attention_heads", 12)?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(PeftError::config_value(
                source,
                "num_attention_heads",
                format!("a divisor of {hidden_size}"),
                num_attention_heads,
            ));
        }
        Ok(BertConfig {
            vocab_size: f.take_usize("vocab_size", 30522)?,
            hidden_size,
            num_hidden_layers: f.take_usize("num_hidden_layers", 12)?,
            num_attention_heads,
            intermediate_size: f.take_usize("intermediate_size", 3072)?,
            hidden_act: f
                .take_opt_string("hidden_act")?
                .unwrap_or_else(|| "gelu".into()),
            max_position_embeddings: f.take_usize("max_position_embeddings", 512)?,
            type_vocab_size: f.take_usize("type_vocab_size", 2)?,
            layer_norm_eps: f.take_f64("layer_norm_eps", 1e-12)?,
            pad_token_id: match f.take_raw("pad_token_id") {
                Some(Value::Number(n)) => n.as_u64().map(|v| v as u32),
                _ => None,
            },
            num_labels,
            initializer_range: f.take_f64("initializer_range", 0.02)?,
            task_type,
            raw,
        })
    }

    fn prefix(&self) -> &'static str {
        if self.task_type == TaskType::FeatureExtraction {
            ""
        } else {
            "bert."
        }
    }
}

#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

#[derive(Debug, Clone)]
struct Layer {
    /// query, key, value, attention.output.dense, intermediate.dense, output.dense
    linears: [LinearSlot; 6],
    attention_norm: Norm,
    output_norm: Norm,
}

const LAYER_LINEARS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// A BERT encoder with one of transformers' heads.
#[derive(Debug, Clone)]
pub struct BertModel {
    cfg: BertConfig,
    info: ModelInfo,
    word: EmbeddingSlot,
    position: EmbeddingSlot,
    token_type: EmbeddingSlot,
    embeddings_norm: Norm,
    layers: Vec<Layer>,
    pooler: Option<LinearSlot>,
    classifier: Option<LinearSlot>,
    device: Device,
    dtype: DType,
}

type Source<'a> = dyn FnMut(&str, &[usize]) -> Result<Tensor> + 'a;

fn linear(src: &mut Source<'_>, name: &str, out: usize, inp: usize) -> Result<LinearSlot> {
    let w = src(&format!("{name}.weight"), &[out, inp])?;
    let b = src(&format!("{name}.bias"), &[out])?;
    Ok(DenseLinear::new(w, Some(b))?.into_slot())
}

fn norm(src: &mut Source<'_>, name: &str, dim: usize) -> Result<Norm> {
    Ok(Norm {
        weight: src(&format!("{name}.weight"), &[dim])?,
        bias: src(&format!("{name}.bias"), &[dim])?,
    })
}

impl BertModel {
    /// Builds the model, taking each tensor from `src` by its HF name (with the `bert.` prefix
    /// for heads).
    pub fn build(
        cfg: BertConfig,
        src: &mut Source<'_>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let p = cfg.prefix();
        let h = cfg.hidden_size;
        let emb = |src: &mut Source<'_>,
                   name: &str,
                   rows: usize,
                   pad: Option<usize>|
         -> Result<EmbeddingSlot> {
            Ok(DenseEmbedding::new(
                src(&format!("{p}embeddings.{name}.weight"), &[rows, h])?,
                pad,
            )?
            .into_slot())
        };
        let word = emb(
            src,
            "word_embeddings",
            cfg.vocab_size,
            cfg.pad_token_id.map(|x| x as usize),
        )?;
        let position = emb(
            src,
            "position_embeddings",
            cfg.max_position_embeddings,
            None,
        )?;
        let token_type = emb(src, "token_type_embeddings", cfg.type_vocab_size, None)?;
        let embeddings_norm = norm(src, &format!("{p}embeddings.LayerNorm"), h)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{p}encoder.layer.{i}");
            let i_size = cfg.intermediate_size;
            layers.push(Layer {
                linears: [
                    linear(src, &format!("{l}.attention.self.query"), h, h)?,
                    linear(src, &format!("{l}.attention.self.key"), h, h)?,
                    linear(src, &format!("{l}.attention.self.value"), h, h)?,
                    linear(src, &format!("{l}.attention.output.dense"), h, h)?,
                    linear(src, &format!("{l}.intermediate.dense"), i_size, h)?,
                    linear(src, &format!("{l}.output.dense"), h, i_size)?,
                ],
                attention_norm: norm(src, &format!("{l}.attention.output.LayerNorm"), h)?,
                output_norm: norm(src, &format!("{l}.output.LayerNorm"), h)?,
            });
        }
        let pooler = if cfg.task_type == TaskType::TokenCls {
            None
        } else {
            Some(linear(src, &format!("{p}pooler.dense"), h, h)?)
        };
        let classifier = match cfg.task_type {
            TaskType::SeqCls | TaskType::TokenCls => {
                Some(linear(src, "classifier", cfg.num_labels, h)?)
            }
            _ => None,
        };
        let architecture = match cfg.task_type {
            TaskType::SeqCls => "BertForSequenceClassification",
            TaskType::TokenCls => "BertForTokenClassification",
            _ => "BertModel",
        };
        let info = ModelInfo {
            model_type: "bert".into(),
            architecture: architecture.into(),
            task_type: cfg.task_type,
            num_layers: cfg.num_hidden_layers,
            hidden_size: h,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            vocab_size: cfg.vocab_size,
            input_embedding: Some(format!("{p}embeddings.word_embeddings")),
            output_heads: if classifier.is_some() {
                vec!["classifier".into()]
            } else {
                Vec::new()
            },
            tie_word_embeddings: false,
            is_encoder_decoder: false,
            decoder_start_token_id: None,
            num_labels: classifier.as_ref().map(|_| cfg.num_labels),
            name_or_path: None,
        };
        Ok(BertModel {
            cfg,
            info,
            word,
            position,
            token_type,
            embeddings_norm,
            layers,
            pooler,
            classifier,
            device: device.clone(),
            dtype,
        })
    }

    /// Loads a Hugging Face folder. With `head` (task, number of labels), builds that head
    /// whatever the checkpoint's architecture; a head (or pooler) the checkpoint lacks is
    /// initialised as transformers does (normal with `initializer_range`, zero bias), seeded by
    /// `seed`. Encoder weights may be stored with or without the `bert.` prefix.
    pub fn from_folder(
        dir: &Path,
        head: Option<(TaskType, usize)>,
        dtype: impl Into<crate::Precision>,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let dtype = dtype.into();
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| PeftError::io(&config_path, e))?;
        let source = config_path.display().to_string();
        let cfg = BertConfig::from_map(parse_object(&text, &source)?, &source, head)?;
        let weights = ModelWeights::open(dir, dtype, device)?;
        let mut fresh =
            crate::init::random_source(seed, cfg.initializer_range as f32, dtype, device);
        let mut src = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let alternatives = [
                name.to_string(),
                name.strip_prefix("bert.")
                    .map(str::to_string)
                    .unwrap_or_default(),
                format!("bert.{name}"),
            ];
            if let Some(found) = alternatives
                .iter()
                .find(|n| !n.is_empty() && weights.contains(n))
            {
                return weights.get(found, shape);
            }
            let head = name.starts_with("classifier.") || name.contains("pooler.dense.");
            if head {
                tracing::warn!(
                    "{}: `{name}` is not in the checkpoint; initialising it",
                    dir.display()
                );
                return fresh(name, shape);
            }
            weights.get(name, shape)
        };
        let mut model = Self::build(cfg, &mut src, weights.dtype(), device)?;
        model.info.name_or_path = Some(dir.display().to_string());
        Ok(model)
    }

    /// A model with random weights, reproducible from `seed`.
    pub fn random(cfg: BertConfig, seed: u64, dtype: impl Into<crate::Precision>, device: &Device) -> Result<Self> {
        let precision = dtype.into();
        let mut src = crate::init::random_source(seed, cfg.initializer_range as f32, precision, device);
        Self::build(cfg, &mut src, precision.compute, device)
    }

    /// The resolved config.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    fn layer_norm(&self, x: &Tensor, n: &Norm) -> Result<Tensor> {
        ops::layer_norm(x, &n.weight, Some(&n.bias), self.cfg.layer_norm_eps)
    }

    /// The pooler's output `[B, hidden]`: `tanh(W h_first + b)`, what the sequence classifier
    /// reads.
    pub fn pooled_output(&self, inputs: &ModelInputs) -> Result<Tensor> {
        let pooler = self
            .pooler
            .as_ref()
            .ok_or_else(|| PeftError::InvalidState("this BERT head has no pooler".into()))?;
        let h = self.last_hidden_state(inputs, None)?;
        Ok(pooler.forward(&h.narrow(1, 0, 1)?.squeeze(1)?)?.tanh()?)
    }

    /// The encoder's last hidden state `[B, T, hidden]` (prefix positions excluded).
    pub fn last_hidden_state(
        &self,
        inputs: &ModelInputs,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        inputs.check_supported("bert", false, true)?;
        let (b, t) = inputs.batch_and_len()?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let words = match (&inputs.inputs_embeds, &inputs.input_ids) {
            (Some(e), _) => e.to_dtype(self.dtype)?,
            (None, Some(ids)) => self.embed_tokens(ids)?,
            (None, None) => unreachable!("batch_and_len checked the inputs"),
        };
        if past + t > self.cfg.max_position_embeddings {
            return Err(PeftError::bad_input(
                "bert input",
                format!("at most {} positions", self.cfg.max_position_embeddings),
                (past + t).to_string(),
            ));
        }
        let positions = match &inputs.position_ids {
            Some(p) => p.to_dtype(DType::U32)?,
            None => Tensor::arange(past as u32, (past + t) as u32, &self.device)?
                .unsqueeze(0)?
                .expand((b, t))?,
        };
        let types = match &inputs.token_type_ids {
            Some(tt) => tt.to_dtype(DType::U32)?,
            None => Tensor::zeros((b, t), DType::U32, &self.device)?,
        };
        let h = ((words + self.position.forward(&positions)?.to_dtype(self.dtype)?)?
            + self.token_type.forward(&types)?.to_dtype(self.dtype)?)?;
        let mut h = self.layer_norm(&h, &self.embeddings_norm)?;
        let s = past + t;
        let additive = match &inputs.attention_mask {
            Some(m) => {
                if m.dims() != [b, s] {
                    return Err(PeftError::bad_input(
                        "attention_mask",
                        format!("shape [{b}, {s}]"),
                        format!("{:?}", m.dims()),
                    ));
                }
                ((m.to_dtype(DType::F32)? - 1.0)? * 1.0e30)?.reshape((b, 1, 1, s))?
            }
            None => Tensor::zeros((b, 1, 1, s), DType::F32, &self.device)?,
        };
        let mask = AttentionMask {
            additive,
            row_valid: None,
            causal_past: None,
        };
        let (nh, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.hidden_size / self.cfg.num_attention_heads,
        );
        let heads =
            |x: Tensor| -> Result<Tensor> { Ok(x.reshape((b, t, nh, hd))?.transpose(1, 2)?) };
        for (i, layer) in self.layers.iter().enumerate() {
            let [q, k, v, o, inter, out] = &layer.linears;
            let (kk, vv) = ops::cache_kv(
                heads(k.forward(&h)?)?,
                heads(v.forward(&h)?)?,
                i,
                cache.as_deref_mut(),
            )?;
            let attn = ops::attention(
                &heads(q.forward(&h)?)?,
                &kk,
                &vv,
                1.0 / (hd as f64).sqrt(),
                Some(&mask),
            )?;
            let attn = attn
                .transpose(1, 2)?
                .reshape((b, t, self.cfg.hidden_size))?;
            let a = self.layer_norm(&(o.forward(&attn)? + &h)?, &layer.attention_norm)?;
            let m = ops::activation(&self.cfg.hidden_act, &inter.forward(&a)?)?;
            h = self.layer_norm(&(out.forward(&m)? + a)?, &layer.output_norm)?;
        }
        Ok(h)
    }
}

impl AdaptableModel for BertModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn modules(&self) -> Vec<ModuleEntry> {
        let p = self.cfg.prefix();
        let other = |s: String, c: &'static str| ModuleEntry::new(s, ModuleKind::Other(c));
        let mut out = Vec::new();
        if !p.is_empty() {
            out.push(other("bert".into(), "BertModel"));
        }
        out.push(other(format!("{p}embeddings"), "BertEmbeddings"));
        for n in [
            "word_embeddings",
            "position_embeddings",
            "token_type_embeddings",
        ] {
            out.push(ModuleEntry::new(
                format!("{p}embeddings.{n}"),
                ModuleKind::Embedding,
            ));
        }
        out.push(other(format!("{p}embeddings.LayerNorm"), "LayerNorm"));
        out.push(other(format!("{p}embeddings.dropout"), "Dropout"));
        out.push(other(format!("{p}encoder"), "BertEncoder"));
        out.push(other(format!("{p}encoder.layer"), "ModuleList"));
        for i in 0..self.layers.len() {
            let l = format!("{p}encoder.layer.{i}");
            out.push(other(l.clone(), "BertLayer"));
            out.push(other(format!("{l}.attention"), "BertAttention"));
            out.push(other(format!("{l}.attention.self"), "BertSelfAttention"));
            for n in ["query", "key", "value"] {
                out.push(ModuleEntry::new(
                    format!("{l}.attention.self.{n}"),
                    ModuleKind::Linear,
                ));
            }
            out.push(other(format!("{l}.attention.self.dropout"), "Dropout"));
            out.push(other(format!("{l}.attention.output"), "BertSelfOutput"));
            out.push(ModuleEntry::new(
                format!("{l}.attention.output.dense"),
                ModuleKind::Linear,
            ));
            out.push(other(
                format!("{l}.attention.output.LayerNorm"),
                "LayerNorm",
            ));
            out.push(other(format!("{l}.attention.output.dropout"), "Dropout"));
            out.push(other(format!("{l}.intermediate"), "BertIntermediate"));
            out.push(ModuleEntry::new(
                format!("{l}.intermediate.dense"),
                ModuleKind::Linear,
            ));
            out.push(other(
                format!("{l}.intermediate.intermediate_act_fn"),
                "GELUActivation",
            ));
            out.push(other(format!("{l}.output"), "BertOutput"));
            out.push(ModuleEntry::new(
                format!("{l}.output.dense"),
                ModuleKind::Linear,
            ));
            out.push(other(format!("{l}.output.LayerNorm"), "LayerNorm"));
            out.push(other(format!("{l}.output.dropout"), "Dropout"));
        }
        if self.pooler.is_some() {
            out.push(other(format!("{p}pooler"), "BertPooler"));
            out.push(ModuleEntry::new(
                format!("{p}pooler.dense"),
                ModuleKind::Linear,
            ));
            out.push(other(format!("{p}pooler.activation"), "Tanh"));
        }
        if self.classifier.is_some() {
            out.push(other("dropout".into(), "Dropout"));
            out.push(ModuleEntry::new("classifier", ModuleKind::Linear));
        }
        out
    }

    fn visit_linears(
        &mut self,
        f: &mut dyn FnMut(&str, &mut LinearSlot) -> Result<()>,
    ) -> Result<()> {
        let p = self.cfg.prefix();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (slot, n) in layer.linears.iter_mut().zip(LAYER_LINEARS) {
                f(&format!("{p}encoder.layer.{i}.{n}"), slot)?;
            }
        }
        if let Some(pooler) = &mut self.pooler {
            f(&format!("{p}pooler.dense"), pooler)?;
        }
        if let Some(classifier) = &mut self.classifier {
            f("classifier", classifier)?;
        }
        Ok(())
    }

    fn visit_embeddings(
        &mut self,
        f: &mut dyn FnMut(&str, &mut EmbeddingSlot) -> Result<()>,
    ) -> Result<()> {
        let p = self.cfg.prefix();
        f(&format!("{p}embeddings.word_embeddings"), &mut self.word)?;
        f(
            &format!("{p}embeddings.position_embeddings"),
            &mut self.position,
        )?;
        f(
            &format!("{p}embeddings.token_type_embeddings"),
            &mut self.token_type,
        )
    }

    fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        crate::check_token_ids(input_ids, self.cfg.vocab_size)?;
        Ok(self
            .word
            .forward(&input_ids.to_dtype(DType::U32)?)?
            .to_dtype(self.dtype)?)
    }

    fn forward(&self, inputs: &ModelInputs, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.last_hidden_state(inputs, cache)?;
        match (self.cfg.task_type, &self.classifier) {
            (TaskType::SeqCls, Some(classifier)) => {
                let pooler = self
                    .pooler
                    .as_ref()
                    .ok_or_else(|| PeftError::InvalidState("no pooler".into()))?;
                let first = h.narrow(1, 0, 1)?.squeeze(1)?;
                classifier.forward(&pooler.forward(&first)?.tanh()?)
            }
            (TaskType::TokenCls, Some(classifier)) => classifier.forward(&h),
            _ => Ok(h),
        }
    }

    fn num_parameters(&self) -> usize {
        let c = &self.cfg;
        let mut n = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * c.hidden_size
            + 2 * c.hidden_size;
        for layer in &self.layers {
            n += layer.linears.iter().map(|l| l.num_params()).sum::<usize>() + 4 * c.hidden_size;
        }
        n += self.pooler.as_ref().map_or(0, |l| l.num_params());
        n + self.classifier.as_ref().map_or(0, |l| l.num_params())
    }

    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let p = self.cfg.prefix();
        let mut out = vec![
            (
                format!("{p}embeddings.word_embeddings.weight"),
                self.word.weight()?,
            ),
            (
                format!("{p}embeddings.position_embeddings.weight"),
                self.position.weight()?,
            ),
            (
                format!("{p}embeddings.token_type_embeddings.weight"),
                self.token_type.weight()?,
            ),
            (
                format!("{p}embeddings.LayerNorm.weight"),
                self.embeddings_norm.weight.clone(),
            ),
            (
                format!("{p}embeddings.LayerNorm.bias"),
                self.embeddings_norm.bias.clone(),
            ),
        ];
        let mut push = |name: String, slot: &LinearSlot| -> Result<()> {
            out.push((format!("{name}.weight"), slot.weight()?));
            if let Some(b) = slot.bias() {
                out.push((format!("{name}.bias"), b.clone()));
            }
            Ok(())
        };
        for (i, layer) in self.layers.iter().enumerate() {
            for (slot, n) in layer.linears.iter().zip(LAYER_LINEARS) {
                push(format!("{p}encoder.layer.{i}.{n}"), slot)?;
            }
        }
        if let Some(pooler) = &self.pooler {
            push(format!("{p}pooler.dense"), pooler)?;
        }
        if let Some(classifier) = &self.classifier {
            push("classifier".into(), classifier)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            for (n, norm) in [
                ("attention.output.LayerNorm", &layer.attention_norm),
                ("output.LayerNorm", &layer.output_norm),
            ] {
                out.push((
                    format!("{p}encoder.layer.{i}.{n}.weight"),
                    norm.weight.clone(),
                ));
                out.push((format!("{p}encoder.layer.{i}.{n}.bias"), norm.bias.clone()));
            }
        }
        Ok(out)
    }

    fn config_json(&self) -> Value {
        let mut v = crate::config_with(&self.cfg.raw, false, self.dtype);
        if let Value::Object(m) = &mut v {
            m.insert(
                "architectures".into(),
                Value::from(vec![self.info.architecture.clone()]),
            );
            if self.classifier.is_some() {
                m.insert("num_labels".into(), Value::from(self.cfg.num_labels));
            }
        }
        v
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
