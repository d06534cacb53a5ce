//! BERT (and BERT-architecture encoders such as MiniLM) as a training-capable
//! [`AdaptableModel`], with transformers' task heads: `BertForSequenceClassification`
//! (`SEQ_CLS`, logits `[B, num_labels]` from the pooled first token),
//! `BertForTokenClassification` (`TOKEN_CLS`, logits `[B, T, num_labels]`) and `BertModel`
//! (`FEATURE_EXTRACTION`, the last hidden state `[B, T, hidden]`). A head missing from the
//! checkpoint (a fresh classifier on a pretrained encoder) is initialised as transformers does.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use peft_core::json::ConfigFields;
use peft_core::{
    AdaptableModel, BaseLayerFactory, EmbeddingId, KvCache, LinearId, ModelBuilder, ModelCore,
    ModelInfo, ModelInputs, ModuleTree, NormIds, PeftError, Result, StoredTensor, TaskType,
    WeightSource,
};
use serde_json::{Map, Value};

use crate::blocks::{Attention, Mlp, Qkv};
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

#[derive(Debug, Clone, Copy)]
struct Layer {
    /// `attention.self.{query,key,value}` and `attention.output.dense`.
    attn: Attention,
    /// `intermediate.dense` and `output.dense`.
    mlp: Mlp,
    attention_norm: NormIds,
    output_norm: NormIds,
}

fn layer_norm(tree: &ModuleTree, x: &Tensor, n: NormIds, eps: f64) -> Result<Tensor> {
    ops::layer_norm(x, tree.param(n.weight), tree.opt_param(n.bias), eps)
}

impl Layer {
    /// Post-norm attention and feed-forward with residuals on `h`.
    #[allow(clippy::too_many_arguments)] // one layer call's inputs, all distinct
    fn forward(
        &self,
        tree: &ModuleTree,
        h: &Tensor,
        mask: &AttentionMask,
        i: usize,
        cache: Option<&mut KvCache>,
        eps: f64,
        scale: f64,
        act: &str,
    ) -> Result<Tensor> {
        let attn = self
            .attn
            .forward(tree, h, None, scale, Some(mask), i, cache)?;
        let a = layer_norm(tree, &(attn + h)?, self.attention_norm, eps)?;
        let m = self.mlp.forward(tree, &a, act)?;
        layer_norm(tree, &(m + a)?, self.output_norm, eps)
    }
}

/// A BERT encoder with one of transformers' heads.
#[derive(Debug, Clone)]
pub struct BertModel {
    cfg: BertConfig,
    core: ModelCore,
    word: EmbeddingId,
    position: EmbeddingId,
    token_type: EmbeddingId,
    embeddings_norm: NormIds,
    layers: Vec<Layer>,
    pooler: Option<LinearId>,
    classifier: Option<LinearId>,
}

impl BertModel {
    /// Builds the model, declaring each module through `b` (tensors under their HF names,
    /// with the `bert.` prefix for heads).
    pub fn build(
        cfg: BertConfig,
        mut b: ModelBuilder<'_>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let mut root = b.root();
        let mut bert = match cfg.prefix() {
            "" => root.pp(""),
            _ => root.container("bert", "BertModel"),
        };
        let mut e = bert.container("embeddings", "BertEmbeddings");
        let pad = cfg.pad_token_id.map(|x| x as usize);
        let word = e.embedding("word_embeddings", cfg.vocab_size, h, pad)?;
        let position = e.embedding("position_embeddings", cfg.max_position_embeddings, h, None)?;
        let token_type = e.embedding("token_type_embeddings", cfg.type_vocab_size, h, None)?;
        let embeddings_norm = e.norm("LayerNorm", "LayerNorm", h, true)?;
        e.module("dropout", "Dropout");
        let mut enc = bert.container("encoder", "BertEncoder");
        let mut stack = enc.container("layer", "ModuleList");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let mut l = stack.container(i, "BertLayer");
            let mut attn = l.container("attention", "BertAttention");
            let mut sa = attn.container("self", "BertSelfAttention");
            let query = sa.linear("query", h, h, true)?;
            let key = sa.linear("key", h, h, true)?;
            let value = sa.linear("value", h, h, true)?;
            sa.module("dropout", "Dropout");
            let mut ao = attn.container("output", "BertSelfOutput");
            let attn_out = ao.linear("dense", h, h, true)?;
            let attention_norm = ao.norm("LayerNorm", "LayerNorm", h, true)?;
            ao.module("dropout", "Dropout");
            let mut im = l.container("intermediate", "BertIntermediate");
            let inter = im.linear("dense", h, cfg.intermediate_size, true)?;
            im.module("intermediate_act_fn", "GELUActivation");
            let mut out = l.container("output", "BertOutput");
            let out_dense = out.linear("dense", cfg.intermediate_size, h, true)?;
            let output_norm = out.norm("LayerNorm", "LayerNorm", h, true)?;
            out.module("dropout", "Dropout");
            layers.push(Layer {
                attn: Attention {
                    qkv: Qkv::Separate {
                        q: query,
                        k: key,
                        v: value,
                    },
                    o: attn_out,
                    heads: cfg.num_attention_heads,
                    kv_heads: cfg.num_attention_heads,
                    head_dim: h / cfg.num_attention_heads,
                },
                mlp: Mlp::Plain {
                    up: inter,
                    down: out_dense,
                },
                attention_norm,
                output_norm,
            });
        }
        let pooler = if cfg.task_type == TaskType::TokenCls {
            None
        } else {
            let mut pl = bert.container("pooler", "BertPooler");
            let dense = pl.linear("dense", h, h, true)?;
            pl.module("activation", "Tanh");
            Some(dense)
        };
        let classifier = match cfg.task_type {
            TaskType::SeqCls | TaskType::TokenCls => {
                root.module("dropout", "Dropout");
                Some(root.head("classifier", h, cfg.num_labels, true, None)?)
            }
            _ => None,
        };
        let tree = b.finish()?;
        let architecture = match cfg.task_type {
            TaskType::SeqCls => "BertForSequenceClassification",
            TaskType::TokenCls => "BertForTokenClassification",
            _ => "BertModel",
        };
        let p = cfg.prefix();
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
            core: ModelCore {
                info,
                tree,
                device: device.clone(),
                dtype,
                gradient_checkpointing: false,
            },
            word,
            position,
            token_type,
            embeddings_norm,
            layers,
            pooler,
            classifier,
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
        Self::from_folder_with(dir, head, dtype.into(), device, seed, Vec::new())
    }

    /// [`BertModel::from_folder`], asking `factories` for the base linear layers first.
    pub fn from_folder_with(
        dir: &Path,
        head: Option<(TaskType, usize)>,
        dtype: crate::Precision,
        device: &Device,
        seed: u64,
        factories: Vec<Box<dyn BaseLayerFactory>>,
    ) -> Result<Self> {
        let (map, source) = crate::blocks::read_config(dir)?;
        let cfg = BertConfig::from_map(map, &source, head)?;
        let weights = ModelWeights::open(dir, dtype, device)?;
        let compute = weights.dtype();
        let fresh = crate::init::random_source(seed, cfg.initializer_range as f32, dtype, device);
        let mut src = BertWeights {
            dir,
            weights,
            fresh,
        };
        let b = ModelBuilder::with_factories(&mut src, factories);
        let mut model = Self::build(cfg, b, compute, device)?;
        model.core.info.name_or_path = Some(dir.display().to_string());
        Ok(model)
    }

    /// A model with random weights, reproducible from `seed`.
    pub fn random(
        cfg: BertConfig,
        seed: u64,
        dtype: impl Into<crate::Precision>,
        device: &Device,
    ) -> Result<Self> {
        let precision = dtype.into();
        let mut src =
            crate::init::random_source(seed, cfg.initializer_range as f32, precision, device);
        Self::build(cfg, ModelBuilder::new(&mut src), precision.compute, device)
    }

    /// The resolved config.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    fn layer_norm(&self, x: &Tensor, n: NormIds) -> Result<Tensor> {
        layer_norm(&self.core.tree, x, n, self.cfg.layer_norm_eps)
    }

    /// The pooler's output `[B, hidden]`: `tanh(W h_first + b)`, what the sequence classifier
    /// reads.
    pub fn pooled_output(&self, inputs: &ModelInputs) -> Result<Tensor> {
        let pooler = self
            .pooler
            .ok_or_else(|| PeftError::InvalidState("this BERT head has no pooler".into()))?;
        let h = self.last_hidden_state(inputs, None)?;
        Ok(self
            .core
            .tree
            .linear(pooler)
            .forward(&h.narrow(1, 0, 1)?.squeeze(1)?)?
            .tanh()?)
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
        let words = crate::blocks::input_embeddings(
            inputs.inputs_embeds.as_ref(),
            inputs.input_ids.as_ref(),
            self.cfg.hidden_size,
            self.core.dtype,
            |ids| self.embed_tokens(ids),
        )?;
        if past + t > self.cfg.max_position_embeddings {
            return Err(PeftError::bad_input(
                "bert input",
                format!("at most {} positions", self.cfg.max_position_embeddings),
                (past + t).to_string(),
            ));
        }
        let positions = match &inputs.position_ids {
            Some(p) => p.to_dtype(DType::U32)?,
            None => crate::blocks::default_positions(b, t, past, &self.core.device)?,
        };
        let types = match &inputs.token_type_ids {
            Some(tt) => tt.to_dtype(DType::U32)?,
            None => Tensor::zeros((b, t), DType::U32, &self.core.device)?,
        };
        let tree = &self.core.tree;
        let position = tree.embedding(self.position).forward(&positions)?;
        let token_type = tree.embedding(self.token_type).forward(&types)?;
        let h = ((words + position.to_dtype(self.core.dtype)?)?
            + token_type.to_dtype(self.core.dtype)?)?;
        let mut h = self.layer_norm(&h, self.embeddings_norm)?;
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
            None => Tensor::zeros((b, 1, 1, s), DType::F32, &self.core.device)?,
        };
        let mask = AttentionMask {
            additive,
            row_valid: None,
            causal_past: None,
        };
        let scale = 1.0 / ((self.cfg.hidden_size / self.cfg.num_attention_heads) as f64).sqrt();
        let (eps, act) = (self.cfg.layer_norm_eps, &self.cfg.hidden_act);
        // Checkpointed layers read the modules through one shared copy of the tree.
        let mut shared_tree: Option<Arc<ModuleTree>> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            h = if peft_core::recompute::active(&self.core) {
                let tree = shared_tree
                    .get_or_insert_with(|| Arc::new(tree.clone()))
                    .clone();
                let (layer, act, mask) = (*layer, act.clone(), mask.clone());
                peft_core::recompute::checkpoint_layer(&h, i, cache.as_deref_mut(), move |x, c| {
                    layer.forward(&tree, x, &mask, i, c, eps, scale, &act)
                })?
            } else {
                layer.forward(tree, &h, &mask, i, cache.as_deref_mut(), eps, scale, act)?
            };
        }
        Ok(h)
    }
}

/// A BERT folder as a [`WeightSource`]: encoder tensors with or without the `bert.` prefix
/// (heads are saved with it, bare encoders without); a head or pooler the checkpoint lacks is
/// initialised as transformers does.
struct BertWeights<'a, F> {
    dir: &'a Path,
    weights: ModelWeights,
    fresh: F,
}

impl<F> BertWeights<'_, F> {
    /// The name under which the checkpoint holds `name`, if it does.
    fn resolve(&self, name: &str) -> Option<String> {
        let alternatives = [
            Some(name.to_string()),
            name.strip_prefix("bert.").map(str::to_string),
            Some(format!("bert.{name}")),
        ];
        alternatives
            .into_iter()
            .flatten()
            .find(|n| self.weights.contains(n))
    }
}

impl<F: FnMut(&str, &[usize]) -> Result<Tensor>> WeightSource for BertWeights<'_, F> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(found) = self.resolve(name) {
            return self.weights.get(&found, shape);
        }
        if name.starts_with("classifier.") || name.contains("pooler.dense.") {
            tracing::warn!(
                "{}: `{name}` is not in the checkpoint; initialising it",
                self.dir.display()
            );
            return (self.fresh)(name, shape);
        }
        self.weights.get(name, shape)
    }

    fn stored(&self, name: &str) -> Result<Option<StoredTensor<'_>>> {
        match self.resolve(name) {
            Some(found) => self.weights.stored(&found),
            None => Ok(None),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    fn origin(&self) -> String {
        self.dir.display().to_string()
    }
}

impl AdaptableModel for BertModel {
    fn core(&self) -> &ModelCore {
        &self.core
    }

    fn replicate_layers(&mut self, map: &[(usize, usize)]) -> Result<()> {
        let prefix = format!("{}encoder.layer", self.cfg.prefix());
        let remap = self
            .core
            .tree
            .replicate_layers(&prefix, self.layers.len(), map)?;
        let layers = remap
            .sources
            .iter()
            .enumerate()
            .map(|(j, &src)| {
                let l = &self.layers[src];
                Ok(Layer {
                    attn: l.attn.remapped(&remap, j)?,
                    mlp: l.mlp.remapped(&remap, j)?,
                    attention_norm: remap.layer_norm(j, l.attention_norm)?,
                    output_norm: remap.layer_norm(j, l.output_norm)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.word = remap.embedding(self.word)?;
        self.position = remap.embedding(self.position)?;
        self.token_type = remap.embedding(self.token_type)?;
        self.embeddings_norm = remap.norm(self.embeddings_norm)?;
        self.pooler = self.pooler.map(|p| remap.linear(p)).transpose()?;
        self.classifier = self.classifier.map(|c| remap.linear(c)).transpose()?;
        self.layers = layers;
        let n = self.layers.len();
        self.cfg.num_hidden_layers = n;
        self.cfg
            .raw
            .insert("num_hidden_layers".into(), Value::from(n));
        self.core.info.num_layers = n;
        Ok(())
    }

    fn core_mut(&mut self) -> &mut ModelCore {
        &mut self.core
    }

    fn supports_gradient_checkpointing(&self) -> bool {
        true
    }

    fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        crate::blocks::lookup(
            &self.core.tree,
            self.word,
            input_ids,
            self.cfg.vocab_size,
            self.core.dtype,
        )
    }

    fn forward(&self, inputs: &ModelInputs, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.last_hidden_state(inputs, cache)?;
        let t = &self.core.tree;
        match (self.cfg.task_type, self.classifier) {
            (TaskType::SeqCls, Some(classifier)) => {
                let pooler = self
                    .pooler
                    .ok_or_else(|| PeftError::InvalidState("no pooler".into()))?;
                let first = h.narrow(1, 0, 1)?.squeeze(1)?;
                t.linear(classifier)
                    .forward(&t.linear(pooler).forward(&first)?.tanh()?)
            }
            (TaskType::TokenCls, Some(classifier)) => t.linear(classifier).forward(&h),
            _ => Ok(h),
        }
    }

    fn config_json(&self) -> Value {
        let mut v = crate::config_with(&self.cfg.raw, false, self.core.dtype);
        if let Value::Object(m) = &mut v {
            m.insert(
                "architectures".into(),
                Value::from(vec![self.core.info.architecture.clone()]),
            );
            if self.classifier.is_some() {
                m.insert("num_labels".into(), Value::from(self.cfg.num_labels));
            }
        }
        v
    }
}
