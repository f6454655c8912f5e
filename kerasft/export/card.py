"""The model card (README.md) written into every export: what the model is, how it was made, how
well it did, the Gemma Terms of Use notice and how to load it.

Run facts come from the run dir's own files (config.yaml, adapter/adapter_config.json,
summary.json, metrics.jsonl, eval_base.json, eval.json), so a card never states more than the
run recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from kerasft.models.presets import model_family
from kerasft.paths import RunDir
from kerasft.train.logs import read_metrics

GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at "
    "ai.google.dev/gemma/terms. This model is a modification of Gemma; its use is subject to the "
    "same terms, including the Gemma Prohibited Use Policy (ai.google.dev/gemma/prohibited_use_policy)."
)
LLAMA_NOTICE = (
    "This model is a modification of a Llama-family model. Its use is subject to the license of the base "
    "model: the Llama 2 or Llama 3.x Community License and Acceptable Use Policy (llama.com/llama-downloads) "
    "for Meta's models; Apache 2.0 for TinyLlama."
)

# Headline metrics of an eval JSON, in table order, with their column names.
_METRICS = (("f1", "F1"), ("exact_match", "EM"), ("f1_en", "F1 (en)"), ("exact_match_en", "EM (en)"), ("count", "n"))

_FORMAT_TITLES = {
    "hf": "merged Hugging Face checkpoint (safetensors)",
    "peft": "PEFT LoRA adapter",
    "gguf": "GGUF file for llama.cpp",
    "savedmodel": "TensorFlow SavedModel",
    "onnx": "ONNX model",
    "torch": "PyTorch state_dict and torch.export program",
}
_LIBRARIES = {"peft": "peft", "gguf": "gguf", "savedmodel": "tensorflow", "onnx": "onnx", "torch": "pytorch"}


def model_card(fmt: str, backbone, *, source: str = "", run_dir: str | Path | None = None, extra: dict | None = None) -> str:
    """Markdown model card for an export.

    Args:
        fmt: "hf", "peft", "gguf", "savedmodel", "onnx" or "torch": decides the loading instructions.
        backbone: the exported keras-hub backbone (its family and size are described).
        source: what the model was loaded from (a run dir, preset, folder or .gguf file).
        run_dir: the training run, if any: its config, adapter, step count and evaluations are
            reported.
        extra: format details to list ("dtype": "bfloat16", "quantization": "q8_0", "file": ...).
    """
    run = _run_facts(Path(run_dir)) if run_dir else {}
    base = run.get("base_model") or source or "unknown"
    family = model_family(backbone) or type(backbone).__name__
    llama = family.startswith("llama")
    params = sum(int(_size(w.shape)) for w in backbone.weights if "lora" not in w.path)
    lines = [
        "---",
        "library_name: " + _LIBRARIES.get(fmt, "transformers"),
        "license: " + ("other" if llama else "gemma"),
        "tags: [kerasft, " + ("llama" if llama else "gemma") + ", lora]",
        "---",
        "",
        f"# {Path(str(source)).name or 'kerasft model'}: {_FORMAT_TITLES.get(fmt, fmt)}",
        "",
        f"Exported by kerasft from a keras-hub {family} backbone ({backbone.num_layers} layers, hidden size "
        f"{backbone.hidden_dim}, vocabulary {backbone.vocabulary_size}, {params / 1e6:.1f}M parameters).",
        "",
        "## Base model and training",
        "",
        f"- base model: `{base}`",
    ]
    if source and source != base:
        lines.append(f"- exported from: `{source}`")
    if run:
        lines += [f"- {fact}" for fact in run["facts"]]
    else:
        lines.append("- training: none recorded (exported from a preset, not a kerasft run dir)")
    if extra:
        lines += ["", "## Export", ""] + [f"- {key}: {value}" for key, value in extra.items()]
    if run.get("lineage"):
        lines += ["", "## Reproducibility", ""] + _lineage_lines(run["lineage"], run_dir)
    lines += ["", "## Evaluation", ""]
    lines += _eval_table(run.get("evals", {})) or ["No evaluation results were recorded for this export."]
    lines += ["", "## How to use", ""] + _usage(fmt, base, extra or {})
    lines += ["", "## Terms of use", "", LLAMA_NOTICE if llama else GEMMA_NOTICE, ""]
    return "\n".join(lines)


def _run_facts(run_dir: Path) -> dict:
    facts, base = [], ""
    run = RunDir(run_dir)
    config_path = run.config
    cfg = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    cfg = cfg if isinstance(cfg, dict) else {}
    adapter_path = run.adapter_config
    adapter = json.loads(adapter_path.read_text()) if adapter_path.is_file() else {}
    base = adapter.get("base_model") or cfg.get("model", {}).get("preset", "")
    lora = cfg.get("lora") or adapter
    if lora:
        facts.append(
            f"LoRA: rank {lora.get('rank')}, alpha {lora.get('alpha')}, targets {', '.join(lora.get('targets', []))}"
        )
        tokens = lora.get("trainable_tokens")
        if isinstance(tokens, dict):
            tokens = tokens.get("pieces")
        if tokens:
            facts.append(f"trained embedding rows: {', '.join(tokens)}")
    data = cfg.get("data") or {}
    if data.get("train"):
        facts.append(f"training data: `{data['train']}`" + (f"; held-out data: `{data['eval']}`" if data.get("eval") else ""))
    train = cfg.get("train") or {}
    steps = _train_steps(run)
    if steps is not None:
        facts.append(
            f"training: {steps} steps, batch {train.get('batch_size')} x {train.get('grad_accum', 1)} accumulation, "
            f"learning rate {train.get('learning_rate')}, seed {train.get('seed')}"
        )
    if cfg.get("model", {}).get("dtype"):
        facts.append(f"training dtype: {cfg['model']['dtype']}")
    evals = {}
    for name, which in (("base", "base"), ("fine-tuned", "tuned")):
        path = run.eval_result(which)
        if path.is_file():
            evals[name] = json.loads(path.read_text(encoding="utf-8"))
    lineage = json.loads(run.lineage.read_text(encoding="utf-8")) if run.lineage.is_file() else {}
    return {"base_model": base, "facts": facts, "evals": evals, "lineage": lineage}


def _lineage_lines(record: dict, run_dir) -> list[str]:
    """The card's summary of lineage.json (kerasft.lineage)."""
    source = record.get("kerasft", {})
    commit = source.get("commit") or "not a git checkout"
    lines = [f"- kerasft {source.get('version')}, commit `{commit}`" + (" (with uncommitted changes)" if source.get("dirty") else "")]
    packages = {k: v for k, v in record.get("packages", {}).items() if v}
    if packages:
        lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in packages.items()))
    machine = record.get("machine", {})
    device = machine.get("devices") or {}
    lines.append(f"- machine: {machine.get('processor') or machine.get('machine')}, {machine.get('cpu_count')} CPUs"
                 + (f"; {device.get('count')} x {device.get('kind')} ({device.get('platform')})" if device else ""))
    for key, entry in record.get("data_files", {}).items():
        lines.append(f"- {key}: `{Path(entry.get('path') or entry.get('source', '')).name}` sha256 "
                     f"`{entry.get('sha256') or 'n/a (not a local file)'}`")
    if record.get("seeds"):
        lines.append("- seeds: " + ", ".join(f"{k} {v}" for k, v in record["seeds"].items()))
    lines.append(f"- rerun and compare: `kerasft reproduce {run_dir} --check` (the same commit on the same machine "
                 "kind repeats every loss, evaluation and adapter byte)")
    return lines


def _train_steps(run: RunDir):
    if run.summary.is_file():
        steps = json.loads(run.summary.read_text()).get("train", {}).get("steps")
        if steps is not None:
            return steps
    if run.metrics.is_file():
        steps = [r["step"] for r in read_metrics(run.metrics) if "step" in r]
        return max(steps) if steps else None
    return None


def _eval_table(evals: dict) -> list[str]:
    columns = [(key, title) for key, title in _METRICS if any(key in r for r in evals.values())]
    if not columns:
        return []
    lines = ["| model | " + " | ".join(title for _, title in columns) + " |", "| --- |" + " --- |" * len(columns)]
    for name, result in evals.items():
        cells = [_cell(result.get(key)) for key, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Greedy decoding on the held-out split; SQuAD-style token F1 and exact match in percent."]
    return lines


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    return "" if value is None else str(value)


def _usage(fmt: str, base: str, extra: dict) -> list[str]:
    if fmt == "peft":
        return [
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")  # the merged export of the base model',
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
            "```",
        ]
    if fmt == "gguf":
        file_name = extra.get("file", "model.gguf")
        return [
            "```bash",
            f"llama-cli -m {file_name} -cnv          # llama.cpp; the chat template is in the file",
            f"kerasft serve {file_name}              # or serve it with kerasft (OpenAI-style HTTP API)",
            "```",
        ]
    if fmt in _DERIVED_USAGE:
        return _DERIVED_USAGE[fmt]
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'messages = [{"role": "user", "content": "¿Qué río pasa por Zaragoza?"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "keras-hub loads the same folder: `keras_hub.models.Gemma3CausalLM.from_preset(\"path/to/this/folder\")` "
        "(GemmaCausalLM for Gemma 1 and 2, Llama3CausalLM for Llama); so does `kerasft serve path/to/this/folder`.",
    ]


_DERIVED_USAGE = {
    "savedmodel": [
        "```python",
        "import numpy as np, tensorflow as tf",
        "",
        'model = tf.saved_model.load("path/to/this/folder")',
        "ids = np.array([[2, 105, 2364]], np.int32)  # token ids (tokenizer.model, SentencePiece)",
        'logits = model.signatures["logits"](token_ids=ids, padding_mask=ids > 0)["output_0"]',
        "# greedy: right-pad each prompt with zeros (padding_mask False) up to the length wanted;",
        "# the zeros are filled with greedy tokens, and stay 0 after a stop token.",
        "buffer = np.pad(ids, ((0, 0), (0, 32)))",
        'tokens = model.signatures["greedy"](token_ids=buffer, padding_mask=buffer > 0)["output_0"]',
        "```",
    ],
    "onnx": [
        "```python",
        "import numpy as np, onnxruntime",
        "",
        'session = onnxruntime.InferenceSession("path/to/this/folder/model.onnx")',
        "ids = np.array([[2, 105, 2364]], np.int64)  # the tokenizer files of this folder (transformers AutoTokenizer)",
        'logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]',
        "```",
    ],
    "torch": [
        "```python",
        "import torch",
        "from transformers import AutoConfig, AutoModelForCausalLM",
        "",
        'model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("path/to/this/folder"))',
        'model.load_state_dict(torch.load("path/to/this/folder/model_state_dict.pt", weights_only=True))',
        'program = torch.export.load("path/to/this/folder/model.pt2")  # (input_ids, attention_mask) -> logits',
        "```",
    ],
}


def _size(shape) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total
