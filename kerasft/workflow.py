"""The fine-tuning run, top to bottom: load -> LoRA -> data -> evaluate base -> train -> evaluate
-> export and verify. The CLI (and through it the studio), the quickstart and the tests all call
these functions; `kerasft eval` runs the same evaluation stage as `kerasft run`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from kerasft import lineage
from kerasft.config import RunConfig, config_to_dict, load_config, save_config
from kerasft.data.pipeline import padding_fraction, tokenize_cached
from kerasft.data.prepare import DataSplits, build_datasets, write_splits
from kerasft.data.template import chat_tokens, encode_prompt, encode_response, resolve_template
from kerasft.errors import KerasftError
from kerasft.evaluate.evaluator import check_eval_config, comparison_table, evaluate, headline, open_model, write_eval
from kerasft.evaluate.generate import KerasModel
from kerasft.evaluate.report import write_report
from kerasft.export import DERIVED_FORMATS, export_derived
from kerasft.export.card import model_card
from kerasft.export.gguf import export_gguf
from kerasft.export.hf import export_hf
from kerasft.export.peft import export_peft
from kerasft.export.verify import unchecked, verify_gguf_export, verify_hf_export
from kerasft.models.families import trainable_turn_tokens
from kerasft.models.lora import apply_lora, load_adapter, read_adapter_config, save_adapter, token_ids_for
from kerasft.models.presets import cache_dir, load_model, resolve_preset
from kerasft.models.vocab import with_new_tokens
from kerasft.notify import notify
from kerasft.paths import RunDir, write_json
from kerasft.runtime import barrier, init_backend, is_primary, process_count, set_distribution
from kerasft.train.loop import planned_steps, precompute_reference, score_pairs
from kerasft.train.loop import TrainSpec
from kerasft.train.loop import train as train_lora


def run(cfg: RunConfig, *, train: bool = True, evaluate: bool = True, export: bool = True, overwrite: bool = False,
        resume: bool = False) -> dict:
    """Runs the configured stages and returns a summary (also written to summary.json).

    Args:
        cfg: the resolved run config; everything is written under cfg.run_dir.
        train / evaluate / export: which stages to run.
        overwrite: replace an existing run dir instead of refusing.
        resume: continue training from the run dir's newest checkpoint (its config must match).
    """
    # Read and check every input before anything is written or any slow stage starts.
    evaluate = evaluate and cfg.data.task != "pretrain"  # raw text has no answers to generate
    splits = build_datasets(cfg.data, need_train=train, need_eval=evaluate)
    train_set, eval_set = splits.train, (held_out_examples(splits, cfg) if evaluate else splits.eval)
    if train and (cfg.train.eval_every or cfg.train.sample_every) and not splits.validation:
        raise KerasftError("train.eval_every / train.sample_every need a validation split: set data.validation "
                           "or data.split.ratios")
    preference = cfg.train.objective != "sft"
    if preference and cfg.data.task != "sft":
        raise KerasftError(f"train.objective {cfg.train.objective}: needs data.task sft (preference pairs), "
                           f"not {cfg.data.task}")
    if preference and train:
        unpaired = next((ex for ex in [*splits.train, *splits.validation] if not ex.rejected), None)
        if unpaired is not None:
            raise KerasftError(f"{unpaired.origin or unpaired.id}: no rejected answer; train.objective "
                               f"{cfg.train.objective} trains on preference pairs (prompt or messages, chosen, rejected)")
    # A missing, unreachable or unknown model fails here, before the run dir is written.
    resolve_preset(cfg.model.preset, cache_dir(cfg.model.cache_dir))
    set_distribution(cfg.runtime)  # checks runtime.mesh against the devices; before the model loads
    primary = is_primary()  # in a multi-process job only process 0 writes the run dir
    if process_count() > 1 and (evaluate or export):
        print("multi-process job: training only; evaluate and export the run dir on one host "
              "(kerasft eval / kerasft export)", flush=True)
        evaluate = export = False
    if primary:
        _resumable_run_dir(cfg) if resume else _fresh_run_dir(cfg.run_dir, overwrite)
    run_dir = RunDir(cfg.run_dir)
    barrier("kerasft: run dir ready")
    summary: dict = {"run_dir": str(run_dir), "timings": {}}
    clock = _stage_timer(summary["timings"])
    try:
        if primary:
            save_config(cfg, run_dir.config)
            write_splits(splits, run_dir.data)  # the exact examples of this run, as JSONL
            write_json(run_dir.lineage, lineage.collect(config_to_dict(cfg), run_dir.root))

        init_backend(cfg.train.seed)
        with clock("load"):
            print(f"loading model {cfg.model.preset!r} ...", flush=True)
            loaded = load_model(cfg.model)
            summary["model"] = {"quantize": loaded.quantization}
        tokens = chat_tokens(loaded.tokenizer)
        # The default trainable tokens are Gemma's turn tokens; other templates train their own.
        turn_tokens = trainable_turn_tokens(cfg.lora.trainable_tokens, resolve_template(cfg.data.template, tokens))
        cfg = replace(cfg, lora=replace(cfg.lora, trainable_tokens=turn_tokens))
        if cfg.lora.train_new_tokens:  # the rows `kerasft vocab add` added to this preset
            cfg = with_new_tokens(cfg, loaded.path)
        # Adapters start with B = 0, so this model computes exactly the base model's function.
        apply_lora(loaded.backbone, cfg.lora)
        eval_model = KerasModel(loaded.backbone, loaded.tokenizer, name=cfg.model.preset)
        results = {}
        token_rows = token_ids_for(loaded.tokenizer, cfg.lora.trainable_tokens)
        spec = TrainSpec.of(cfg, token_rows, tokens.pad)
        # Held-out preference pairs (the validation split of a dpo / orpo run): scored before and
        # after training with the step's own loss and statistics, for the report.
        pairs = None
        if preference and train and splits.validation:
            pairs, _ = tokenize_cached(tokens, splits.validation, cfg.data, cache_dir(cfg.model.cache_dir), pairs=True)
            if cfg.train.objective == "dpo":  # the reference, before training changes the token rows
                precompute_reference(loaded.backbone, pairs, spec)
        if evaluate and cfg.eval.compare_base:
            with clock("eval_base"):
                results["base"] = evaluate_and_save(eval_model, eval_set, cfg, run_dir, "base",
                                                    pairs=pairs, spec=spec, backbone=loaded.backbone)
            print("  base: " + "  ".join(f"{k} {v:.1f}" for k, v in list(headline(results["base"]).items())[:3]), flush=True)
        if train:
            data, cached = tokenize_cached(tokens, train_set, cfg.data, cache_dir(cfg.model.cache_dir), pairs=preference)
            steps = planned_steps(data.num_examples, cfg.train)
            padding = padding_fraction(data, cfg.train.batch_size, cfg.train.seed)
            summary["data"] = {"rows": len(data), "trimmed": data.trimmed, "dropped": data.dropped,
                               "padding_fraction": round(padding, 4), "tokenized_from_cache": cached}
            what = (f"{cfg.train.objective.upper()} (beta {cfg.train.beta:g}"
                    f"{', ' + cfg.train.dpo_loss if cfg.train.objective == 'dpo' else ''}) on preference pairs, "
                    if preference else "")
            print(
                f"training LoRA r={cfg.lora.rank} alpha={cfg.lora.alpha:g} on {list(cfg.lora.targets)}: {what}"
                f"{f'{len(train_set)} examples' if isinstance(train_set, list) else train_set.spec} in {len(data)} rows ({data.trimmed} trimmed, {padding:.0%} padding"
                f"{', tokens from cache' if cached else ''}), {steps} steps of batch "
                f"{cfg.train.batch_size}x{cfg.train.grad_accum}",
                flush=True,
            )
            if cfg.train.precompute_reference:
                with clock("reference"):
                    hit = precompute_reference(loaded.backbone, data, spec, _reference_cache(cfg, data))
                print(f"  reference log-probs of {data.num_examples} pairs {'from cache' if hit else 'computed'}", flush=True)
            validation = None
            if cfg.train.eval_every:
                validation = pairs if preference else tokenize_cached(tokens, splits.validation, cfg.data,
                                                                      cache_dir(cfg.model.cache_dir))[0]
            with clock("train"):
                result = train_lora(loaded.backbone, data, spec, run_dir.root,
                                    resume=resume, validation=validation,
                                    sampler=_sampler(eval_model, splits.validation, cfg),
                                    config=config_to_dict(cfg), name=cfg.name)
            summary["train"] = {"steps": result.steps, "final_loss": result.final_loss,
                                "tokens_per_second": round(result.tokens_per_second, 1)}
            if cfg.train.eval_every:
                summary["train"].update(best_step=result.best_step, best_eval_loss=result.best_eval_loss,
                                        stopped_early=result.stopped_early)
            if primary:
                save_adapter(loaded.backbone, cfg.lora, run_dir.adapter, base_model=cfg.model.preset,
                             token_ids=token_rows)
        if evaluate:
            with clock("eval"):
                eval_model.name = f"{cfg.model.preset} + {run_dir.adapter}" if train else cfg.model.preset
                results["tuned"] = evaluate_and_save(eval_model, eval_set, cfg, run_dir, "tuned",
                                                     pairs=pairs, spec=spec, backbone=loaded.backbone)
            summary["eval"] = {name: {**headline(r), "count": r["count"]} for name, r in results.items()}
        if export and cfg.export.enabled:
            with clock("export"):
                summary["export"] = export_and_verify(loaded.backbone, loaded.tokenizer, tokens, eval_set or train_set,
                                                      run_dir.export(cfg.export.format), cfg, run_dir=run_dir.root)
        if primary:
            run_dir.summary.write_text(json.dumps(summary, indent=2) + "\n")
        if results:
            write_reports(run_dir, results, cfg)
    except BaseException as err:
        if primary:
            run_dir.failed.write_text("this run did not finish; its outputs are incomplete\n")
            event = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            notify(cfg.train.notify, event, {"run": cfg.name, "run_dir": str(run_dir), "summary": summary,
                                             "error": str(err).splitlines()[0] if str(err) else type(err).__name__})
        raise
    if primary:
        notify(cfg.train.notify, "finished", {"run": cfg.name, "run_dir": str(run_dir), "summary": summary})
    return summary


def reproduce(run_dir: str | Path, *, out: str | Path | None = None, check: bool = False,
              overwrite: bool = False) -> tuple[dict, list[str]]:
    """`kerasft reproduce`: reruns a run dir's resolved config (config.yaml) into a new run dir,
    with the stages the run had, reading its data files where lineage.json recorded them.

    Returns (summary of the rerun, differences). Before anything runs, lineage.differences()
    lines are printed (another commit, package, machine or data file). A changed data file is an
    error with `check`: the rerun could not repeat the run. With `check` the differences are
    lineage.compare_runs() lines: every training log value, evaluation and adapter byte that
    the rerun did not repeat (empty: reproduced exactly).

    Args:
        out: the rerun's folder (default: RUN_DIR-reproduce beside it).
    """
    source = RunDir(run_dir)
    if not source.config.is_file():
        raise KerasftError(f"{source}: not a run dir (no config.yaml)")
    recorded = lineage.read(source.lineage)
    out = Path(out) if out else source.root.with_name(source.root.name + "-reproduce")
    overrides = [f"output_dir={out.parent}", f"name={out.name}"]
    cfg = load_config(source.config, overrides)
    # Data paths as the run wrote them (relative ones from its working directory); where one does
    # not resolve from here, the absolute path lineage.json recorded.
    data = config_to_dict(cfg)["data"]
    moved = [f"{key}={entry['path']}" for key, entry in recorded.get("data_files", {}).items()
             if entry.get("path") and not Path(str(_dotted(data, key.split(".", 1)[1]))).is_file()]
    cfg = load_config(source.config, overrides + moved) if moved else cfg
    notes = lineage.differences(recorded, lineage.collect(config_to_dict(cfg), out / "not-written-yet"))
    for line in notes:
        print(f"lineage differs: {line}", flush=True)
    changed = [line for line in notes if line.startswith("data.")]
    if check and changed:
        raise KerasftError(f"{source.lineage}: {changed[0]}; the rerun cannot repeat this run")
    if check and not notes:
        print("same commit, packages, machine kind and data: the numbers must repeat exactly", flush=True)
    done = json.loads(source.summary.read_text()) if source.summary.is_file() else {}
    stages = {"train": "train" in done or source.has_adapter, "evaluate": "eval" in done, "export": "export" in done}
    summary = run(cfg, overwrite=overwrite, **stages)
    return summary, (lineage.compare_runs(source.root, out) if check else [])


def _dotted(values: dict, key: str):
    for part in key.split("."):
        values = values.get(part) or {}
    return values


def held_out_examples(splits: DataSplits, cfg: RunConfig) -> list:
    """The examples `run` and `eval` score: eval.split of the data, cut to data.eval_limit; the
    evaluation config is checked first (a metric's missing extra or file fails here, not later)."""
    check_eval_config(cfg.eval)
    examples = splits.held_out(cfg.eval.split)
    return examples[: cfg.data.eval_limit] if cfg.data.eval_limit and examples else examples


def evaluate_and_save(model, examples, cfg: RunConfig, run_dir: RunDir, which: str, *, pairs=None, spec=None,
                      backbone=None) -> dict:
    """Scores one model (`which`: "base" or "tuned") with the task's metrics and writes its result
    (eval_base.json / eval.json). With held-out preference `pairs` (a tokenised pairs set of a
    dpo / orpo run, `spec` its TrainSpec, `backbone` the model's), the result also holds their
    loss and statistics (kerasft.train.loop.score_pairs) under "preference"."""
    label = "the base model" if which == "base" else "the fine-tuned model"
    print(f"evaluating {label} on {len(examples)} held-out examples ...", flush=True)
    result = evaluate(model, examples, cfg.eval, cfg.data)
    if pairs is not None:
        result["preference"] = score_pairs(backbone, pairs, spec)
        print(f"  held-out pairs ({which}): " + "  ".join(f"{k} {v:.3f}" for k, v in result["preference"].items()
                                                         if k != "pairs"), flush=True)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    write_eval(result, run_dir.eval_result(which))
    return result


def write_reports(run_dir: RunDir, results: dict, cfg: RunConfig) -> None:
    """The comparison table (printed and eval_table.txt) and report.md / report.json / plots."""
    table = comparison_table(results)
    print("\n" + table)
    run_dir.eval_table.write_text(table + "\n")
    write_report(run_dir.root, results, run_dir.metrics, cfg.eval.worst, cfg.eval.plots)
    print(f"report: {run_dir.report_md}", flush=True)


def evaluate_run(cfg: RunConfig) -> dict:
    """`kerasft eval`: scores the run's adapter (or eval.source: a preset, run dir or Hugging Face
    folder) on the held-out split, and the base model too with eval.compare_base, through the
    same evaluation stage as `run`. Returns {"base"?, "tuned"} results."""
    examples = held_out_examples(build_datasets(cfg.data, need_train=False, need_eval=True), cfg)
    run_dir = RunDir(cfg.run_dir)
    if not cfg.eval.source and not run_dir.has_adapter:
        raise KerasftError(f"{run_dir}: no trained adapter; run `kerasft train` on this config first or set eval.source")
    init_backend(cfg.train.seed)
    results, tuned = {}, None
    if cfg.eval.compare_base:
        loaded = load_model(cfg.model)
        base = KerasModel(loaded.backbone, loaded.tokenizer, name=cfg.model.preset)
        results["base"] = evaluate_and_save(base, examples, cfg, run_dir, "base")
        if not cfg.eval.source:  # the run's own adapter goes on the base already in memory
            load_adapter(loaded.backbone, run_dir.adapter)
            tuned = KerasModel(loaded.backbone, loaded.tokenizer, name=f"{cfg.model.preset} + {run_dir.adapter}")
    if tuned is None:
        source = cfg.eval.source or str(run_dir)
        tuned = open_model(source, name=cfg.eval.source or f"{cfg.model.preset} + {run_dir.adapter}")
    results["tuned"] = evaluate_and_save(tuned, examples, cfg, run_dir, "tuned")
    write_reports(run_dir, results, cfg)
    return results


def export_and_verify(backbone, tokenizer, tokens, examples, out_dir: Path, cfg: RunConfig, overwrite: bool = False,
                      *, run_dir: Path | None = None, source: str = "") -> dict:
    """Exports in cfg.export.format (hf, peft or gguf) with a model card, then (if
    cfg.export.verify) checks the export in a second reader (kerasft.export.verify): hf in
    transformers, gguf through kerasft's GGUF importer (Llama: transformers). Lossless exports
    (hf float32, gguf f32) fail on a mismatch; lossy ones report their difference. A PEFT adapter
    is not checked here (it needs its base in transformers' format), and the output says so.
    A run's trained embedding rows go into a PEFT adapter as trainable tokens.

    Args:
        run_dir: the training run the model comes from, for the model card.
        source: what the model was loaded from, for the model card.
    """
    fmt, export_cfg = cfg.export.format, cfg.export
    details = {"hf": {"dtype": export_cfg.dtype}, "peft": {}, "gguf": {"file": f"model-{export_cfg.quant}.gguf",
                                                                      "quantization": export_cfg.quant}}.get(fmt, {})
    card = model_card(fmt, backbone, source=source or cfg.model.preset, run_dir=run_dir, extra=details)
    report = {"path": str(out_dir), "format": fmt}
    sample = next(iter(examples))
    ids = np.asarray([(encode_prompt(tokens, sample.prompt, cfg.data.system) + encode_response(tokens, sample.response))[:96]])
    if fmt in DERIVED_FORMATS:  # savedmodel, onnx, torch: checked before they are renamed into place
        print(f"exporting {fmt} to {out_dir} ...", flush=True)
        return export_derived(fmt, backbone, tokenizer, out_dir, ids, card=card, overwrite=overwrite,
                              chat_template=cfg.data.template, verify=export_cfg.verify, atol=export_cfg.atol,
                              rtol=export_cfg.rtol)
    if fmt == "peft":
        print(f"exporting the PEFT LoRA adapter to {out_dir} ...", flush=True)
        export_peft(backbone, out_dir, base_model_name_or_path=cfg.model.preset, token_ids=_trained_token_ids(run_dir),
                    card=card, overwrite=overwrite)
        report["verify"] = _not_checked(out_dir, "a PEFT adapter runs on its base model in transformers' format, "
                                                 "which this run does not have; export --format hf for a checked model")
        return report
    if fmt == "gguf":
        print(f"exporting GGUF ({export_cfg.quant}) to {out_dir} ...", flush=True)
        path = export_gguf(backbone, tokenizer, out_dir, quant=export_cfg.quant, card=card, overwrite=overwrite,
                           chat_template=cfg.data.template, system=cfg.data.system, decoding=cfg.eval)
        report["file"] = str(path)
        report["verify"] = (_print_check(verify_gguf_export(path, backbone, ids, atol=export_cfg.atol, rtol=export_cfg.rtol),
                                         path, "GGUF re-import (kerasft importer)", strict=export_cfg.quant == "f32")
                            if export_cfg.verify else _not_checked(path, "export.verify is off"))
        return report
    print(f"exporting merged Hugging Face model to {out_dir} ...", flush=True)
    export_hf(backbone, tokenizer, out_dir, dtype=export_cfg.dtype, max_shard_bytes=int(export_cfg.max_shard_mb * 1e6),
              card=card, overwrite=overwrite, chat_template=cfg.data.template)
    report["verify"] = (_print_check(verify_hf_export(out_dir, backbone, ids, atol=export_cfg.atol, rtol=export_cfg.rtol),
                                     out_dir, "transformers reload (float64 reference)",
                                     strict=export_cfg.dtype == "float32")
                        if export_cfg.verify else _not_checked(out_dir, "export.verify is off"))
    return report


def _print_check(check: dict, path: Path, what: str, strict: bool) -> dict:
    """Prints a verification line; raises on a mismatch when `strict` (a lossless export)."""
    verdict = ("OK" if check["ok"] else "MISMATCH") if strict else "lossy format, not checked against the tolerance"
    print(f"  {what}: max |logit diff| = {check['max_abs_diff']:.2e} at logit scale {check['logit_scale']:.1f} "
          f"({verdict}, tolerance {check['tolerance']:.1e})", flush=True)
    if strict and not check["ok"]:
        raise KerasftError(f"{path}: exported logits differ from Keras by {check['max_abs_diff']:.3g}")
    return check


def _not_checked(path: Path, reason: str) -> dict:
    print(f"  {path}: written WITHOUT a logits check: {reason}", flush=True)
    return unchecked(reason)


def _trained_token_ids(run_dir: Path | None) -> list[int]:
    """Ids of the tokens whose embedding rows a run trained (saved with its adapter), if any."""
    run = RunDir(run_dir) if run_dir else None
    if not run or not run.has_adapter:
        return []
    rows = read_adapter_config(run.adapter).get("trainable_tokens") or {}
    return [int(i) for i in rows.get("ids", [])]


def _reference_cache(cfg: RunConfig, data) -> Path | None:
    """Where train.precompute_reference keeps the reference log-probs of a tokenised set: beside
    the token cache, keyed by its tokens and the base model's settings (None without a cache).
    The key does not hash the weights: a preset changed in place needs data.cache=false."""
    if not data.cache_key:
        return None
    import hashlib

    key = hashlib.sha256(json.dumps([data.cache_key, config_to_dict(cfg.model)]).encode()).hexdigest()[:32]
    return cache_dir(cfg.model.cache_dir) / "reference" / f"{key}.npy"


def _sampler(model, validation, cfg: RunConfig):
    """For train.sample_every: greedy generations from the first train.sample_prompts validation
    prompts, as [{"prompt", "output"}] (None when sampling is off)."""
    if not cfg.train.sample_every:
        return None
    examples = validation[: cfg.train.sample_prompts]
    prompt_ids = [model.encode_prompt(example.prompt, cfg.data.system) for example in examples]

    def sample() -> list[dict]:
        outputs, _ = model.generate(prompt_ids, cfg.train.sample_tokens, batch_size=len(prompt_ids))
        return [{"prompt": example.prompt, "output": model.decode(ids)} for example, ids in zip(examples, outputs)]

    return sample


def _resumable_run_dir(cfg: RunConfig) -> Path:
    """The existing run dir of `cfg`, checked to hold the same run (or a new one if none exists)."""
    run_dir = cfg.run_dir
    saved_path = RunDir(run_dir).config
    if saved_path.is_file():
        saved, current = config_to_dict(load_config(saved_path)), config_to_dict(cfg)
        for section in ("model", "lora", "data", "train"):  # another mesh restores fine, resharded
            for key in sorted(set(saved[section]) | set(current[section])):
                if saved[section].get(key) != current[section].get(key):
                    raise KerasftError(
                        f"{saved_path}: cannot resume: {section}.{key} was {saved[section].get(key)!r}, "
                        f"now {current[section].get(key)!r}"
                    )
    RunDir(run_dir).failed.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _fresh_run_dir(run_dir: Path, overwrite: bool) -> Path:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise KerasftError(f"{run_dir}: run dir already exists; pass --overwrite or set name=<new name>")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _stage_timer(timings: dict):
    """`with clock("train"):` records that stage's wall time in seconds."""

    @contextlib.contextmanager
    def clock(name: str):
        start = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - start, 1)

    return clock
