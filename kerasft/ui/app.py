"""kerasft studio: a no-code fine-tuning UI in gradio.

The studio only writes configs into its workspace and calls the same code as the CLI: data
checks call kerasft.data functions; training, memory plans, evaluation, generation and export
run the `kerasft` command itself as a subprocess on the config it wrote (shown next to every
button), so there is exactly one training path and everything done here can be repeated from a
terminal. What the studio shows comes from the files and JSON those commands write, never from
their printed lines.

`build_app` creates the page and calls one builder per tab; each builder lays out its tab and
wires its own handlers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import typing
from pathlib import Path

from kerasft.config import (
    DATA_FORMATS, DEDUP_MODES, EXPORT_FORMATS, GGUF_QUANTS, HF_DTYPES, LORA_TARGETS, MODEL_DTYPES, MOMENT_DTYPES,
    OBJECTIVES, OPTIMIZERS, SCHEDULES, TASK_METRICS, DataConfig, RunConfig, load_config,
)
from kerasft.data.inspect import format_report, inspect_data
from kerasft.data.prepare import SPLITS, build_datasets
from kerasft.data.records import CONTEXT_KEYS, PROMPT_KEYS, QUESTION_KEYS, RESPONSE_KEYS
from kerasft.errors import KerasftError
from kerasft.evaluate.evaluator import headline
from kerasft.paths import RunDir
from kerasft.runtime import TARGETS as PLAN_TARGETS
from kerasft.train.logs import read_metrics
from kerasft.train.loop import planned_steps
from kerasft.train.optim import build_schedule
from kerasft.ui.workspace import (
    DEFAULT_MAX_UPLOAD_MB, UPLOAD_TYPES, Job, Workspace, gpu_usage, kerasft_argv, latest_checkpoint, machine_usage,
    peek_columns, read_json, storage_usage, sweep_folders, sweep_view, training_progress,
)

# The models offered in the Model tab's list: small Gemmas whose architecture kerasft knows
# offline (KNOWN_ARCHITECTURES), so their memory plan needs no download.
PRESETS = ("embedded", "gemma3_270m", "gemma3_1b", "gemma2_2b_en", "gemma_2b_en")
ENCODINGS = ("utf-8", "latin-1", "cp1252")

# One-click settings: dotted config keys -> values (only these fields change).
TASK_PRESETS = {
    "QA": {"eval.task": "qa", "data.format": "auto", "data.instruction": DataConfig().instruction, "data.sequence_length": 320, "train.epochs": 1.0,
           "train.learning_rate": 3e-4, "eval.max_new_tokens": 24},
    "FAQ": {"eval.task": "short_answer", "data.format": "auto", "data.instruction": "", "data.sequence_length": 128,
            "train.epochs": 3.0, "train.learning_rate": 2e-4, "eval.max_new_tokens": 40},
    "Chat": {"eval.task": "text", "data.format": "chat", "data.instruction": "", "data.sequence_length": 256,
             "train.epochs": 3.0, "train.learning_rate": 2e-4, "eval.max_new_tokens": 32},
    "JSON": {"eval.task": "json", "data.format": "structured", "data.instruction": "", "data.sequence_length": 256,
             "train.epochs": 3.0, "train.learning_rate": 2e-4, "eval.max_new_tokens": 64},
}
HARDWARE_PRESETS = {
    "CPU (laptop, 2-8 cores)": {"model.dtype": "float32", "train.batch_size": 2, "train.grad_accum": 2, "plan_target": "cpu"},
    "T4 16 GB": {"model.dtype": "float16", "train.batch_size": 4, "train.grad_accum": 2, "plan_target": "t4"},
    "RTX 4090 24 GB": {"model.dtype": "bfloat16", "train.batch_size": 8, "train.grad_accum": 1, "plan_target": "4090"},
    "A100 / H100 80 GB": {"model.dtype": "bfloat16", "train.batch_size": 16, "train.grad_accum": 1, "plan_target": "h100"},
    "TPU v5e-8": {"model.dtype": "bfloat16", "train.batch_size": 16, "train.grad_accum": 1, "plan_target": "tpu-v5e-8"},
}

CSS = """
.kft-badge {display:inline-block;padding:4px 12px;border-radius:12px;font-weight:700;color:#fff}
.kft-fits {background:#15803d} .kft-nofit {background:#b91c1c}
.kft-bar {width:100%;height:18px;border-radius:9px;background:#9ca3af55;overflow:hidden}
.kft-bar > div {height:100%;background:#2563eb}
"""



def _int_keys(section=RunConfig, prefix: str = "") -> frozenset[str]:
    """The dotted keys of integer config fields, from the config's own type hints."""
    keys = set()
    for name, hint in typing.get_type_hints(section).items():
        if dataclasses.is_dataclass(hint):
            keys |= _int_keys(hint, f"{prefix}{name}.")
        elif hint is int:
            keys.add(prefix + name)
    return frozenset(keys)


# gradio Numbers hand back floats; these keys are written to the config as integers.
_INT_KEYS = _int_keys()
# Column names guessed for each role after an upload (lowercased): the data readers' own default
# names first, then Spanish ones.
_GUESS = {
    "prompt": (*PROMPT_KEYS, *QUESTION_KEYS, "pregunta"),
    "response": (*RESPONSE_KEYS, "respuesta"),
    "context": (*CONTEXT_KEYS, "contexto", "texto"),
}


class Studio:
    """Server-side state of one studio: its workspace and the commands it started."""

    def __init__(self, workspace: Workspace):
        self.ws = workspace
        self.jobs: dict[tuple[str, str], Job] = {}  # (run name, command) -> the latest job
        self.lock = threading.Lock()

    def start(self, name: str, command: str, argv: list[str]) -> Job:
        with self.lock:
            current = self.jobs.get((name, command))
            if current and current.running:
                raise KerasftError(f"{command} of {name!r} is already running")
            busy = [key for key, job in self.jobs.items() if job.running and key[0] == name]
            if busy:
                raise KerasftError(f"{busy[0][1]} of {name!r} is still running; wait for it or stop it")
            job = Job(argv, self.ws.log_path(name, command)).start(cwd=self.ws.root)
            self.jobs[(name, command)] = job
            return job

    def pause_after_checkpoint(self, job: Job, run_dir: Path) -> None:
        """Interrupts `job` once a checkpoint newer than the current one is complete (the trainer
        has no pause signal of its own; interrupting a save in progress loses it), and
        `kerasft train --resume` continues from that checkpoint."""
        after = latest_checkpoint(run_dir) or 0

        def watch():
            while job.running:
                newest = latest_checkpoint(run_dir)
                if newest is not None and newest > after:
                    job.interrupt(timeout=None)
                    return
                time.sleep(0.02)

        threading.Thread(target=watch, daemon=True).start()

    def run_to_end(self, name: str, command: str, argv: list[str]):
        """Starts a command and yields its log every half second until it ends; then its exit code."""
        job = self.start(name, command, argv)
        while job.running:
            time.sleep(0.5)
            yield job, None
        yield job, job.returncode


class _Form:
    """The config form, spread over the tabs: `fields` maps dotted config keys to components, and
    `extras` holds the inputs that become config values only together (split shares, the model
    choice). Handlers that read the whole form are registered with `on` and wired by `wire` once
    every tab has added its fields."""

    EXTRAS = ("split_train", "split_validation", "split_test", "preset_choice", "local_preset")

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.fields: dict[str, object] = {}
        self.extras: dict[str, object] = {}
        self._pending: list = []

    def on(self, event, fn, outputs, before: tuple = ()) -> None:
        """`event(fn, [*before, *whole form], outputs)`, once the form is complete."""
        self._pending.append((event, fn, list(before), outputs))

    def wire(self) -> None:
        missing = [name for name in self.EXTRAS if name not in self.extras]
        if missing:
            raise RuntimeError(f"studio form: no component for {', '.join(missing)}")
        inputs = [*self.fields.values(), *(self.extras[name] for name in self.EXTRAS)]
        for event, fn, before, outputs in self._pending:
            event(fn, [*before, *inputs], outputs)

    def config_values(self, values) -> dict:
        """Dotted config values ({"train.learning_rate": 2e-4, ...}) from the form's values."""
        keys = list(self.fields)
        named = dict(zip(keys, values[: len(keys)]))
        extra = dict(zip(self.EXTRAS, values[len(keys):]))
        split = [float(extra[name] or 0) for name in self.EXTRAS[:3]]
        named["model.preset"] = (extra["local_preset"] or "").strip() or extra["preset_choice"]
        named["data.split.ratios"] = split if split[2] else split[:2]
        for key in ("data.columns.meta", "lora.targets"):
            named[key] = list(named[key] or [])
        for key, value in list(named.items()):
            if isinstance(value, float) and value.is_integer() and key in _INT_KEYS:
                named[key] = int(value)
        return named

    def save(self, values) -> tuple[str, Path]:
        """Writes configs/NAME.yaml from the form's values: (run name, config path)."""
        path = self.ws.write_config(self.config_values(values))
        return str(values[list(self.fields).index("name")]), path


def build_app(workspace: str | Path, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
    """The studio as a gradio Blocks app working in `workspace` (created if missing)."""
    studio = Studio(Workspace(workspace, max_upload_mb))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # gradio keeps its own copy of each upload: inside the workspace too (read when gradio is imported).
    os.environ.setdefault("GRADIO_TEMP_DIR", str(studio.ws.root / "tmp"))
    try:
        import gradio as gr
    except ImportError:
        raise KerasftError("the studio needs gradio: pip install 'kerasft[ui]'") from None

    form = _Form(studio.ws)
    with gr.Blocks(title="kerasft studio", analytics_enabled=False) as app:
        gr.Markdown("# kerasft studio\nFine-tune Gemma on your own questions and answers, without code.")
        with gr.Row():
            form.fields["name"] = gr.Textbox("my-run", label="Run name", elem_id="run_name", scale=1,
                                             info="letters, digits, _ - . ; the run's files go to runs/NAME")
            config_status = gr.Markdown(elem_id="config_status")
        _home_tab(studio)
        _dataset_tab(studio, form, max_upload_mb, config_status)
        _model_tab(studio, form)
        _training_tab(studio, form)
        _evaluation_tab(studio, form)
        _export_tab(studio, form)
        _sweeps_tab(studio)
        _explore_tab(studio)
        form.wire()
    app.studio = studio
    return app


def _home_tab(studio: Studio) -> None:
    import gradio as gr

    with gr.Tab("Home", id="home"):
        gr.Markdown(
            f"**Workspace:** `{studio.ws.root}`\n\n"
            "1. **Dataset**: upload a CSV, JSONL, TXT or XLSX file, say which columns hold the question and the "
            "answer, and check the data.\n"
            "2. **Model**: pick a model and settings (or a one-click preset), and check it fits in memory.\n"
            "3. **Training**: start it and watch the loss fall.\n"
            "4. **Evaluation**: compare the fine-tuned model with the base model and try prompts.\n"
            "5. **Export**: download a Hugging Face model, a PEFT adapter or a GGUF file.\n\n"
            "Every step writes `configs/NAME.yaml` in the workspace and runs the same `kerasft` command you "
            "could type (each action shows it), e.g. `kerasft train configs/NAME.yaml`.")


def _dataset_tab(studio: Studio, form: _Form, max_upload_mb: float, config_status) -> None:
    """Upload, column mapping, cleaning and splits; `Check data` runs inspect_data and build_datasets."""
    import gradio as gr

    ws, fields = studio.ws, form.fields
    with gr.Tab("Dataset", id="dataset"):
        with gr.Row():
            upload = gr.File(label=f"Upload data ({', '.join(UPLOAD_TYPES)}; up to {max_upload_mb:g} MB)",
                             file_types=list(UPLOAD_TYPES), elem_id="upload")
            with gr.Column():
                fields["data.train"] = gr.Dropdown([str(p) for p in ws.uploads()], label="Training data file",
                                                   elem_id="data_file", allow_custom_value=False)
                upload_status = gr.Markdown(elem_id="upload_status")
        with gr.Row():
            fields["data.format"] = gr.Dropdown(list(DATA_FORMATS), value="auto", label="Format")
            fields["data.delimiter"] = gr.Textbox("", label="CSV delimiter (empty: comma)")
            fields["data.encoding"] = gr.Dropdown(list(ENCODINGS), value="utf-8", label="Encoding")
            fields["data.sheet"] = gr.Textbox("", label="Spreadsheet sheet (empty: first)")
        gr.Markdown("**Column mapping** (empty: the usual names, e.g. prompt/question, response/answer)")
        with gr.Row():
            fields["data.columns.prompt"] = gr.Dropdown([""], value="", label="Prompt (question)", elem_id="col_prompt")
            fields["data.columns.response"] = gr.Dropdown([""], value="", label="Response (answer)",
                                                          elem_id="col_response")
            fields["data.columns.context"] = gr.Dropdown([""], value="", label="Context")
            fields["data.columns.system"] = gr.Dropdown([""], value="", label="System")
            fields["data.columns.meta"] = gr.Dropdown([], value=[], multiselect=True, label="Metadata columns",
                                                      elem_id="col_meta")
        with gr.Row():
            fields["data.instruction"] = gr.Textbox(DataConfig().instruction, label="Instruction before each QA context")
            fields["data.system"] = gr.Textbox("", label="System prompt (used in training and inference)")
        gr.Markdown("**Cleaning and splits**")
        with gr.Row():
            fields["data.clean.strip_html"] = gr.Checkbox(False, label="Strip HTML")
            fields["data.clean.unicode_nfc"] = gr.Checkbox(True, label="Unicode NFC")
            fields["data.clean.whitespace"] = gr.Checkbox(True, label="Collapse whitespace")
            fields["data.clean.dedup"] = gr.Radio(list(DEDUP_MODES), value="normalized", label="Remove duplicates")
        with gr.Row():
            form.extras["split_train"] = gr.Number(0.7, label="Train share", minimum=0, maximum=1, elem_id="split_train")
            form.extras["split_validation"] = gr.Number(0.2, label="Validation share", minimum=0, maximum=1)
            form.extras["split_test"] = gr.Number(0.1, label="Test share", minimum=0, maximum=1)
            fields["data.split.stratify"] = gr.Dropdown([""], value="", label="Stratify by")
            fields["data.split.seed"] = gr.Number(0, label="Split seed", precision=0)
        check_data = gr.Button("Check data", variant="primary", elem_id="check_data")
        data_report = gr.Markdown(elem_id="data_report")
        with gr.Row():
            histogram = gr.Image(label="Token lengths", type="filepath", elem_id="histogram", height=320)
            split_preview = gr.Dataframe(label="Preview of the splits", elem_id="split_preview", wrap=True)

    column_fields = [fields[f"data.columns.{role}"] for role in ("prompt", "response", "context", "system", "meta")]

    def on_upload(file, delimiter, encoding, sheet):
        if file is None:
            return gr.update(), "", *[gr.update()] * 6
        try:
            saved = ws.save_upload(file, Path(file).name)
            columns = peek_columns(saved, delimiter or "", encoding or "utf-8", sheet or "")
        except KerasftError as err:
            return gr.update(), _message(str(err), False), *[gr.update()] * 6
        choices = [str(p) for p in ws.uploads()]
        guess = {role: next((c for c in columns if c.lower() in names), "") for role, names in _GUESS.items()}
        found = f"columns: {', '.join(columns)}" if columns else "no columns (text or SQuAD file)"
        options = ["", *columns]
        return (gr.update(choices=choices, value=str(saved)), _message(f"saved as `{saved.name}`; {found}"),
                gr.update(choices=options, value=guess["prompt"]), gr.update(choices=options, value=guess["response"]),
                gr.update(choices=options, value=guess["context"]), gr.update(choices=options, value=""),
                gr.update(choices=columns, value=[]), gr.update(choices=options, value=""))

    upload.upload(on_upload, [upload, fields["data.delimiter"], fields["data.encoding"], fields["data.sheet"]],
                  [fields["data.train"], upload_status, *column_fields, fields["data.split.stratify"]])

    def on_meta(meta):
        return gr.update(choices=["", *(meta or [])])

    fields["data.columns.meta"].change(on_meta, fields["data.columns.meta"], fields["data.split.stratify"])

    def on_check_data(*values):
        try:
            name, path = form.save(values)
            cfg = load_config(path)
            if not cfg.data.train:
                raise KerasftError("upload a data file first")
            report = inspect_data(cfg, ws.inspect_dir(name))
            splits = build_datasets(cfg.data, need_train=True, need_eval=bool(cfg.data.split.ratios))
        except KerasftError as err:
            return _message(str(err), False), _message(str(err), False), None, None
        rows = []
        for split in SPLITS:
            for ex in getattr(splits, split)[:5]:
                rows.append({"split": f"{split} ({len(getattr(splits, split))})", "prompt": ex.prompt[:200],
                             "response": ex.response[:200], **{k: v for k, v in ex.meta.items()}})
        verdict = (_message(f"{len(report['errors'])} errors: records that cannot be used", False)
                   if report["errors"] else _message("no errors"))
        text = (f"{verdict}\n\n```\n{format_report(report)}\n```\n\n"
                f"CLI: `kerasft data inspect {path}`")
        import pandas

        return (_message(f"config written: `{path}`"), text, report.get("plot") or None,
                pandas.DataFrame(rows) if rows else None)

    form.on(check_data.click, on_check_data, [config_status, data_report, histogram, split_preview])


def _model_tab(studio: Studio, form: _Form) -> None:
    """Model, LoRA and training settings, one-click presets, the schedule plot and `kerasft plan`."""
    import gradio as gr

    fields = form.fields
    with gr.Tab("Model", id="model"):
        with gr.Row():
            task_preset = gr.Radio(list(TASK_PRESETS), label="One-click task preset", elem_id="task_preset")
            hardware_preset = gr.Radio(list(HARDWARE_PRESETS), label="One-click hardware preset")
        with gr.Row():
            form.extras["preset_choice"] = gr.Dropdown(list(PRESETS), value="embedded", label="Model",
                                                       info="embedded: Gemma 3 270M shipped with kerasft")
            form.extras["local_preset"] = gr.Textbox("", label="...or a local folder / .gguf file (wins when set)",
                                                     elem_id="local_preset")
            fields["model.dtype"] = gr.Dropdown(list(MODEL_DTYPES), value="float32", label="Precision")
        with gr.Row():
            fields["lora.rank"] = gr.Number(8, label="LoRA rank", precision=0, minimum=1)
            fields["lora.alpha"] = gr.Number(16, label="LoRA alpha", minimum=0)
            fields["lora.targets"] = gr.CheckboxGroup(list(LORA_TARGETS), value=["query", "value"],
                                                      label="LoRA targets")
        with gr.Row():
            fields["train.learning_rate"] = gr.Number(2e-4, label="Learning rate")
            fields["train.warmup_ratio"] = gr.Number(0.1, label="Warmup share", minimum=0, maximum=1)
            fields["train.weight_decay"] = gr.Number(0.01, label="Weight decay", minimum=0)
            fields["train.epochs"] = gr.Number(1.0, label="Epochs", minimum=0, elem_id="epochs")
            fields["train.max_steps"] = gr.Number(0, label="Max steps (0: epochs decide)", precision=0,
                                                  minimum=0, elem_id="max_steps")
        with gr.Row():
            fields["train.batch_size"] = gr.Number(4, label="Batch size", precision=0, minimum=1,
                                                   elem_id="batch_size")
            fields["train.grad_accum"] = gr.Number(1, label="Gradient accumulation", precision=0, minimum=1)
            fields["data.sequence_length"] = gr.Number(256, label="Sequence length (tokens)", precision=0,
                                                       minimum=8, elem_id="sequence_length")
            fields["train.checkpoint_every"] = gr.Number(10, label="Checkpoint every N steps (pause/resume)",
                                                         precision=0, minimum=0, elem_id="checkpoint_every")
            fields["eval.task"] = gr.Dropdown(list(TASK_METRICS), value="short_answer", label="Evaluation task")
            fields["eval.max_new_tokens"] = gr.Number(40, label="Answer length (tokens)", precision=0, minimum=1)
        fields["eval.batch_size"] = gr.Number(16, visible=False, precision=0)
        fields["train.log_every"] = gr.Number(1, visible=False, precision=0)
        schedule_button = gr.Button("Show learning-rate schedule", elem_id="show_schedule")
        schedule_plot = gr.LinePlot(x="step", y="learning_rate", title="Learning rate by step", height=240,
                                    elem_id="schedule_plot")
        schedule_note = gr.Markdown()
        with gr.Row():
            plan_target = gr.Dropdown(list(PLAN_TARGETS), value="cpu", label="Plan memory for")
            plan_button = gr.Button("Plan memory", elem_id="plan_memory")
        plan_badge = gr.HTML(elem_id="plan_badge")
        plan_text = gr.Code(label="kerasft plan --json", language="json", elem_id="plan_text")

    preset_outputs = list(dict.fromkeys(k for p in TASK_PRESETS.values() for k in p))

    def on_task_preset(choice):
        chosen = TASK_PRESETS.get(choice, {})
        return [gr.update(value=chosen[k]) if k in chosen else gr.update() for k in preset_outputs]

    task_preset.change(on_task_preset, task_preset, [fields[k] for k in preset_outputs])
    hardware_keys = ["model.dtype", "train.batch_size", "train.grad_accum"]

    def on_hardware_preset(choice):
        chosen = HARDWARE_PRESETS.get(choice, {})
        return [gr.update(value=chosen[k]) for k in hardware_keys] + [gr.update(value=chosen["plan_target"])]

    hardware_preset.change(on_hardware_preset, hardware_preset, [fields[k] for k in hardware_keys] + [plan_target])

    def on_schedule(*values):
        try:
            _, path = form.save(values)
            cfg = load_config(path)
            examples = len(build_datasets(cfg.data, need_train=True, need_eval=False).train) if cfg.data.train else 0
        except KerasftError as err:
            return None, _message(str(err), False)
        steps = planned_steps(examples, cfg.train) if examples else (cfg.train.max_steps or 100)
        schedule = build_schedule(cfg.train, steps)  # the schedule training builds
        import pandas

        frame = pandas.DataFrame({"step": list(range(1, steps + 1)),
                                  "learning_rate": [float(schedule(s - 1)) for s in range(1, steps + 1)]})
        what = f"{examples} training examples" if examples else "no data yet: 100 steps shown"
        return frame, f"warmup then {cfg.train.schedule} over {steps} optimizer steps ({what})"

    form.on(schedule_button.click, on_schedule, [schedule_plot, schedule_note])

    def on_plan(target, *values):
        try:
            name, path = form.save(values)
        except KerasftError as err:
            yield "", _message(str(err), False)
            return
        argv = kerasft_argv("plan", path, "--target", target, "--json")
        yield "", f"compiling the training step for {target} ...\n$ kerasft plan {path} --target {target} --json"
        try:
            for job, code in studio.run_to_end(name, "plan", argv):
                if code is None:
                    continue
                text = job.log_text(20000)
                plan = _last_json_object(text) if code in (0, 1) else None
                if plan is None:
                    yield "<span class='kft-badge kft-nofit'>plan failed</span>", text
                else:
                    yield _plan_badge(plan), json.dumps(plan, indent=2)
        except KerasftError as err:
            yield "", _message(str(err), False)

    form.on(plan_button.click, on_plan, [plan_badge, plan_text], before=(plan_target,))


def _training_tab(studio: Studio, form: _Form) -> None:
    """Start / pause / resume / stop `kerasft train`, its progress from metrics.jsonl, and samples."""
    import gradio as gr

    ws, name_field = studio.ws, form.fields["name"]
    with gr.Tab("Training", id="training"):
        with gr.Row():
            mode = gr.Radio(["train", "run"], value="train", label="Command",
                            info="train: training only; run: also evaluates base vs fine-tuned and exports")
            start = gr.Button("Start training", variant="primary", elem_id="start_training")
            pause = gr.Button("Pause (checkpoint and stop)", elem_id="pause_training")
            resume = gr.Button("Resume", elem_id="resume_training")
            stop = gr.Button("Stop", variant="stop", elem_id="stop_training")
        with gr.Row():
            form.fields["train.objective"] = gr.Dropdown(
                list(OBJECTIVES), value="sft", label="Objective", elem_id="objective",
                info="sft: prompt -> response; dpo / orpo: preference pairs (prompt or messages, chosen, rejected)")
            form.fields["train.beta"] = gr.Number(0.1, label="Beta (dpo / orpo)", elem_id="beta")
            pair_upload = gr.File(label="Upload preference pairs (.jsonl, .csv, .xlsx: prompt, chosen, rejected)",
                                  file_types=[".jsonl", ".csv", ".tsv", ".xlsx"], elem_id="pair_upload")
            form.fields["data.columns.rejected"] = gr.Dropdown([""], value="", label="Rejected column (empty: rejected)",
                                                               elem_id="col_rejected", allow_custom_value=True)
        with gr.Row():
            form.fields["train.optimizer"] = gr.Dropdown(
                list(OPTIMIZERS), value="adamw", label="Optimizer", elem_id="optimizer",
                info="lion wants a 3-10x smaller learning rate; sgd uses momentum 0.9")
            form.fields["train.moments"] = gr.Dropdown(
                list(MOMENT_DTYPES), value="float32", label="AdamW moments (memory)", elem_id="moments",
                info="bfloat16: half the optimizer memory; int8: 8-bit Adam, about a quarter (adamw only)")
            form.fields["train.schedule"] = gr.Dropdown(
                list(SCHEDULES), value="cosine", label="Learning-rate schedule (after warmup)", elem_id="schedule")
        train_status = gr.Markdown(elem_id="train_status")
        progress_bar = gr.HTML(elem_id="progress_bar")
        loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=280, elem_id="loss_plot")
        train_log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, elem_id="train_log")
        samples_button = gr.Button("Sample generations (held-out prompts)", elem_id="sample_generations")
        samples = gr.Dataframe(label="Sample generations", elem_id="samples", wrap=True)
        with gr.Row():
            storage = gr.Markdown(elem_id="storage")
            machine = gr.Markdown(elem_id="machine_usage")
        with gr.Accordion("Live controls: the running job takes them at its next step (kerasft control)", open=False):
            with gr.Row():
                save_now = gr.Button("Save checkpoint now", elem_id="save_now")
                stop_best = gr.Button("Stop now (keep best)", elem_id="stop_best")
                stop_last = gr.Button("Stop now (keep last)", elem_id="stop_last")
            with gr.Row():
                new_lr = gr.Number(None, label="New learning rate", elem_id="new_lr")
                change_lr = gr.Button("Change learning rate", elem_id="change_lr")
        with gr.Accordion("Model view before training (kerasft model)", open=False):
            model_view_button = gr.Button("Show model view", elem_id="model_view_button")
            model_view_summary = gr.Markdown(elem_id="model_view_summary")
            model_view_table = gr.Dataframe(label="Weights per layer kind", elem_id="model_view_table", wrap=True)
        timer = gr.Timer(1.0)

    def on_pairs(file):
        """A pairs file becomes the training data (data.train, the Dataset tab's file) with the dpo objective."""
        if file is None:
            return gr.update(), gr.update(), gr.update(), ""
        try:
            saved = ws.save_upload(file, Path(file).name)
        except KerasftError as err:
            return gr.update(), gr.update(), gr.update(), _message(str(err), False)
        columns = peek_columns(saved, "", "utf-8", "")
        rejected = "rejected" if "rejected" in columns or not columns else ""
        return (gr.update(choices=[str(p) for p in ws.uploads()], value=str(saved)), gr.update(value="dpo"),
                gr.update(choices=["", *columns], value=""),
                _message(f"pairs saved as `{saved.name}` and set as the training data; objective dpo"
                         + ("" if rejected else f"; map the rejected column (columns: {', '.join(columns)})")))

    pair_upload.upload(on_pairs, pair_upload, [form.fields["data.train"], form.fields["train.objective"],
                                               form.fields["data.columns.rejected"], train_status])

    def on_start(command, *values):
        try:
            name, path = form.save(values)
            run_dir = ws.run_dir(name)
            argv = kerasft_argv(command, path) + (["--overwrite"] if run_dir.root.exists() else [])
            job = studio.start(name, "train", argv)
        except KerasftError as err:
            return _message(str(err), False)
        return _message(f"started: `{job.command_line}`")

    form.on(start.click, on_start, train_status, before=(mode,))

    def on_resume(name):
        try:
            path = ws.config_path(name)
            if not path.is_file():
                raise KerasftError(f"no config for {name!r}: start a training first")
            job = studio.start(name, "train", kerasft_argv("train", path, "--resume"))
        except KerasftError as err:
            return _message(str(err), False)
        return _message(f"resumed: `{job.command_line}`")

    resume.click(on_resume, name_field, train_status)

    def on_stop(name):
        job = studio.jobs.get((name, "train"))
        if not job or not job.running:
            return _message("no training is running", False)
        job.stop_requested = "stop"
        job.interrupt()
        return _message("stopped (interrupted); `Resume` continues from the last checkpoint, if any")

    stop.click(on_stop, name_field, train_status)

    def on_pause(name):
        job = studio.jobs.get((name, "train"))
        if not job or not job.running:
            return _message("no training is running", False)
        job.stop_requested = "pause"
        studio.pause_after_checkpoint(job, ws.run_dir(name))
        return _message("pausing: training stops after its next checkpoint is written")

    pause.click(on_pause, name_field, train_status)

    def on_tick(name):
        try:
            run_dir = ws.run_dir(name)
        except KerasftError:
            return gr.update(), gr.update(), gr.update(), gr.update()
        job = studio.jobs.get((name, "train"))
        if job is None and not run_dir.metrics.is_file():
            return gr.update(), gr.update(), gr.update(), gr.update()
        try:
            progress = training_progress(run_dir)
        except KerasftError as err:
            return _message(str(err), False), gr.update(), gr.update(), job.log_text() if job else ""
        step, total = progress["step"], progress["total"]
        parts = [f"**{_job_state(job, run_dir)}**", f"step {step}" + (f" / {total}" if total else "")]
        if progress["records"]:
            parts.append(f"loss {progress['records'][-1]['loss']:.4f}")
            if "reward_accuracy" in progress["records"][-1]:  # a dpo / orpo run
                last = progress["records"][-1]
                parts.append(f"reward accuracy {last['reward_accuracy']:.2f}, margin {last['reward_margin']:.3f}")
        if progress["tokens_per_second"]:  # 0.0 until the trainer has timed a step after the compile
            parts.append(f"{progress['tokens_per_second']:,.0f} tokens/s")
            if progress["eta_seconds"] is not None:
                parts.append(f"ETA {_clock(progress['eta_seconds'])}")
        if job:
            parts.append(f"`{job.command_line}`")
        share = min(step / total, 1.0) if total else 0.0
        bar = f"<div class='kft-bar' title='{share:.0%}'><div style='width:{share * 100:.1f}%'></div></div>"
        import pandas

        frame = pandas.DataFrame({"step": [r["step"] for r in progress["records"]],
                                  "loss": [r["loss"] for r in progress["records"]]})
        return " · ".join(parts), bar, frame, job.log_text() if job else ""

    timer.tick(on_tick, name_field, [train_status, progress_bar, loss_plot, train_log])

    def on_samples(name):
        try:
            run_dir = ws.run_dir(name)
            prompts = _heldout_prompts(run_dir, 3)
        except KerasftError as err:
            yield None, _message(str(err), False)
            return
        if not prompts:
            yield None, _message("no finished run with held-out examples yet", False)
            return
        yield None, "generating ..."
        try:
            for job, code in studio.run_to_end(name, "generate", kerasft_argv("generate", run_dir, *prompts)):
                if code is not None:
                    yield _generations(job, prompts, code)
        except KerasftError as err:
            yield None, _message(str(err), False)

    samples_button.click(on_samples, name_field, [samples, train_status])

    timer.tick(lambda name: resources_markdown(studio, name), name_field, [storage, machine])
    save_now.click(lambda name: control_job(studio, name, "save"), name_field, train_status)
    stop_best.click(lambda name: control_job(studio, name, "stop", keep="best"), name_field, train_status)
    stop_last.click(lambda name: control_job(studio, name, "stop", keep="last"), name_field, train_status)
    change_lr.click(lambda name, value: control_job(studio, name, "lr", value=value), [name_field, new_lr], train_status)

    def on_model_view(*values):
        try:
            name, path = form.save(values)
            yield f"building the model abstractly ...\n\n`$ kerasft model {path} --json`", None
            for job, code in studio.run_to_end(name, "model", kerasft_argv("model", path, "--json")):
                if code is not None:
                    view = _last_json_object(job.log_text(200000)) if code == 0 else None
                    if view is None:
                        yield _message(f"kerasft model failed:\n```\n{job.log_text(4000)}\n```", False), None
                    else:
                        yield model_view_tables(view)
        except KerasftError as err:
            yield _message(str(err), False), None

    form.on(model_view_button.click, on_model_view, [model_view_summary, model_view_table])


def resources_markdown(studio: Studio, name: str) -> tuple[str, str]:
    """(storage, machine) lines of the Training tab: sizes of RUN_DIR/checkpoints and the run dir and
    the free disk; CPU and memory of this machine and of the training subprocess (psutil); the
    accelerator's memory in use, peak and limit from the run's last metrics.jsonl line (the trainer
    logs them on GPUs and TPUs; CPU devices report none)."""
    try:
        run_dir = studio.ws.run_dir(name)
    except KerasftError:
        return "", ""
    used = storage_usage(run_dir.root)
    storage = (f"**Storage** · checkpoints {_size(used['checkpoints'])} · run dir {_size(used['run_dir'])} · "
               f"disk free {_size(used['disk_free'])}")
    job = studio.jobs.get((name, "train"))
    usage = machine_usage(job.process.pid if job and job.running else None)
    parts = [f"**Machine** · CPU {usage['cpu_percent']:.0f} % of {usage['cpus']} cores",
             f"memory {_size(usage['memory_used'])} / {_size(usage['memory_total'])}"]
    if usage["process_rss"] is not None:
        parts.append(f"training process CPU {usage['process_cpu_percent']:.0f} %, memory {_size(usage['process_rss'])}")
    for gpu in gpu_usage():
        parts.append(f"GPU {gpu['index']} {gpu['utilization_percent']:.0f} % busy, memory {_size(gpu['memory_used'])} / "
                     f"{_size(gpu['memory_total'])}")
    last = read_metrics(run_dir.metrics)[-1:] if run_dir.metrics.is_file() else []
    if last and "device_memory_bytes" in last[0]:
        record = last[0]
        parts.append(f"accelerator memory {_size(record['device_memory_bytes'])} / "
                     f"{_size(record.get('device_memory_limit_bytes', 0))} "
                     f"(peak {_size(record.get('device_peak_memory_bytes', 0))}, step {record.get('step')})")
    else:
        parts.append("accelerator memory: none reported (the run trains on CPU devices, or has not logged a step)")
    return storage, " · ".join(parts)


def control_job(studio: Studio, name: str, action: str, keep: str = "last", value=None) -> str:
    """A kerasft.train.control request for the studio's running training job of run `name`."""
    try:
        job = studio.jobs.get((name, "train"))
        if not job or not job.running:
            raise KerasftError("no training is running")
        from kerasft.train.control import request

        request(studio.ws.run_dir(name).root, action, keep=keep, value=None if value is None else float(value))
    except KerasftError as err:
        return _message(str(err), False)
    what = {"save": "save a checkpoint", "stop": f"stop, keeping the {keep} adapter",
            "lr": f"learning rate {value:g}" if isinstance(value, (int, float)) else "learning rate"}[action]
    return _message(f"requested: {what}; the job takes it at its next step (logged in metrics.jsonl)")


def model_view_tables(view: dict):
    """(summary markdown, weights DataFrame) of a `kerasft model --json` view."""
    import pandas

    lora, rows = view["lora"], view["token_rows"]
    summary = "\n".join([
        f"**{view['backbone']}** ({view['family']}) · {view['blocks']} blocks · hidden {view['hidden_dim']} · "
        f"vocabulary {view['vocabulary']:,} · dtype {view['dtype']} · quantize {view['quantize']}",
        f"- base parameters: {view['parameters']:,}",
        f"- LoRA r{lora['rank']} (alpha {lora['alpha']:g}) on {lora['layers']} kernels "
        f"({', '.join(lora['kernels'])}): {lora['parameters']:,} parameters",
        f"- trained embedding rows: {rows['rows']} ({' '.join(rows['tokens']) or 'none'}): {rows['parameters']:,}",
        f"- **trainable {view['trainable']:,} of {view['total']:,} ({view['trainable_share']:.3%})**, total = base + LoRA",
        *[f"- note: {note}" for note in view["notes"]],
    ])
    frame = pandas.DataFrame([{"weight": r["name"], "count": r["count"], "shape (each)": str(tuple(r["shape"])),
                               "parameters": r["parameters"], "LoRA": r["lora"] or ("adapter" if "lora_kernel" in r["name"] else "")}
                              for r in view["weights"] + lora["weights"]])
    return summary, frame


def _size(value: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def _evaluation_tab(studio: Studio, form: _Form) -> None:
    """`kerasft eval compare=base`, its eval*.json and report side by side, and a prompt playground."""
    import gradio as gr

    ws, name_field = studio.ws, form.fields["name"]
    with gr.Tab("Evaluation", id="evaluation"):
        with gr.Row():
            evaluate_button = gr.Button("Evaluate base and fine-tuned", variant="primary", elem_id="evaluate")
            show_results = gr.Button("Show the latest results", elem_id="show_results")
        eval_status = gr.Markdown(elem_id="eval_status")
        metrics_table = gr.Dataframe(label="Metrics: base vs fine-tuned", elem_id="metrics_table")
        report = gr.Markdown(elem_id="report_md", max_height=500)
        worst = gr.Dataframe(label="Worst examples", elem_id="worst", wrap=True)
        gr.Markdown("### Prompt playground (`kerasft generate`)")
        with gr.Row():
            playground_source = gr.Radio(["fine-tuned run", "base model"], value="fine-tuned run", label="Model")
            playground_tokens = gr.Number(48, label="Max new tokens", precision=0, minimum=1)
        playground_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="playground_prompt")
        playground_button = gr.Button("Generate", elem_id="generate")
        playground_output = gr.Textbox(label="Answer", lines=4, elem_id="playground_output")
        playground_probs = gr.HTML(elem_id="playground_tokens")
    results = [eval_status, metrics_table, report, worst]

    def on_evaluate(name):
        try:
            path = ws.config_path(name)
            _require_adapter(ws.run_dir(name), name)
            argv = kerasft_argv("eval", path, "compare=base")
            for job, code in studio.run_to_end(name, "eval", argv):
                if code is None:
                    yield f"evaluating ... `{job.command_line}`", None, "", None
                elif code:
                    yield _message(f"evaluation failed (exit {code}):\n```\n{job.log_text(2000)}\n```", False), None, "", None
                else:
                    yield (_message(f"done: `{job.command_line}`"), *_eval_views(ws.run_dir(name)))
        except KerasftError as err:
            yield _message(str(err), False), None, "", None

    evaluate_button.click(on_evaluate, name_field, results)

    def on_show_results(name):
        try:
            run_dir = ws.run_dir(name)
            if not run_dir.eval_result("tuned").is_file():
                raise KerasftError(f"{name!r} has no evaluation yet (`kerasft run` or Evaluate writes one)")
            return _message(f"results in `{run_dir}`"), *_eval_views(run_dir)
        except KerasftError as err:
            return _message(str(err), False), None, "", None

    show_results.click(on_show_results, name_field, results)

    def on_generate(name, source, prompt, max_tokens):
        if not (prompt or "").strip():
            yield _message("type a prompt first", False), ""
            return
        try:
            run_dir = ws.run_dir(name)
            if source == "base model":
                cfg_path = ws.config_path(name)
                if not cfg_path.is_file():
                    raise KerasftError("write a config first (Dataset or Model tab)")
                cfg = load_config(cfg_path)
                src, system = cfg.model.preset, ["--system", cfg.data.system]  # as the run renders prompts
            else:
                system = []
                _require_adapter(run_dir, name)
                src = str(run_dir)
            argv = kerasft_argv("generate", src, prompt, "--max-new-tokens", int(max_tokens or 48), *system,
                                "--json", "--top-k", PLAYGROUND_TOP_K)
            yield "generating ...", ""
            for job, code in studio.run_to_end(name, "generate", argv):
                if code is not None:
                    frame, note = _generations(job, [prompt], code)
                    if frame is None:
                        yield note, ""
                    else:
                        yield frame["response"][0], token_probabilities_html(frame["tokens"][0])
        except KerasftError as err:
            yield _message(str(err), False), ""

    playground_button.click(on_generate, [name_field, playground_source, playground_prompt, playground_tokens],
                            [playground_output, playground_probs])


def _sweeps_tab(studio: Studio) -> None:
    """The sweeps of this workspace (`kerasft sweep` folders): their table and sensitivity plots."""
    import gradio as gr

    ws = studio.ws
    with gr.Tab("Sweeps", id="sweeps"):
        gr.Markdown("Folders in this workspace that `kerasft sweep` wrote (they hold sweep.json); a sweep still "
                    "running shows the trials scored so far.")
        with gr.Row():
            choice = gr.Dropdown(sweep_choices(ws), label="Sweep folder", elem_id="sweep_folder")
            refresh = gr.Button("Refresh list", elem_id="sweep_refresh")
        summary = gr.Markdown(elem_id="sweep_summary")
        table = gr.Dataframe(label="Trials (validation split)", elem_id="sweep_table", wrap=True)
        plots = gr.Gallery(label="Sensitivity: validation score against each swept key", columns=2,
                           elem_id="sweep_plots")

    refresh.click(lambda: gr.update(choices=sweep_choices(ws)), None, choice)

    def on_choice(folder):
        if not folder:
            return "", None, []
        try:
            return sweep_tables(ws, folder)
        except KerasftError as err:
            return _message(str(err), False), None, []

    choice.change(on_choice, choice, [summary, table, plots])


def sweep_choices(ws: Workspace) -> list[str]:
    """Sweep folders under the workspace, relative to it."""
    return [str(path.relative_to(ws.root)) for path in sweep_folders(ws.root)]


def sweep_tables(ws: Workspace, folder: str):
    """(summary markdown, trials DataFrame, sensitivity PNG paths) of a sweep folder inside the workspace."""
    import pandas

    path = (ws.root / folder).resolve()
    if not path.is_relative_to(ws.root):
        raise KerasftError(f"{folder}: not inside the workspace")
    view = sweep_view(path)
    lines = [f"**{folder}** · {len(view['rows'])} trial(s)"]
    if view["rule"]:
        lines.append(f"Rule: {view['rule']}; best: {view['best']}")
    if view["test"]:
        lines.append("Best trial on the test split: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in view["test"].items()))
    return "\n\n".join(lines), pandas.DataFrame(view["rows"], columns=view["columns"]), [str(p) for p in view["plots"]]


def _explore_tab(studio: Studio) -> None:
    """Attention maps: `kerasft attention SRC PROMPT --png` for a run of this workspace or a preset."""
    import gradio as gr

    ws = studio.ws
    with gr.Tab("Explore", id="explore"):
        gr.Markdown("Attention weights of one layer for a prompt, as the model's own softmax computed them "
                    "(`kerasft attention`). Model: a run name of this workspace, or a preset (embedded, a folder).")
        with gr.Row():
            source = gr.Textbox("embedded", label="Model (run name or preset)", elem_id="attention_source")
            layer = gr.Number(-1, precision=0, label="Layer (negative counts back)", elem_id="attention_layer")
            # A text box: gradio's Number shows an empty value as 0, which would draw head 0 only.
            head = gr.Textbox("", label="Head (empty: every head)", elem_id="attention_head")
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="attention_prompt")
        button = gr.Button("Draw attention", variant="primary", elem_id="attention_button")
        status = gr.Markdown(elem_id="attention_status")
        image = gr.Image(label="Attention", type="filepath", elem_id="attention_png")

    def on_draw(src, text, layer_index, head_index):
        try:
            argv, png = attention_argv(ws, src, text, layer_index, head_index)
            yield f"`$ kerasft {' '.join(argv[3:])}` ...", None
            for job, code in studio.run_to_end("explore", "attention", argv):
                if code is not None:
                    result = _last_json_object(job.log_text(20000)) if code == 0 else None
                    if result is None:
                        yield _message(f"kerasft attention failed:\n```\n{job.log_text(4000)}\n```", False), None
                    else:
                        top = ", ".join(f"{t['token']!r} {t['weight']:.2f}" for t in result["last_token_attends_to"])
                        yield (f"layer {result['layer']} · {result['heads']} heads · {result['tokens']} tokens · "
                               f"the last position attends most to: {top}"), str(png)
        except KerasftError as err:
            yield _message(str(err), False), None

    button.click(on_draw, [source, prompt, layer, head], [status, image])


def attention_argv(ws: Workspace, source: str, prompt: str, layer, head) -> tuple[list[str], Path]:
    """The `kerasft attention` command line for the Explore tab, and the PNG it writes (a new file
    under WORKSPACE/explore/ each time)."""
    source, prompt = (source or "").strip(), (prompt or "").strip()
    if not source or not prompt:
        raise KerasftError("attention: give a model (run name or preset) and a prompt")
    try:
        run_dir = ws.run_dir(source)
        src = str(run_dir.root) if run_dir.has_adapter else source
    except KerasftError:  # not a run name: a preset name or path
        src = source
    out = ws.root / "explore"
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"attention-{time.time_ns()}.png"
    argv = kerasft_argv("attention", src, prompt, "--png", str(png), "--layer", str(int(layer if layer is not None else -1)))
    head = "" if head is None else str(head).strip()
    if head:
        if not head.lstrip("-").isdigit():
            raise KerasftError(f"attention: head {head!r} is not a whole number (leave it empty for every head)")
        argv += ["--head", str(int(head))]
    return argv, png


def _export_tab(studio: Studio, form: _Form) -> None:
    """`kerasft export` of the run into exports/NAME-FORMAT, its files and model card."""
    import gradio as gr

    ws = studio.ws
    with gr.Tab("Export", id="export"):
        with gr.Row():
            export_format = gr.Radio(list(EXPORT_FORMATS), value="hf", label="Format", elem_id="export_format",
                                     info="hf: merged safetensors; peft: LoRA adapter; gguf: llama.cpp file; "
                                          "savedmodel: TensorFlow; onnx: onnxruntime; torch: state_dict + torch.export")
            export_quant = gr.Dropdown(list(GGUF_QUANTS), value="f16", label="GGUF type", elem_id="export_quant")
            export_dtype = gr.Dropdown(list(HF_DTYPES), value="float32", label="HF dtype", elem_id="export_dtype")
        export_button = gr.Button("Export", variant="primary", elem_id="export")
        export_status = gr.Markdown(elem_id="export_status")
        export_files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="export_files")
        model_card = gr.Markdown(elem_id="model_card", max_height=400)

    def on_export(name, fmt, quant, dtype):
        try:
            run_dir = ws.run_dir(name)
            _require_adapter(run_dir, name)
            out = ws.export_dir(name, fmt)
            argv = kerasft_argv("export", run_dir, out, "--format", fmt, "--quant", quant, "--dtype", dtype,
                                "--overwrite")
            for job, code in studio.run_to_end(name, "export", argv):
                if code is None:
                    yield f"exporting ... `{job.command_line}`", None, ""
                elif code:
                    yield _message(f"export failed (exit {code}):\n```\n{job.log_text(2000)}\n```", False), None, ""
                else:
                    files = sorted(str(p) for p in out.rglob("*") if p.is_file())
                    card = (out / "README.md").read_text(encoding="utf-8") if (out / "README.md").is_file() else ""
                    yield (_message(f"exported to `{out}`: `{job.command_line}`\n```\n{job.log_text(1500)}\n```"),
                           files, card)
        except KerasftError as err:
            yield _message(str(err), False), None, ""

    export_button.click(on_export, [form.fields["name"], export_format, export_quant, export_dtype],
                        [export_status, export_files, model_card])


def launch(workspace: str | Path = "studio", host: str = "127.0.0.1", port: int = 7860, auth: str = "",
           max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, block: bool = True):
    """Builds the studio and serves it (on 127.0.0.1 unless `host` says otherwise).

    Args:
        auth: "user:password" to require a login; empty for none.
        max_upload_mb: largest accepted upload.
        block: keep serving until interrupted (False returns the running app, for tests).
    """
    credentials = None
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise KerasftError("--auth: expected user:password")
        credentials = (user, password)
    app = build_app(workspace, max_upload_mb)
    import gradio as gr

    app.queue(default_concurrency_limit=4)
    try:
        app.launch(server_name=host, server_port=port, auth=credentials, max_file_size=app.studio.ws.max_upload_bytes,
                   allowed_paths=[str(app.studio.ws.root)], prevent_thread_lock=not block, quiet=not block,
                   theme=gr.themes.Soft(), css=CSS, footer_links=[], ssr_mode=False)
    except OSError as err:  # gradio reports a taken port as OSError
        raise KerasftError(f"cannot serve on {host}:{port}: {err}") from None
    return app


def _message(text: str, ok: bool = True) -> str:
    return ("**OK:** " if ok else "**Error:** ") + text


def _require_adapter(run_dir: RunDir, name: str) -> None:
    if not run_dir.has_adapter:
        raise KerasftError(f"{name!r} has no trained adapter yet: train first")


def _clock(seconds: float) -> str:
    """ETA as h:mm:ss or m:ss."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def _last_json_object(text: str) -> dict | None:
    """The last line of a command's output that is a JSON object (`kerasft plan --json` prints one)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _plan_badge(plan: dict) -> str:
    """The fits / does-not-fit badge, the peak against usable memory and the suggested batch size,
    from the JSON of `kerasft plan --json`."""
    try:
        fits, peak, usable = bool(plan["fits"]), int(plan["step"]["peak"]), int(plan["usable"])
        largest, tried = plan["largest_batch"], plan["tried"]
    except (KeyError, TypeError, ValueError) as err:
        raise KerasftError(f"kerasft plan --json: missing or bad key {err}") from None
    badge = (f"<span class='kft-badge {'kft-fits' if fits else 'kft-nofit'}'>{'fits' if fits else 'does not fit'}"
             f"</span> &nbsp; peak {_gib(peak)} of {_gib(usable)} per device")
    if largest is not None or len(tried) > 1:
        badge += f" &nbsp; suggested batch size: <b>{largest if largest is not None else 'none'}</b>"
    return badge


def _job_state(job: Job | None, run_dir: RunDir) -> str:
    if job is None:
        return "finished earlier" if run_dir.has_adapter else "not running"
    if job.running:
        return "pausing" if job.stop_requested == "pause" else "training"
    code = job.returncode
    if job.stop_requested and code != 0:
        return "paused (Resume continues)" if job.stop_requested == "pause" else "stopped"
    return "finished" if code == 0 else f"failed (exit {code}; see the log)"


def _heldout_prompts(run_dir: RunDir, count: int) -> list[str]:
    """The first prompts of the run's test split (else validation), as written to RUN_DIR/data."""
    if not run_dir.has_adapter:
        return []
    for split in ("test", "validation"):
        path = run_dir.data / f"{split}.jsonl"  # data.prepare.write_splits names the files
        if path.is_file():
            prompts = []
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise KerasftError(f"{path}: line {lineno}: not a JSON example with a prompt") from None
                if len(prompts) == count:
                    break
            return prompts
    return []


PLAYGROUND_TOP_K = 5


def token_probabilities_html(tokens: list[dict]) -> str:
    """The answer's tokens (`kerasft generate --json --top-k`: token, id, prob, top) as HTML: each
    token shaded from red (improbable) to green (probable), its probability and the alternatives
    in its tooltip."""
    import html

    spans = []
    for token in tokens:
        prob = float(token["prob"])
        alternatives = ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in token.get("top", []))
        tip = f"p={prob:.3f}" + (f"; alternatives: {alternatives}" if alternatives else "")
        hue = round(120 * min(max(prob, 0.0), 1.0))  # 0 red .. 120 green
        spans.append(f'<span class="kerasft-token" title="{html.escape(tip)}" data-prob="{prob:.4f}" '
                     f'style="background: hsla({hue}, 70%, 50%, 0.35); white-space: pre-wrap">'
                     f"{html.escape(token['token'])}</span>")
    legend = "<small>Token colour: the model's probability (red low, green high); hover for the alternatives.</small>"
    return f'<div class="kerasft-tokens">{"".join(spans)}</div>{legend}' if spans else ""


def _generations(job: Job, prompts: list[str], code: int):
    """The JSON lines `kerasft generate` prints, as a table."""
    import pandas

    if code:
        return None, f"**Error:** generation failed (exit {code}):\n```\n{job.log_text(1500)}\n```"
    rows = []
    for line in job.log_text(200000).splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not rows:
        return None, "**Error:** no generations in the output"
    return pandas.DataFrame(rows), f"**OK:** `{job.command_line}`"


def _eval_views(run_dir: RunDir):
    """Metrics side by side (eval_base.json, eval.json), report.md and the worst examples of report.json."""
    import pandas

    results = {label: read_json(run_dir.eval_result(which)) for label, which in (("base", "base"), ("fine-tuned", "tuned"))}
    results = {label: r for label, r in results.items() if r}
    metrics = list(dict.fromkeys(k for r in results.values() for k in headline(r)))
    table = pandas.DataFrame([{"metric": m, **{label: _round(headline(r).get(m)) for label, r in results.items()}}
                              for m in metrics])
    report_md = run_dir.report_md.read_text(encoding="utf-8") if run_dir.report_md.is_file() else ""
    report_json = read_json(run_dir.report_json) or {}
    worst_rows = [{"prompt": str(row.get("prompt", ""))[:300], "gold": str(row.get("gold", row.get("answers", ""))),
                   "prediction": row.get("prediction", ""), "score": row.get("score")}
                  for row in report_json.get("worst", [])]
    return table, report_md, pandas.DataFrame(worst_rows) if worst_rows else None


def _round(value):
    return round(value, 2) if isinstance(value, float) else value
