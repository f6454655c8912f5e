"""The `kerasft` command. Parsing and --help import nothing heavy: keras, jax and tensorflow load
only inside the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import sys

from kerasft import __version__
from kerasft.config import EXPORT_FORMATS, GGUF_QUANTS, HF_DTYPES
from kerasft.errors import KerasftError
from kerasft.runtime import TARGETS


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after options (`run cfg.yaml --overwrite train.max_steps=2`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KerasftError as err:
        if args.debug:
            raise
        print(f"kerasft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kerasft: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kerasft",
        description="Fine-tune Gemma models with Keras 3 on JAX: LoRA SFT, evaluation, verified export.",
    )
    parser.add_argument("--version", action="version", version=f"kerasft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
        p.set_defaults(func=func)
        return p

    def config_args(p):
        p.add_argument("config", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.max_steps=2")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run dir")

    config_args(command("run", _cmd_run, "train, evaluate base vs fine-tuned, export and verify"))
    p = command("train", _cmd_train, "train LoRA adapters and save them in the run dir")
    config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the run dir's newest checkpoint (train.checkpoint_every)")
    p = command("sweep", _cmd_sweep, "grid or random search over config keys: each trial trained and scored on the "
                "validation split, a table and one sensitivity plot per key, the best trial scored on test")
    p.add_argument("config")
    p.add_argument("axes", nargs="+", metavar="KEY=V1,V2",
                   help="swept keys (comma-separated values) and fixed overrides (one value), e.g. "
                        "lora.rank=4,8,16 train.learning_rate=1e-4,3e-4 train.max_steps=50")
    p.add_argument("--budget", type=int, default=0, help="at most N trials, a seeded random sample of the grid")
    p.add_argument("--metric", default="", help="validation metric that picks the best trial (default: the task's "
                   "first, e.g. f1; perplexity and losses are minimised, the rest maximised)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --budget sample")
    p.add_argument("--out", default="", help="sweep folder (default OUTPUT_DIR/NAME-sweep); rerun to resume")
    p = command("reproduce", _cmd_reproduce, "rerun a run dir's resolved config into RUN_DIR-reproduce; --check "
                "requires the same losses, evaluations and adapter bytes (same commit and machine kind)")
    p.add_argument("run_dir", help="a run folder written by `kerasft run` or `kerasft train` (has lineage.json)")
    p.add_argument("--check", action="store_true",
                   help="compare the rerun with the run; exit status 1 when any logged value differs")
    p.add_argument("--out", default="", help="the rerun's folder (default: RUN_DIR-reproduce)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing rerun folder")
    p = command("control", _cmd_control, "steer a running `kerasft train` / `kerasft run` job at its next step: save a "
                "checkpoint now, stop now (keeping the best or the last adapter), or change the learning rate")
    p.add_argument("run_dir", help="the run folder of the job that is training")
    p.add_argument("action", choices=["save", "stop", "lr"])
    p.add_argument("value", nargs="?", type=float, default=None, help="lr: the new learning rate")
    p.add_argument("--keep", default="last", choices=["last", "best"],
                   help="stop: keep these weights (last) or those of the lowest eval_loss so far (best)")
    p = command("plan", _cmd_plan, "per-device memory of the training step on a target, and the largest batch that fits")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--target", required=True, metavar="TARGET",
                   help=f"one of {', '.join(TARGETS)}; several GPUs as NxKEY (4xa100-80g). GPU targets compile with "
                        "XLA's CUDA compiler when the gpu-plan extra is installed (no GPU needed), TPU targets with "
                        "libtpu's (tpu-plan extra); otherwise with this machine's compiler, and the plan says so")
    p.add_argument("--devices", type=int, default=0, metavar="N",
                   help="GPUs of a GPU target (the mesh: runtime.mesh); the same as --target NxKEY")
    p.add_argument("--targets", type=int, default=0, metavar="K",
                   help="loss positions per row (response tokens); default the whole sequence, the worst case")
    p.add_argument("--no-search", action="store_true", help="compile only the configured batch size")
    p.add_argument("--measure", action="store_true",
                   help="also run one real step on this machine and compare its measured peak with the plan")
    p.add_argument("--json", action="store_true",
                   help="print the plan as one JSON object (bytes as integers) instead of the report")

    p = command("model", _cmd_model, "a model view before training: the backbone's weights per layer kind, parameter "
                "counts, the kernels LoRA wraps with its parameter count, and the trainable share (nothing allocated)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the view as one JSON object instead of the table")

    p = command("bench", _cmd_bench, "accelerator acceptance run on this machine's GPU or TPU: the Gemma 2 2B "
                "architecture (random bfloat16 weights, no download), LoRA r16 on query/value, sequence 1024: "
                "tokens/s, MFU, peak memory against the deviceless plan, attention paths, HF export parity")
    p.add_argument("--accelerator", action="store_true", help="run the accelerator acceptance run (required)")
    p.add_argument("--tiny", action="store_true", help="the tiny Gemma 2 preset instead: checks the harness anywhere")
    p.add_argument("--out", default="acceptance", help="folder for acceptance.json, acceptance.md and plan.txt")
    p.add_argument("--batch", type=int, default=0, help="rows per step (default 8, halved until the plan fits)")
    p.add_argument("--seq", type=int, default=0, help="sequence length (default 1024; 64 with --tiny)")
    p.add_argument("--steps", type=int, default=0, help="timed steps after 2 warm-up steps (default 10; 4 with --tiny)")

    p = command("eval", _cmd_eval, "evaluate a run's adapter, or eval.source (a preset, run dir or Hugging Face "
                "folder), on the held-out split; compare=base adds the base model; writes RUN_DIR/report.md")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, or compare=base")

    p = command("export", _cmd_export, "merge LoRA and export with a model card: Hugging Face safetensors "
                                       "(logits checked in transformers), GGUF (checked by re-import), a "
                                       "PEFT adapter (not checked), or a TensorFlow SavedModel, ONNX or PyTorch "
                                       "model (each checked in its own runtime)")
    p.add_argument("src", help="a run dir, a keras-hub preset dir, a .gguf file or any preset string")
    p.add_argument("out", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--format", default="hf", choices=EXPORT_FORMATS,
                   help="hf: merged safetensors (default); peft: LoRA adapter; gguf: llama.cpp file; savedmodel: "
                        "TensorFlow (logits + greedy signatures); onnx: model.onnx; torch: state_dict + torch.export")
    p.add_argument("--quant", default="f16", choices=GGUF_QUANTS,
                   help="GGUF matrix type (--format gguf: f32, f16, q8_0, q4_0, q5_0); only f32 must match exactly, "
                        "others report their error")
    p.add_argument("--dtype", default="float32", choices=HF_DTYPES,
                   help="safetensors dtype (--format hf); only float32 must match exactly, others report their error")
    p.add_argument("--max-shard-mb", type=float, default=5000.0,
                   help="split hf weights above this size into shards with model.safetensors.index.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-verify", action="store_true", help="skip the logits check of the export (the output says so)")

    p = command("push", _cmd_push, "upload an export folder and its model card to the Hugging Face Hub in one commit "
                "(private unless --public; token from --token, HF_TOKEN or `hf auth login`)")
    p.add_argument("src", help="a folder written by kerasft export (or RUN_DIR/export_hf)")
    p.add_argument("repo_id", help="owner/name on the Hub; created if it does not exist")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--token", default=None, help="a Hub token with write access (default: HF_TOKEN, then the login)")
    p.add_argument("--message", default="", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the plan; upload nothing")

    p = command("serve", _cmd_serve, "OpenAI-style HTTP server (/v1/completions, /v1/chat/completions): token "
                                     "streaming, continuous batching, sampling, several adapters over one base")
    p.add_argument("src", help="a run dir, a keras-hub preset dir, a Hugging Face export dir, a .gguf file or a preset")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_DIR",
                   help="serve this run's LoRA adapter over SRC (a base model) as model NAME; repeatable")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` (default: $KERASFT_API_KEY; unset: no key)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from this origin (repeatable; default: no CORS)")
    p.add_argument("--max-batch", type=int, default=8, help="most answers decoded together (KV cache rows)")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-seq-len", type=int, default=0,
                   help="prompt + max_tokens of one request: the cache length per row (default min(context, 1024))")
    p.add_argument("--max-prompt-tokens", type=int, default=0, help="longest prompt accepted (default max-seq-len - 1)")
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body (413 above)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="temperature of a request that sends none (default 0: greedy, as the run was evaluated)")
    p.add_argument("--context-length", type=int, default=0,
                   help="the model's context (default: the model family's)")

    p = command("generate", _cmd_generate, "greedy generation from a run dir or preset")
    p.add_argument("src", help="a run dir or a preset (embedded, a folder, a .gguf file, ...)")
    p.add_argument("prompt", nargs="+", help="user message(s); each is answered separately")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--system", default=None, help="system prompt (default: the run's data.system, else none)")
    p.add_argument("--json", action="store_true",
                   help="also print each generated token with its probability under the model (\"tokens\")")
    p.add_argument("--top-k", type=int, default=0,
                   help="with --json: each token's K most likely alternatives, with their probabilities (0-20)")

    p = command("attention", _cmd_attention, "draw a prompt's attention weights, as the model's own softmax "
                "computed them (after soft caps, within sliding windows), for one layer and one or all heads")
    p.add_argument("src", help="a run dir or a preset (embedded, a folder, a .gguf file, ...)")
    p.add_argument("prompt", help="user message, rendered with the run's chat template and system prompt")
    p.add_argument("--layer", type=int, default=-1, help="attention layer (default -1: the last; negative counts back)")
    p.add_argument("--head", type=int, default=None, help="one query head (default: every head, one panel each)")
    p.add_argument("--png", required=True, help="the heatmap PNG to write")
    p.add_argument("--json", default="", help="also write tokens and the layer's weights (heads x query x key) as JSON")
    p.add_argument("--system", default=None, help="system prompt (default: the run's data.system, else none)")

    p = command("import-gguf", _cmd_import_gguf, "convert a Gemma or Llama GGUF file into a keras-hub preset folder")
    p.add_argument("gguf_file")
    p.add_argument("out_preset")
    p.add_argument("--overwrite", action="store_true")

    p = command("data", None, "look at the configured data before a run: `kerasft data inspect CONFIG`")
    actions = p.add_subparsers(title="actions", metavar="ACTION")
    p = actions.add_parser("inspect", help="counts, bad records, duplicates, token lengths, categories",
                           description="Reads the config's data sources (listing bad records instead of "
                                       "stopping), tokenises with the model's tokenizer and writes "
                                       "inspect.json and token_lengths.png. Exit status 1 when there are errors.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--out", default="", help="report folder (default: RUN_DIR/data_inspect)")
    p.set_defaults(func=_cmd_data_inspect)

    p = command("vocab", None, "vocabulary expansion: `kerasft vocab check` and `kerasft vocab add`")
    actions = p.add_subparsers(title="actions", metavar="ACTION")
    p = actions.add_parser("check", help="tokens per word and per character, most fragmented words, before and "
                           "after adding pieces", description="How the model's tokenizer splits a word list or a "
                           "corpus, and (with --add) how a proposed expansion would split it.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("source", help="a YAML config (its model.preset) or a preset string")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--words", help="word list, one word per line")
    group.add_argument("--corpus", help="text file; every word in it counts")
    p.add_argument("--add", help="word list of the proposed expansion")
    p.add_argument("--type", default="normal", choices=["normal", "user_defined"],
                   help="normal: BPE pieces (default); user_defined: matched anywhere, also inside longer words")
    p.add_argument("--top", type=int, default=10, help="how many of the most fragmented words to list")
    p.add_argument("--json", default="", help="also write the report as JSON to this file")
    p.set_defaults(func=_cmd_vocab_check)
    p = actions.add_parser("add", help="add words as single pieces and grow the embedding: a new keras-hub preset",
                           description="Adds each word as one SentencePiece piece, resizes the tied embedding "
                                       "(new rows: the mean embedding or the mean of the word's old sub-tokens) "
                                       "and writes a new keras-hub preset with kerasft_vocab.json.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--preset", required=True, help="the model to expand (any preset string)")
    p.add_argument("--words", required=True, help="word list, one word per line")
    p.add_argument("--out", required=True, help="the new preset folder")
    p.add_argument("--init", default="mean", choices=["mean", "subtokens"], help="how new rows start")
    p.add_argument("--type", default="normal", choices=["normal", "user_defined"],
                   help="normal: BPE pieces (default); user_defined: matched anywhere, also inside longer words")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_vocab_add)

    p = command("studio", _cmd_studio, "no-code fine-tuning studio in the browser (gradio; pip install 'kerasft[ui]')")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--workspace", default="studio", help="folder for uploads, configs, runs and exports")
    p.add_argument("--auth", default="", metavar="USER:PASS", help="require this login")
    p.add_argument("--max-upload-mb", type=float, default=100.0, help="largest accepted upload")

    p = command("score", _cmd_score, "SQuAD F1/EM of a predictions file against SQuAD v1.1 references")
    p.add_argument("predictions", help="JSON object: question id -> answer text")
    p.add_argument("references", help="SQuAD v1.1 JSON")
    p.add_argument("--lang", default="es", choices=["es", "en"], help="answer normalisation (es: MLQA, en: SQuAD v1.1)")
    return parser


def _cmd_run(args) -> int:
    from kerasft.config import load_config
    from kerasft.workflow import run

    run(load_config(args.config, args.overrides), overwrite=args.overwrite)
    return 0


def _cmd_train(args) -> int:
    from kerasft.config import load_config
    from kerasft.workflow import run

    if args.resume and args.overwrite:
        raise KerasftError("--resume and --overwrite exclude each other")
    run(load_config(args.config, args.overrides), evaluate=False, export=False, overwrite=args.overwrite,
        resume=args.resume)
    return 0


def _cmd_sweep(args) -> int:
    from kerasft.sweep import sweep

    sweep(args.config, args.axes, budget=args.budget, metric=args.metric, seed=args.seed, out=args.out or None)
    return 0


def _cmd_control(args) -> int:
    from kerasft.train.control import request

    path = request(args.run_dir, args.action, keep=args.keep, value=args.value)
    print(f"requested {args.action}: {path} (the job acts on it when its current step ends)")
    return 0


def _cmd_reproduce(args) -> int:
    from kerasft.workflow import reproduce

    _, differences = reproduce(args.run_dir, out=args.out or None, check=args.check, overwrite=args.overwrite)
    if not args.check:
        return 0
    if differences:
        print(f"not reproduced: {len(differences)} difference(s) from {args.run_dir}:")
        print("\n".join(f"  {line}" for line in differences))
        return 1
    print(f"reproduced: every logged training value, evaluation and adapter byte of {args.run_dir} repeated exactly")
    return 0


def _cmd_plan(args) -> int:
    import dataclasses
    import os

    from kerasft.config import load_config
    from kerasft.runtime import cuda_compiler_installed, resolve_target

    cfg = load_config(args.config, args.overrides)
    key, target = resolve_target(args.target, args.devices)
    devices = target.devices
    cuda_compiler = target.kind == "gpu" and cuda_compiler_installed()
    if cuda_compiler and "jax" not in sys.modules and not os.path.exists("/dev/nvidiactl"):
        # XLA's CUDA compiler for abstract GPUs: on a machine without a GPU the CUDA plugin registers
        # only when JAX starts on the CPU platform (otherwise it fails on cuInit and is left out).
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if (devices > 1 and not cuda_compiler and "jax" not in sys.modules
            and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")):
        # Without TPUs, plan the 8-device layout on 8 simulated CPU devices (fixed when jax loads).
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    from kerasft.runtime import init_backend
    from kerasft.train.plan import format_plan, measure_step, plan_step

    init_backend()
    plan = plan_step(cfg, args.target, args.targets or None, search=not args.no_search, devices=args.devices)
    if args.json:
        result = {"target_key": key, **dataclasses.asdict(plan), "fits": plan.fits}
        if args.measure:
            result["measured"] = measure_step(cfg, args.targets or None)
        print(json.dumps(result), flush=True)
        return 0 if plan.fits else 1
    print(format_plan(plan, args.target if not args.devices else f"{args.devices}x{key}"))
    if args.measure:
        measured = measure_step(cfg, args.targets or None)
        ratio = plan.step.peak / measured["measured_peak"]
        print(f"measured on this machine: peak {measured['measured_peak'] / 2**20:.1f} MiB (arguments "
              f"{measured['arguments'] / 2**20:.1f} MiB + RSS rise {measured['peak_rise'] / 2**20:.1f} MiB); "
              f"planned {plan.step.peak / 2**20:.1f} MiB; planned/measured = {ratio:.2f}")
    return 0 if plan.fits else 1


def _cmd_model(args) -> int:
    from kerasft.config import load_config

    cfg = load_config(args.config, args.overrides)
    from kerasft.runtime import init_backend
    from kerasft.train.model_view import format_model_view, model_view

    init_backend()
    view = model_view(cfg)
    print(json.dumps(view) if args.json else format_model_view(view), flush=True)
    return 0


def _cmd_bench(args) -> int:
    if not args.accelerator:
        raise KerasftError("bench: --accelerator is the benchmark this command runs (the CPU comparison with "
                           "transformers is scripts/bench.py)")
    for flag in ("batch", "seq", "steps"):
        if getattr(args, flag) < 0:
            raise KerasftError(f"--{flag}: {getattr(args, flag)} is negative")
    from kerasft.bench import acceptance_run, format_acceptance

    result = acceptance_run(_path(args.out), tiny=args.tiny, batch=args.batch, seq=args.seq, steps=args.steps)
    print(format_acceptance(result), end="")
    print(f"wrote {_path(args.out) / 'acceptance.json'} and acceptance.md")
    return 0


def _cmd_eval(args) -> int:
    from kerasft.config import load_config
    from kerasft.workflow import evaluate_run

    # `compare=base` is the command's own switch, the same as eval.compare_base=true.
    compare = [item for item in args.overrides if item.partition("=")[0].strip() == "compare"]
    for item in compare:
        if item.partition("=")[2].strip() != "base":
            raise KerasftError(f"{item}: the only comparison is compare=base")
    overrides = [item for item in args.overrides if item not in compare] + (["eval.compare_base=true"] if compare else [])
    evaluate_run(load_config(args.config, overrides))
    return 0


def _cmd_export(args) -> int:
    from kerasft.config import ExportConfig, ModelConfig, RunConfig
    from kerasft.data.records import Example
    from kerasft.data.template import chat_tokens
    from kerasft.models.presets import load_source
    from kerasft.paths import RunDir
    from kerasft.runtime import init_backend
    from kerasft.workflow import export_and_verify

    init_backend()
    loaded, run_cfg = load_source(args.src)
    run_dir = RunDir(args.src).root if RunDir(args.src).has_adapter else None
    cfg = run_cfg or RunConfig(model=ModelConfig(preset=loaded.source))
    export_cfg = ExportConfig(format=args.format, quant=args.quant, dtype=args.dtype, max_shard_mb=args.max_shard_mb,
                              verify=not args.no_verify, atol=cfg.export.atol, rtol=cfg.export.rtol)
    cfg = RunConfig(**{**cfg.__dict__, "export": export_cfg})
    sample = [Example("check", "¿Qué río pasa por Zaragoza? Responde en una palabra.", "El Ebro.")]
    report = export_and_verify(loaded.backbone, loaded.tokenizer, chat_tokens(loaded.tokenizer), sample, _path(args.out),
                               cfg, overwrite=args.overwrite, run_dir=run_dir, source=args.src)
    print(f"wrote {report.get('file', report['path'])}")
    return 0


def _cmd_push(args) -> int:
    from kerasft.export.push import push, push_plan

    if args.dry_run:
        print(json.dumps(push_plan(args.src, args.repo_id, private=not args.public), indent=2, ensure_ascii=False))
        return 0
    result = push(args.src, args.repo_id, private=not args.public, token=args.token, message=args.message)
    print(json.dumps({"repo_id": result["repo_id"], "private": result["private"], "files": len(result["files"]),
                      "commit_url": result["commit_url"]}))
    return 0


def _cmd_serve(args) -> int:
    from kerasft.serve import parse_adapters, serve

    serve(args.src, args.host, args.port, api_key=args.api_key, cors_origins=args.cors_origin,
          max_body_bytes=args.max_body_kb * 1024, adapters=parse_adapters(args.adapter), max_batch=args.max_batch,
          max_tokens_limit=args.max_tokens, max_seq_len=args.max_seq_len or None,
          max_prompt_tokens=args.max_prompt_tokens or None, default_temperature=args.temperature,
          context_length=args.context_length or None)
    return 0


def _cmd_generate(args) -> int:
    from kerasft.data.template import chat_tokens, encode_prompt
    from kerasft.evaluate.generate import TOP_LOGPROBS, causal_lm_for, generate_ids, token_probabilities
    from kerasft.models.presets import load_source
    from kerasft.runtime import init_backend

    if args.top_k and not args.json:
        raise KerasftError("generate: --top-k needs --json (the alternatives are printed in the JSON lines)")
    if not 0 <= args.top_k <= TOP_LOGPROBS:
        raise KerasftError(f"generate: --top-k must be from 0 to {TOP_LOGPROBS}, got {args.top_k}")
    init_backend()
    loaded, run_cfg = load_source(args.src)
    tokens = chat_tokens(loaded.tokenizer)
    # A run dir renders prompts exactly as its training did: same system prompt and template.
    system = args.system if args.system is not None else (run_cfg.data.system if run_cfg else "")
    template = run_cfg.data.template if run_cfg else "auto"
    prompts = [encode_prompt(tokens, text, system, template=template) for text in args.prompt]
    entries: list = []
    outputs, _ = generate_ids(causal_lm_for(loaded.backbone), prompts, args.max_new_tokens, len(prompts), tokens.stop_ids,
                              entries=entries)
    for text, ids, answer_entries in zip(args.prompt, outputs, entries):
        line = {"prompt": text, "response": tokens.decode(ids)}
        if args.json:
            line["tokens"] = token_probabilities(answer_entries, tokens.decode, args.top_k)
        print(json.dumps(line, ensure_ascii=False))
    return 0


def _cmd_attention(args) -> int:
    from pathlib import Path

    import numpy as np

    from kerasft.data.template import chat_tokens, encode_prompt
    from kerasft.evaluate.attention_maps import attention_weights, draw_attention
    from kerasft.models.presets import load_source
    from kerasft.runtime import init_backend

    init_backend()
    loaded, run_cfg = load_source(args.src)
    tokens = chat_tokens(loaded.tokenizer)
    system = args.system if args.system is not None else (run_cfg.data.system if run_cfg else "")
    ids = encode_prompt(tokens, args.prompt, system, template=run_cfg.data.template if run_cfg else "auto")
    (layer, weights), = attention_weights(loaded.backbone, ids, [args.layer]).items()
    pieces = [tokens.encoder.piece(int(i)) for i in ids]
    draw_attention(weights, pieces, args.png, head=args.head,
                   title=f"{args.src}: layer {layer}" + (f", head {args.head}" if args.head is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": pieces, "ids": ids, "layer": layer,
                                               "weights": np.round(weights, 6).tolist()}, ensure_ascii=False))
    last = weights.mean(axis=0)[-1]  # what the position that starts the answer attends to, over heads
    top = np.argsort(-last)[:5]
    print(json.dumps({"png": args.png, "layer": layer, "heads": int(weights.shape[0]), "tokens": len(ids),
                      "last_token_attends_to": [{"position": int(i), "token": pieces[i], "weight": round(float(last[i]), 4)}
                                                for i in top]}, ensure_ascii=False))
    return 0


def _cmd_import_gguf(args) -> int:
    from kerasft.models.gguf import import_gguf

    out = import_gguf(_path(args.gguf_file), _path(args.out_preset), overwrite=args.overwrite)
    print(f"wrote keras-hub preset {out}")
    return 0


def _cmd_data_inspect(args) -> int:
    from kerasft.config import load_config
    from kerasft.data.inspect import format_report, inspect_data
    from kerasft.paths import RunDir

    cfg = load_config(args.config, args.overrides)
    report = inspect_data(cfg, args.out or RunDir(cfg.run_dir).data_inspect)
    print(format_report(report))
    return 1 if report["errors"] else 0


def _cmd_vocab_check(args) -> int:
    from kerasft.models.vocab import check, format_check

    report = check(args.source, words_file=args.words, corpus_file=args.corpus, add_file=args.add,
                   piece_type=args.type, top=args.top)
    print(format_check(report))
    if args.json:
        _path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def _cmd_vocab_add(args) -> int:
    from kerasft.models.vocab import add_words

    record = add_words(args.preset, args.words, _path(args.out), init=args.init, piece_type=args.type,
                       overwrite=args.overwrite)
    print(f"added {len(record['added'])} pieces for {len(record['words'])} words: vocabulary "
          f"{record['old_vocabulary_size']} -> {record['vocabulary_size']}; wrote keras-hub preset {args.out}")
    return 0


def _cmd_studio(args) -> int:
    from kerasft.ui.app import launch

    print(f"kerasft studio on http://{args.host}:{args.port} (workspace {args.workspace})", flush=True)
    launch(args.workspace, args.host, args.port, auth=args.auth, max_upload_mb=args.max_upload_mb)
    return 0


def _cmd_score(args) -> int:
    from kerasft.evaluate.metrics import score_files

    scores = score_files(args.predictions, args.references, lang=args.lang)
    print(json.dumps(scores))
    return 0


def _path(text: str):
    from pathlib import Path

    return Path(text)


if __name__ == "__main__":
    sys.exit(main())
