"""The fine-tuning run, top to bottom: load -> LoRA -> data -> evaluate base -> train -> evaluate
-> export and verify. The CLI, the quickstart and the tests all call these functions.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

from kerasft.config import RunConfig, config_to_dict, load_config, save_config
from kerasft.errors import KerasftError

ADAPTER_DIR = "adapter"
EXPORT_DIR = "export_hf"
EXPORT_FORMATS = ("hf", "peft", "gguf")


def run(cfg: RunConfig, *, train: bool = True, evaluate: bool = True, export: bool = True, overwrite: bool = False,
        resume: bool = False) -> dict:
    """Runs the configured stages and returns a summary (also written to summary.json).

    Args:
        cfg: the resolved run config; everything is written under cfg.run_dir.
        train / evaluate / export: which stages to run.
        overwrite: replace an existing run dir instead of refusing.
        resume: continue training from the run dir's newest checkpoint (its config must match).
    """
    from dataclasses import replace as _replace

    from kerasft.data.pipeline import padding_fraction, tokenize_cached
    from kerasft.data.prepare import build_datasets, write_splits
    from kerasft.data.template import chat_tokens, resolve_template
    from kerasft.evaluate.evaluator import check_eval_config, comparison_table, headline, write_eval
    from kerasft.evaluate.evaluator import evaluate as evaluate_model
    from kerasft.evaluate.generate import KerasModel
    from kerasft.evaluate.report import write_report
    from kerasft.models.families import trainable_turn_tokens
    from kerasft.models.lora import apply_lora, save_adapter, token_ids_for
    from kerasft.models.presets import cache_dir, load_model
    from kerasft.runtime import barrier, init_backend, is_primary, process_count, set_distribution
    from kerasft.train.loop import planned_steps
    from kerasft.train.loop import train as train_lora

    # Read and check every input before anything is written or any slow stage starts.
    evaluate = evaluate and cfg.data.task != "pretrain"  # raw text has no answers to generate
    splits = build_datasets(cfg.data, need_train=train, need_eval=evaluate)
    train_set, eval_set = splits.train, (splits.held_out(cfg.eval.split) if evaluate else splits.eval)
    if cfg.data.eval_limit and eval_set:
        eval_set = eval_set[: cfg.data.eval_limit]
    if evaluate:
        check_eval_config(cfg.eval)
    if train and (cfg.train.eval_every or cfg.train.sample_every) and not splits.validation:
        raise KerasftError("train.eval_every / train.sample_every need a validation split: set data.validation "
                           "or data.split.ratios")
    set_distribution(cfg.runtime)  # checks runtime.mesh against the devices; before the model loads
    primary = is_primary()  # in a multi-process job only process 0 writes the run dir
    if process_count() > 1 and (evaluate or export):
        print("multi-process job: training only; evaluate and export the run dir on one host "
              "(kerasft eval / kerasft export)", flush=True)
        evaluate = export = False
    if primary:
        run_dir = _resumable_run_dir(cfg) if resume else _fresh_run_dir(cfg.run_dir, overwrite)
    else:
        run_dir = cfg.run_dir
    barrier("kerasft: run dir ready")
    summary: dict = {"run_dir": str(run_dir), "timings": {}}
    clock = _stage_timer(summary["timings"])
    try:
        if primary:
            save_config(cfg, run_dir / "config.yaml")
            write_splits(splits, run_dir / "data")  # the exact examples of this run, as JSONL

        init_backend(cfg.train.seed)
        with clock("load"):
            print(f"loading model {cfg.model.preset!r} ...", flush=True)
            loaded = load_model(cfg.model)
            summary["model"] = {"quantize": _quantize(loaded.backbone, cfg.model.quantize)}
        tokens = chat_tokens(loaded.tokenizer)
        # The default trainable tokens are Gemma's turn tokens; other templates train their own.
        turn_tokens = trainable_turn_tokens(cfg.lora.trainable_tokens, resolve_template(cfg.data.template, tokens))
        cfg = _replace(cfg, lora=_replace(cfg.lora, trainable_tokens=turn_tokens))
        if cfg.lora.train_new_tokens:  # the rows `kerasft vocab add` added to this preset
            from kerasft.models.vocab import with_new_tokens

            cfg = with_new_tokens(cfg, loaded.path)
        # Adapters start with B = 0, so this model computes exactly the base model's function.
        apply_lora(loaded.backbone, cfg.lora)
        eval_model = KerasModel(loaded.backbone, loaded.tokenizer, name=cfg.model.preset)
        results = {}
        if evaluate and cfg.eval.compare_base:
            with clock("eval_base"):
                print(f"evaluating the base model on {len(eval_set)} held-out questions ...", flush=True)
                results["base"] = evaluate_model(eval_model, eval_set, cfg.eval, cfg.data)
            write_eval(results["base"], run_dir / "eval_base.json")
            print("  base: " + "  ".join(f"{k} {v:.1f}" for k, v in list(headline(results["base"]).items())[:3]), flush=True)
        if train:
            data, cached = tokenize_cached(tokens, train_set, cfg.data, cache_dir(cfg.model.cache_dir))
            steps = planned_steps(len(data), cfg.train)
            padding = padding_fraction(data, cfg.train.batch_size, cfg.data.sequence_length, cfg.train.seed)
            summary["data"] = {"rows": len(data), "trimmed": data.trimmed, "dropped": data.dropped,
                               "padding_fraction": round(padding, 4), "tokenized_from_cache": cached}
            print(
                f"training LoRA r={cfg.lora.rank} alpha={cfg.lora.alpha:g} on {list(cfg.lora.targets)}: "
                f"{f'{len(train_set)} examples' if isinstance(train_set, list) else train_set.spec} in {len(data)} rows ({data.trimmed} trimmed, {padding:.0%} padding"
                f"{', tokens from cache' if cached else ''}), {steps} steps of batch "
                f"{cfg.train.batch_size}x{cfg.train.grad_accum}",
                flush=True,
            )
            token_rows = token_ids_for(loaded.tokenizer, cfg.lora.trainable_tokens)
            validation = None
            if cfg.train.eval_every:
                validation, _ = tokenize_cached(tokens, splits.validation, cfg.data, cache_dir(cfg.model.cache_dir))
            with clock("train"):
                result = train_lora(loaded.backbone, data, cfg.train, cfg.data.sequence_length, run_dir, tokens.pad,
                                    token_rows=token_rows or None, resume=resume, dropout=cfg.lora.dropout,
                                    validation=validation, sampler=_sampler(eval_model, splits.validation, cfg),
                                    config=config_to_dict(cfg), name=cfg.name)
            summary["train"] = {"steps": result.steps, "final_loss": result.final_loss,
                                "tokens_per_second": round(result.tokens_per_second, 1)}
            if cfg.train.eval_every:
                summary["train"].update(best_step=result.best_step, best_eval_loss=result.best_eval_loss,
                                        stopped_early=result.stopped_early)
            if primary:
                save_adapter(loaded.backbone, cfg.lora, run_dir / ADAPTER_DIR, base_model=cfg.model.preset,
                             token_ids=token_rows)
        if evaluate:
            with clock("eval"):
                print(f"evaluating the fine-tuned model on {len(eval_set)} held-out questions ...", flush=True)
                eval_model.name = f"{cfg.model.preset} + {run_dir / ADAPTER_DIR}" if train else cfg.model.preset
                results["tuned"] = evaluate_model(eval_model, eval_set, cfg.eval, cfg.data)
            write_eval(results["tuned"], run_dir / "eval.json")
            summary["eval"] = {name: {**headline(r), "count": r["count"]} for name, r in results.items()}
        if export and cfg.export.enabled:
            with clock("export"):
                export_dir = run_dir / (EXPORT_DIR if cfg.export.format == "hf" else f"export_{cfg.export.format}")
                summary["export"] = export_and_verify(loaded.backbone, loaded.tokenizer, tokens, eval_set or train_set,
                                                      export_dir, cfg, run_dir=run_dir)
        if primary:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if results:
            print("\n" + comparison_table(results))
            (run_dir / "eval_table.txt").write_text(comparison_table(results) + "\n")
            write_report(run_dir, results, run_dir / "metrics.jsonl", cfg.eval.worst, cfg.eval.plots)
            print(f"report: {run_dir / 'report.md'}", flush=True)
    except BaseException:
        if primary:
            (run_dir / "FAILED").write_text("this run did not finish; its outputs are incomplete\n")
        raise
    return summary


def export_and_verify(backbone, tokenizer, tokens, examples, out_dir: Path, cfg: RunConfig, overwrite: bool = False,
                      *, run_dir: Path | None = None, source: str = "") -> dict:
    """Exports in cfg.export.format (hf, peft or gguf) with a model card, then (if
    cfg.export.verify) checks the export in its consumer: hf in transformers, gguf through
    kerasft's GGUF importer; peft is checked by the test suite only (it needs the base export).
    A run's trained embedding rows go into a PEFT adapter as trainable tokens.

    Args:
        run_dir: the training run the model comes from, for the model card.
        source: what the model was loaded from, for the model card.
    """
    import numpy as np

    from kerasft.data.template import encode_prompt, encode_response
    from kerasft.export.card import model_card
    from kerasft.export.gguf import QUANTS

    fmt, export_cfg = cfg.export.format, cfg.export
    if fmt not in EXPORT_FORMATS:
        raise KerasftError(f"export.format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if fmt == "gguf" and export_cfg.quant not in QUANTS:
        raise KerasftError(f"export.quant must be one of {', '.join(QUANTS)}, got {export_cfg.quant!r}")
    details = {"hf": {"dtype": export_cfg.dtype}, "peft": {}, "gguf": {"file": f"model-{export_cfg.quant}.gguf",
                                                                      "quantization": export_cfg.quant}}[fmt]
    card = model_card(fmt, backbone, source=source or cfg.model.preset, run_dir=run_dir, extra=details)
    report = {"path": str(out_dir), "format": fmt}
    sample = next(iter(examples))
    ids = np.asarray([(encode_prompt(tokens, sample.prompt, cfg.data.system) + encode_response(tokens, sample.response))[:96]])
    if fmt == "peft":
        from kerasft.export.peft import export_peft

        print(f"exporting the PEFT LoRA adapter to {out_dir} ...", flush=True)
        export_peft(backbone, out_dir, base_model_name_or_path=cfg.model.preset, token_ids=_trained_token_ids(run_dir),
                    card=card, overwrite=overwrite)
        return report
    if fmt == "gguf":
        from kerasft.export.gguf import export_gguf

        print(f"exporting GGUF ({export_cfg.quant}) to {out_dir} ...", flush=True)
        path = export_gguf(backbone, tokenizer, out_dir, quant=export_cfg.quant, card=card, overwrite=overwrite,
                           chat_template=cfg.data.template, system=cfg.data.system)
        report["file"] = str(path)
        if export_cfg.verify:
            report["verify"] = _check(verify_gguf_export(path, backbone, ids, atol=export_cfg.atol, rtol=export_cfg.rtol),
                                      path, "GGUF re-import (kerasft importer)", strict=export_cfg.quant == "f32")
        return report

    from kerasft.export.hf import export_hf, verify_hf_export

    print(f"exporting merged Hugging Face model to {out_dir} ...", flush=True)
    export_hf(backbone, tokenizer, out_dir, dtype=export_cfg.dtype, max_shard_bytes=int(export_cfg.max_shard_mb * 1e6),
              card=card, overwrite=overwrite, chat_template=cfg.data.template)
    if export_cfg.verify and export_cfg.dtype == "float32":
        check = verify_hf_export(out_dir, backbone, ids, atol=export_cfg.atol, rtol=export_cfg.rtol)
        report["verify"] = _check(check, out_dir, "transformers reload (float64 reference)", strict=True)
    return report


def verify_gguf_export(gguf_path: Path, backbone, token_ids, *, atol: float = 1e-4, rtol: float = 1e-5) -> dict:
    """Imports a GGUF export with kerasft's importer (into a temporary folder) and compares its
    logits with the Keras model's; the same report as kerasft.export.hf.verify_hf_export."""
    import tempfile

    import numpy as np

    from kerasft.export.gguf import verify_llama_gguf
    from kerasft.export.hf import keras_logits
    from kerasft.config import ModelConfig
    from kerasft.models.families import LLAMA_FAMILIES, model_family
    from kerasft.models.gguf import import_gguf
    from kerasft.models.presets import load_model

    if model_family(backbone) in LLAMA_FAMILIES:  # kerasft's importer reads Gemma files only
        return verify_llama_gguf(gguf_path, backbone, token_ids, atol=atol, rtol=rtol)
    with tempfile.TemporaryDirectory(prefix="kerasft-gguf-check-") as folder:
        preset = import_gguf(gguf_path, Path(folder) / "preset")
        # Loaded as every model is (same attention code): the check compares the weights.
        theirs = keras_logits(load_model(ModelConfig(preset=str(preset))).backbone, token_ids)
    ours = keras_logits(backbone, token_ids)
    diff, scale = float(np.max(np.abs(theirs - ours))), float(np.max(np.abs(ours)))
    tolerance = atol + rtol * scale
    return {"max_abs_diff": diff, "tolerance": tolerance, "logit_scale": scale, "ok": diff <= tolerance,
            "reference": "kerasft GGUF import"}


def _check(check: dict, path: Path, what: str, strict: bool) -> dict:
    """Prints a verification line; raises on a mismatch when `strict` (a lossless export)."""
    verdict = ("OK" if check["ok"] else "MISMATCH") if strict else "lossy format, not checked against the tolerance"
    print(f"  {what}: max |logit diff| = {check['max_abs_diff']:.2e} at logit scale {check['logit_scale']:.1f} "
          f"({verdict}, tolerance {check['tolerance']:.1e})", flush=True)
    if strict and not check["ok"]:
        raise KerasftError(f"{path}: exported logits differ from Keras by {check['max_abs_diff']:.3g}")
    return check


def _trained_token_ids(run_dir: Path | None) -> list[int]:
    """Ids of the tokens whose embedding rows a run trained (saved with its adapter), if any."""
    path = Path(run_dir) / ADAPTER_DIR / "adapter_config.json" if run_dir else None
    if not path or not path.is_file():
        return []
    rows = json.loads(path.read_text()).get("trainable_tokens") or {}
    return [int(i) for i in rows.get("ids", [])]


def load_source(src: str, model_overrides: dict | None = None):
    """A (LoadedModel, config-or-None) for a run dir (base + adapter) or any preset string."""
    from kerasft.config import ModelConfig
    from kerasft.models.lora import load_adapter
    from kerasft.models.presets import load_model

    path = Path(src)
    if (path / ADAPTER_DIR / "adapter_config.json").is_file():
        cfg = load_config(path / "config.yaml") if (path / "config.yaml").is_file() else None
        model_cfg = cfg.model if cfg else ModelConfig(preset=json.loads((path / ADAPTER_DIR / "adapter_config.json").read_text())["base_model"])
        loaded = load_model(model_cfg)
        _quantize(loaded.backbone, model_cfg.quantize)  # the adapter trained on this quantized base
        load_adapter(loaded.backbone, path / ADAPTER_DIR)
        return loaded, cfg
    if (path / "summary.json").is_file() or (path / "config.yaml").is_file():
        raise KerasftError(f"{path}: run dir has no adapter (did training finish?)")
    model_cfg = ModelConfig(preset=src, **(model_overrides or {}))
    loaded = load_model(model_cfg)
    _quantize(loaded.backbone, model_cfg.quantize)
    return loaded, None


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


def _quantize(backbone, mode: str) -> dict:
    """Applies model.quantize to a freshly loaded backbone and prints the weight bytes saved."""
    from kerasft.models.quant import quantize_backbone

    report = quantize_backbone(backbone, mode)
    if mode != "none":
        before, after = report["weights_bytes_before"], report["weights_bytes_after"]
        print(f"  quantized {report['layers']} projections to {mode} (weight-only; embedding kept float): "
              f"weights {before / 2**20:,.1f} MiB -> {after / 2**20:,.1f} MiB", flush=True)
    return report


def _resumable_run_dir(cfg: RunConfig) -> Path:
    """The existing run dir of `cfg`, checked to hold the same run (or a new one if none exists)."""
    from kerasft.config import config_to_dict

    run_dir = cfg.run_dir
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        saved, current = config_to_dict(load_config(saved_path)), config_to_dict(cfg)
        for section in ("model", "lora", "data", "train"):  # another mesh restores fine, resharded
            for key in sorted(set(saved[section]) | set(current[section])):
                if saved[section].get(key) != current[section].get(key):
                    raise KerasftError(
                        f"{saved_path}: cannot resume: {section}.{key} was {saved[section].get(key)!r}, "
                        f"now {current[section].get(key)!r}"
                    )
    (run_dir / "FAILED").unlink(missing_ok=True)
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
