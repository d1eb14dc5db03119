"""The config groups: every flag of every step is a field here, with its default and, under it, its one line of help.

The CLI builds each command's flat flags (`--lr`, not `--training.lr`) from these fields and their docstrings, and the
Python API takes the groups themselves. A field's bound lives in `bounds.BOUNDS` under the same name, and each group's
`validate` checks its fields against it, so a range is stated once for the command line, the API and a search space.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import textwrap
from dataclasses import dataclass, field, fields
from typing import Any

from compress.infra.tracking import DEFAULT_EXPERIMENT, DEFAULT_STORAGE, DEFAULT_TRACKING
from compress.options.bounds import check_all, check_choice, check_devices


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it, as litgpt writes them), joined into one paragraph."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


# --- groups every training step shares ---------------------------------------------------------------------------

@dataclass
class DataConfig:
    """Which rows: a task or a folder, its columns, and how much of it."""

    task: str | None = None
    """a GLUE task (sst2, mnli, ...) or bbc-news, the offline demo task. Exclusive with --data."""
    data: str | None = None
    """a folder with train and dev files (.tsv, .csv or .jsonl) holding a text and a label column."""
    text_column: str | None = None
    """column(s) holding the text, "a" or "a,b" for pairs (default: sentence or text, or a known pair)."""
    label_column: str = "label"
    """column holding the label."""
    quoting: str = "auto"
    """how quote characters in .tsv and .csv files are read: csv (a field holding one is wrapped in quotes and doubles
    them, as pandas' to_csv and Python's csv module write), none (quotes are text, as in GLUE's TSVs) or auto (a .csv
    is csv; a .tsv is csv when every quote belongs to such a wrapped field and some field doubles a quote, the header
    is quoted or a quoted field spans tabs or lines, else none). The one used is logged as a param."""
    max_length: int | None = None
    """tokens per example; longer inputs are truncated (default: the smaller of 128 and the fewest positions any
    model in the run takes)."""
    max_train: int | None = None
    """use a seeded random subset of this many training rows (for every use of them: importance, calibration,
    training)."""


@dataclass
class TrainingConfig:
    """What is learned and how: a resume that changes any of these is refused."""

    epochs: int = 3
    """passes over the training data."""
    batch_size: int = 32
    """examples per optimizer step (per device); prune scores importance on batches of this size too."""
    lr: float = 1e-4
    """peak learning rate of AdamW, after linear warmup then linear decay."""
    warmup: float = 0.1
    """fraction of the training steps spent warming the learning rate up."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm)."""
    seed: int = 42
    """seed for data order, initialisation, dropout, and the random choices of a step (prune's random criterion,
    share's calibration rows)."""

    def validate(self, training: bool = True) -> None:
        """training=False: 0 epochs is allowed (prune or share without recovery scores and saves the model as is)."""
        if training:
            check_all(epochs=self.epochs)
        check_all(batch_size=self.batch_size, lr=self.lr, warmup=self.warmup, weight_decay=self.weight_decay,
                  seed=self.seed)


@dataclass
class LossConfig:
    """What a student learns from its teacher (distill's teacher, or the parent that prune and share recover from)."""

    temperature: float = 2.0
    """softmax temperature of the teacher's soft targets; the KL term is scaled by T²."""
    alpha_kd: float = 1.0
    """weight of the soft-target KL."""
    alpha_ce: float = 0.5
    """weight of the hard-label cross-entropy."""
    alpha_hidden: float = 1.0
    """weight of the hidden-state loss, each student layer against its teacher layer (cosine at equal width, MSE
    through a learned projection for a narrower student); 0 turns it off."""
    alpha_attn: float = 0.0
    """weight of the attention-distribution KL; > 0 runs both models with eager attention (slower)."""
    cache_teacher: bool = False
    """keep the teacher's logits from the first epoch and skip the teacher after it. They are also stored under
    --teacher_cache, keyed by teacher weights, training rows, tokenizer, --max_length and precision, so a later run on
    the same teacher and data never runs the teacher. Needs --alpha_hidden 0 and --alpha_attn 0 (those losses need
    the teacher's hidden states every step)."""
    teacher_cache: str = "outputs/teachers"
    """folder holding fine-tuned teachers and cached teacher logits for reuse (shared by distill, prune and share)."""

    def alphas(self) -> dict[str, float]:
        return {"alpha_kd": self.alpha_kd, "alpha_ce": self.alpha_ce, "alpha_hidden": self.alpha_hidden,
                "alpha_attn": self.alpha_attn}

    def validate(self, training: bool = True) -> None:
        """The checks distill shares with the recovery of prune and share."""
        from compress.infra.errors import CompressError

        alphas = self.alphas()
        live = [f"--{name} 0" for name in ("alpha_hidden", "alpha_attn") if alphas.get(name)]
        if self.cache_teacher and live:
            raise CompressError(f"--cache_teacher stores logits only: set {' and '.join(live)} with it "
                                "(hidden-state and attention losses need the live teacher every step)")
        check_all(temperature=self.temperature, **alphas)
        if training and all(value == 0 for value in alphas.values()):
            raise CompressError("--alpha_*: every loss weight is 0, so training has nothing to learn from")


@dataclass
class RuntimeConfig:
    """Where and how a run computes: a resume may change any of these."""

    precision: str = "auto"
    """auto (bf16-mixed on a GPU, 32-true on a CPU), 32-true, bf16-mixed or 16-mixed."""
    accelerator: str = "auto"
    """auto, cpu or cuda (prune scores importance on it too)."""
    devices: int | str = "auto"
    """devices for the Lightning Trainer (a count, or auto)."""
    strategy: str = "auto"
    """Lightning strategy, e.g. auto, ddp, fsdp."""
    num_workers: int | None = None
    """data loader worker processes (default: 4 on a GPU, 0 on a CPU)."""
    compile: bool = False
    """torch.compile the student and the teacher (worth it on a GPU for long runs; the first steps pay the
    compilation, tens of seconds)."""
    checkpoint_every: int = 0
    """optimizer steps between checkpoints; 0 (the default) checkpoints by time instead."""
    checkpoint_minutes: float = 5.0
    """minutes of training between checkpoints when checkpoint_every is 0; a killed run loses at most this much."""
    latency_reps: int = 5
    """timed rounds for the latency measurement (the model and the one it is compared with, interleaved)."""
    progress: bool = field(default=True, metadata={"flag": False})
    """Lightning's progress bar (not a flag: off when several search workers share a terminal)."""

    def validate(self) -> None:
        check_all(checkpoint_every=self.checkpoint_every, checkpoint_minutes=self.checkpoint_minutes,
                  latency_reps=self.latency_reps, num_workers=self.num_workers)
        check_devices(self.devices)


@dataclass
class TrackingConfig:
    """Where runs are recorded."""

    tracking: str = DEFAULT_TRACKING
    """MLflow tracking URI (default: sqlite under ./mlruns)."""
    experiment: str = DEFAULT_EXPERIMENT
    """MLflow experiment name."""


@dataclass
class OutputConfig:
    """Where the result goes, and what to do with one already there."""

    output: str | None = None
    """where the result is written (default: a folder under outputs/ named by the command, model, task and
    recipe)."""
    resume: bool = False
    """continue an interrupted run writing to the same --output (a step's conversion or pruning is recomputed, the
    same for the same seed and data)."""
    overwrite: bool = False
    """replace an existing --output."""


# --- one group per step -------------------------------------------------------------------------------------------

@dataclass
class DistillConfig:
    """distill: which teacher, and which student."""

    teacher: str
    """hub name, alias (bert-base, bert-large, minilm-l6) or a saved model folder: any text encoder transformers loads
    as a sequence classifier (BERT, RoBERTa, MPNet, DeBERTa, ELECTRA, ALBERT, XLM-R, ...). A teacher with no
    classifier for the task is fine-tuned first (its own MLflow run) and reused next time."""
    student: str | None = None
    """the student's starting model: alias minilm-l6 (the packaged MiniLM-L6), a hub name or a folder of a BERT-family
    encoder, e.g. a narrower random-init config. It may tokenize otherwise than the teacher: each model then reads the
    text through its own tokenizer, and the hidden-state loss compares one vector per text. Default: the teacher's
    own layers."""
    layers: int | None = None
    """student depth: this many evenly spaced layers of --student's model, or of the teacher without --student
    (default: all of --student's, half the teacher's)."""
    teacher_device_map: str | None = None
    """place a teacher too large for one card over devices, for inference only: auto, balanced or sequential
    (accelerate fills the visible GPUs, then CPU memory, then disk, layer by layer) or a JSON file mapping module names
    to a GPU index, "cpu" or "disk". The student trains on one device (--devices 1). The teacher must already have its
    task head. Its latency and the speedup are not measured."""
    unlabeled: str | None = None
    """unlabelled in-domain text: a .txt with one text a line, or a .tsv, .csv or .jsonl with the text column (read as
    --data's files are). Its rows learn from the teacher's soft targets only (no cross-entropy), mixed into every epoch
    with the labelled rows; texts that are dev texts are dropped and counted. --cache_teacher covers them."""
    augment: int = 0
    """augmented copies of each training text (TinyBERT's word replacement: each whole word replaced with chance 0.4
    by one of 15 candidates), learning from the teacher's soft targets only, like --unlabeled's rows. Candidates come
    from --augment_model, else from the teacher's own input embeddings (nearest neighbours by cosine). Seeded by
    --seed and cached under --teacher_cache."""
    augment_model: str | None = None
    """with --augment: any model with a masked-LM head (name, alias or folder) that proposes the replacement words,
    each word masked in its own sentence (TinyBERT uses BERT-base)."""
    teacher_epochs: int = 2
    """epochs when a head-less teacher must be fine-tuned first."""
    teacher_lr: float = 5e-5
    """learning rate of that fine-tuning."""

    def validate(self) -> None:
        from compress.infra.errors import CompressError

        check_all(teacher_epochs=self.teacher_epochs, teacher_lr=self.teacher_lr,  # --layers: teacher_layer_map
                  augment=self.augment)
        if self.augment_model is not None and not self.augment:
            raise CompressError(f"--augment_model {self.augment_model}: proposes the words of augmented copies; give "
                                "--augment N as well")


@dataclass
class FinetuneConfig:
    """finetune: the pretrained encoder to give a task head."""

    model: str
    """hub name, alias (bert-base, bert-large, minilm-l6) or a saved model folder."""


@dataclass
class PruneConfig:
    """prune: the parent, and what to cut from it."""

    model: str
    """the parent: a saved model folder (or hub name) with a classifier for the task, e.g. from `compress finetune`.
    Model type bert, ernie, electra, distilbert, roberta, xlm-roberta or camembert, or compress_bert from an earlier
    prune or share."""
    heads: float = 0.0
    """fraction of the attention heads to remove, in [0, 1)."""
    ffn: float = 0.0
    """fraction of the FFN neurons to remove, in [0, 1)."""
    hidden: float = 0.0
    """fraction of the residual-stream (hidden-size) dimensions to remove, in [0, 1): the same dimensions from the
    embeddings, every layer's projections and LayerNorms, the pooler and the classifier's input, chosen by
    --criterion. The kept width is rounded up to a multiple of 8. Dimensions also take part in every LayerNorm's
    statistics, so this cut changes the function: recovery (--recover_epochs) matters, and the hidden-state loss
    learns through a projection to the parent's width."""
    drop_layers: int | list[int] | str | None = None
    """whole layers to remove: a count N (the top N layers, nearest the classifier) or a list of 0-based layer
    indices such as 0,3."""
    criterion: str = "taylor"
    """importance of heads and neurons: taylor (accumulated |dL/dmask| over training batches, Michel et al. 2019),
    magnitude (L2 norm of their weights) or random (a baseline)."""
    scope: str = "layer"
    """layer removes the same fraction in every layer; global ranks heads (and neurons) across layers, so each layer
    keeps its own number. Every layer keeps at least one head and one neuron unless --drop_layers is given."""
    sparsity: float = 0.0
    """fraction of the remaining encoder weights zeroed by magnitude (unstructured; per Linear with --scope layer,
    across all with global). Zeros are stored dense: no smaller on disk, no faster."""
    importance_batches: int = 32
    """training batches the taylor criterion accumulates gradients over."""
    vocab: bool = False
    """also drop the word-embedding rows and tokenizer entries the training texts never produce (after any recovery:
    logits are unchanged on text whose tokens were all kept, so the cut needs no training of its own). Dev tokens lost
    to [UNK] are logged as unk_rate. WordPiece (BERT, ELECTRA, DistilBERT, MiniLM) and byte-level BPE (RoBERTa);
    a SentencePiece tokenizer is refused."""
    vocab_corpus: str | None = None
    """with --vocab: a text file, one text a line, whose tokens are kept too (in-domain text beyond the training
    rows)."""
    vocab_top: int | None = None
    """with --vocab_corpus: keep only its N most frequent tokens beyond those the training texts produce."""
    vocab_min_count: int = 1
    """with --vocab: keep only the tokens the training texts produce at least N times (1: all of them). A rarer word
    is then spelled from smaller kept pieces (every single-character piece of the training texts is kept), so its
    text no longer gets exactly the parent's logits; unk_rate and dropped_rate say how much dev text that touches."""

    def validate(self) -> None:
        check_choice("criterion", self.criterion)
        check_choice("scope", self.scope)
        check_all(heads=self.heads, ffn=self.ffn, hidden=self.hidden, sparsity=self.sparsity,
                  importance_batches=self.importance_batches, vocab_top=self.vocab_top,
                  vocab_min_count=self.vocab_min_count)


@dataclass
class ShareConfig:
    """share: the original, and how its layers share weights."""

    model: str
    """the original: a saved classifier folder for the task, e.g. from `compress finetune`, of model type bert, ernie,
    roberta, xlm-roberta, camembert, electra or distilbert (those two not with --share all, which writes ALBERT's tanh
    head), or a model `compress prune` wrote (its layers may differ in size: each group's shared module is as large
    as its largest layer)."""
    groups: int = 1
    """distinct layer groups, each of consecutive layers sharing one set of weights (ALBERT's rule, layer i in group
    int(i / (L / G))); 1 shares one layer across the whole depth, as ALBERT does."""
    share: str = "all"
    """all (whole layers; writes a standard AlbertForSequenceClassification, or CompressBert from a pruned model),
    attention or ffn (only that sublayer is shared, the other stays per layer; writes compress's CompressBert with its
    code beside it)."""
    embedding: int | None = None
    """factorise the V x H word embedding into V x E and E x H by truncated SVD (must be < H); the relative
    reconstruction error is logged as svd_error. Default: keep it whole."""
    init: str = "regmean"
    """how a group's shared weights start from the layers they replace: first (the group's first layer), mean (their
    average), or regmean (each Linear solved to best reproduce every replaced layer's output on its own inputs,
    recorded on --calibration training rows; LayerNorms averaged). regmean starts closest to the original
    (experiments/bench_share.py --compare_inits)."""
    calibration: int = 256
    """training rows whose activations regmean fits the shared weights to."""

    def validate(self) -> None:
        check_choice("share", self.share)
        check_choice("init", self.init)
        check_all(groups=self.groups, embedding=self.embedding, calibration=self.calibration)


@dataclass
class EvaluateConfig:
    """evaluate: the model to score and time."""

    model: str
    """a saved model folder (or hub name) with a classifier for the task's labels."""
    batch_size: int = 64
    """examples per evaluation batch."""
    latency_batch: int = 32
    """batch size of the latency measurement."""
    latency_seq: int = 128
    """sequence length of the latency measurement."""
    json_out: str | None = None
    """also write the results to this JSON file."""


@dataclass
class ExportConfig:
    """export: which model, and in which formats."""

    model: str | None = None
    """a saved model folder (what distill, finetune, prune or share wrote). Exclusive with --run."""
    run: str | None = None
    """an MLflow run id; its model is the run's output folder, or else its 'model' artifact."""
    format: str = "hf,onnx,int8"
    """comma-separated formats: hf (safetensors, tokenizer, config, README.md model card), onnx (fp32, dynamic batch
    and sequence), int8 (onnxruntime dynamic quantization of the ONNX)."""
    fuse: str = "auto"
    """onnxruntime's transformer fusions (Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu) in the
    ONNX file and in the int8 one made from it: auto (fuse when attention fuses and the fused graph passes the same
    parity check, else say why and export the unfused graph), on (the same, but fail instead) or off. A fused graph
    runs on onnxruntime only."""
    register: str | None = None
    """also register the export in the MLflow model registry under this name (a new version each time), logged as
    the 'model' artifact of a new export run."""
    batch_size: int = 64
    """examples per batch when scoring."""


@dataclass
class BenchConfig:
    """bench: which models, at which shapes, how often."""

    model: list[str]
    """a saved model folder or an .onnx file; repeat the flag for each model (--model A --model B). Speed-ups are
    relative to the first."""
    batch: str = "1,32"
    """batch sizes to time, comma-separated."""
    seq: int = 128
    """tokens per sequence (no padding)."""
    device: str = "cpu"
    """cpu or cuda (onnxruntime then uses its CUDA provider)."""
    warmup: int = 2
    """untimed rounds before timing."""
    reps: int = 10
    """timed rounds; p95 of few rounds is close to the slowest one."""
    threads: int | None = None
    """CPU threads for both PyTorch and onnxruntime (default: PyTorch's default, the usable cores)."""
    json: str | None = None
    """also write the results, hardware and versions to this JSON file."""
    run: str | None = None
    """log the results as metrics (and the JSON as an artifact) of this MLflow run."""


@dataclass
class SearchConfig:
    """search: the study's teacher, its space, and how trials run."""

    teacher: str
    """the model every trial starts from: hub name, alias (minilm-l6, bert-base) or folder. One with no classifier
    for the task is fine-tuned once for the study (distill's teacher_* values, fixed in space)."""
    space: dict[str, Any] | str
    """flags of distill, prune and share to search: a list is a categorical choice, {low, high} a range (int when both
    are ints; add log: true for a log scale, or step), a single value is fixed. null in a list skips that step
    (layers: distill, groups: share, a prune fraction: that pruning); unlabeled: [null, PATH] draws distill's
    unlabelled text on or off, augment: [0, 2, 4] its augmented copies. STEP.FLAG (e.g. prune.lr) sets a flag for one
    step only; a plain flag goes to every step that has it. Inline YAML (--space '{layers: [3, 4]}'), a YAML file
    holding the mapping, or space: in --config."""
    objectives: str | list[str] = "score,params"
    """score, score,params or score,latency_ms (or all three): score is maximised, the others minimised. Several
    objectives search for the Pareto front; score alone prunes bad trials early."""
    trials: int = 10
    """trials to run now (added to the study's earlier ones)."""
    workers: int = 1
    """local processes running trials of the study at once (each trains on its own; trials' latencies are then
    measured while others train)."""
    study: str | None = None
    """Optuna study name; the same name again resumes it (default: TEACHER-DATA)."""
    storage: str = DEFAULT_STORAGE
    """Optuna storage, an RDB URL: sqlite under ./mlruns by default; postgresql://... lets workers on several machines
    share one study."""
    sampler: str = "auto"
    """auto (NSGA-II for several objectives, TPE for one), nsga2, tpe or random."""
    pruner: str = "median"
    """with one objective, stop trials whose per-epoch validation score trails: median or hyperband (or none).
    Several objectives cannot prune."""
    sampler_seed: int | None = 0
    """seed of the sampler (each worker and each restart offsets it); null for a random seed."""
    heartbeat: int = 30
    """seconds between a running trial's heartbeats; a trial silent for twice this long (its worker died) is marked
    failed and retried."""
    retries: int = 2
    """how many times a dead worker's trial is retried."""


@dataclass
class AutoConfig:
    """auto: the teacher, the budget its smallest student must meet, and how long to look."""

    teacher: str
    """the model every trial starts from: hub name, alias (minilm-l6, bert-base) or folder. One with no classifier
    for the task is fine-tuned once for the study."""
    max_latency_ms: float | None = None
    """at most this p50 latency in ms of the shipped model (its runtime's file) at --latency_shape on this machine,
    timed in the same rounds as the teacher."""
    latency_shape: str = "1x128"
    """BATCHxTOKENS of the latency measurement: 1x128 is one 128-token text."""
    min_retention: float | None = None
    """at least this fraction of the teacher's dev score (0.97: 97%)."""
    min_score: float | None = None
    """at least this dev score in the task's metric; with --min_retention both must hold."""
    max_params: int | None = None
    """at most this many parameters."""
    max_mb: float | None = None
    """at most this many MB (10^6 bytes) on disk for the shipped file (model.int8.onnx, model.onnx or the
    safetensors)."""
    runtime: str = "auto"
    """what the model ships as: onnx-int8, onnx or torch; auto gives each trial the fastest that meets the caps, as
    measured, and ships the winner in the fastest whose export passes parity (int8's dev score meets the floor)."""
    space: dict[str, Any] | str | None = None
    """changes to the default space, in compress search's format: a key given replaces the default's (e.g.
    '{layers: [2, 3], epochs: 1}'). The default draws the distilled depth, the heads, FFN, hidden-size and vocabulary
    cuts, sharing, and the KD temperature and loss weights."""
    unlabeled: str | None = None
    """unlabelled in-domain text (distill's --unlabeled); the space then draws whether a trial learns from it."""
    trials: int = 20
    """at most this many trials in this run (added to the study's earlier ones)."""
    time_budget: str | None = None
    """start no trial after this long (e.g. 2h, 90m, 1h30m, 600s), then export the winner and write the report."""
    workers: int = 1
    """local processes running trials at once (their latencies are then measured while others train)."""
    study: str | None = None
    """Optuna study name; the same name and --storage again add trials to it (default: auto-TEACHER-DATA)."""
    storage: str = DEFAULT_STORAGE
    """Optuna storage, an RDB URL: sqlite under ./mlruns by default; postgresql://... for workers on several
    machines."""
    sampler: str = "auto"
    """auto or tpe (TPE with the budget as constraints), nsga2 or random."""
    sampler_seed: int | None = 0
    """seed of the sampler (each worker and each restart offsets it); null for a random seed."""
    latency_reps: int = 20
    """timed rounds of each latency measurement (p95 of few rounds is close to the slowest)."""
    heartbeat: int = 30
    """seconds between a running trial's heartbeats; a trial silent for twice this long is failed and retried."""
    retries: int = 2
    """how many times a dead worker's trial is retried."""


def flag_fields(cls: type) -> list[str]:
    """The fields of a group that are flags (RuntimeConfig.progress is not)."""
    return [f.name for f in fields(cls) if f.metadata.get("flag", True)]
