"""Export formats that are written from another representation of the merged model and checked
in their own runtime: `savedmodel` (from the Keras model, reloaded with tf.saved_model.load),
`onnx` (from the transformers model of the HF export, run in onnxruntime) and `torch` (the same
transformers model as a state_dict and a torch.export program, both reloaded). hf, peft and gguf
have their own modules (hf, peft, gguf) and checks (verify).

Each export is staged beside OUT (kerasft.paths.staged_dir), checked there and renamed into place
only when its logits agree with Keras', so a failed check leaves nothing behind.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from kerasft.errors import KerasftError

DERIVED_FORMATS = ("savedmodel", "onnx", "torch")
# New tokens of the SavedModel's greedy signature compared with Keras' greedy decoding at export time.
GREEDY_CHECK_TOKENS = 8
# The relative part of the tolerance: both sides compute in float32 (the HF check's reference is
# float64, hence its 1e-5), so their rounding errors add; a mapping mistake moves logits by 1e-2
# of their scale or more.
FLOAT32_RTOL = 5e-5


def export_derived(fmt: str, backbone, tokenizer, out_dir: str | Path, token_ids, *, card: str | None = None,
                   overwrite: bool = False, chat_template: str = "auto", verify: bool = True,
                   atol: float = 1e-4, rtol: float = FLOAT32_RTOL) -> dict:
    """Writes `out_dir` in format `fmt` (one of DERIVED_FORMATS) with the model card README.md and
    the tokenizer files of the HF export, reloads it in its runtime and compares its logits on
    `token_ids` (batch x length, unpadded) with the Keras model's. Prints one line per check and
    raises KerasftError, with nothing written, when max |diff| > atol + max(rtol, FLOAT32_RTOL) * max |logit|.

    Returns {"path", "format", "files", "verify": compare_logits' report (or unchecked's)} and,
    for savedmodel, "greedy": the check of the greedy signature against Keras' greedy decoding.
    """
    from kerasft.data.template import chat_tokens
    from kerasft.export.card import model_card
    from kerasft.export.hf import export_hf, keras_logits, write_tokenizer_files
    from kerasft.export.verify import compare_logits, unchecked
    from kerasft.paths import staged_dir

    if fmt not in DERIVED_FORMATS:
        raise KerasftError(f"export format {fmt!r} is not one of {', '.join(DERIVED_FORMATS)}")
    out = Path(out_dir)
    if out.exists() and not overwrite:  # before minutes of tracing
        raise KerasftError(f"{out}: already exists; pass --overwrite to replace it")
    token_ids = np.asarray(token_ids, dtype=np.int32)
    card = card if card is not None else model_card(fmt, backbone)
    rtol = max(rtol, FLOAT32_RTOL)
    report = {"path": str(out), "format": fmt}
    expected = keras_logits(backbone, token_ids) if verify else None
    with tempfile.TemporaryDirectory(prefix="kerasft-hf-") as tmp:
        if fmt != "savedmodel":
            hf_dir = export_hf(backbone, tokenizer, Path(tmp) / "hf", card=card, chat_template=chat_template)
        with staged_dir(out, overwrite) as staging:
            if fmt == "savedmodel":
                from kerasft.evaluate.generate import causal_lm_for, generate_ids
                from kerasft.export.savedmodel import (export_savedmodel, load_savedmodel, savedmodel_greedy,
                                                       savedmodel_logits)

                stop_ids = chat_tokens(tokenizer).stop_ids
                export_savedmodel(backbone, staging, stop_ids)
                write_tokenizer_files(tokenizer, staging, chat_template)
                (staging / "README.md").write_text(card, encoding="utf-8")
                checks = {}
                if verify:
                    reloaded = load_savedmodel(staging)
                    checks["tf.saved_model.load, signature logits"] = savedmodel_logits(reloaded, token_ids)
                    # Two prompts of different lengths in one call: the right padding of the shorter is filled too.
                    full = token_ids[0].tolist()
                    prompts = [full, full[: max(1, len(full) // 2)]]
                    ours = generate_ids(causal_lm_for(backbone), prompts, GREEDY_CHECK_TOKENS, 2, stop_ids)[0]
                    theirs = savedmodel_greedy(reloaded, prompts, GREEDY_CHECK_TOKENS, stop_ids)
                    same = sum(a == b for row_a, row_b in zip(ours, theirs) for a, b in zip(row_a, row_b))
                    count = sum(len(row) for row in ours)
                    report["greedy"] = {"kerasft": ours, "savedmodel": theirs, "same": ours == theirs}
                    print(f"  greedy signature: {same} of {count} new tokens of 2 prompts equal to kerasft's greedy "
                          f"decoding{'' if ours == theirs else ' (DIFFERENT)'}", flush=True)
            else:
                from kerasft.export.torch_export import load_transformers

                for path in Path(hf_dir).iterdir():  # config, tokenizer, card: not the safetensors weights
                    if not path.name.endswith((".safetensors", ".safetensors.index.json")):
                        shutil.copy2(path, staging / path.name)
                model = load_transformers(hf_dir)
                checks = {}
                if fmt == "onnx":
                    from kerasft.export.onnx_export import export_onnx, onnx_logits

                    export_onnx(model, staging, token_ids)
                    if verify:
                        checks["onnxruntime"] = onnx_logits(staging, token_ids)
                else:
                    from kerasft.export.torch_export import export_torch, torch_logits

                    export_torch(model, staging, token_ids)
                    if verify:
                        reloaded = torch_logits(staging, token_ids)
                        checks["torch.load(weights_only=True) state_dict"] = reloaded["state_dict"]
                        checks["torch.export.load program"] = reloaded["program"]
            report["files"] = sorted(p.name for p in staging.iterdir())
            if not verify:
                print(f"  {out}: written WITHOUT a logits check: export.verify is off", flush=True)
                report["verify"] = unchecked("export.verify is off")
                return report
            results = {}
            for what, theirs in checks.items():
                check = compare_logits(expected, theirs, atol, rtol, what)
                results[what] = check
                print(f"  {what}: max |logit diff| = {check['max_abs_diff']:.2e} at logit scale "
                      f"{check['logit_scale']:.1f} ({'OK' if check['ok'] else 'MISMATCH'}, tolerance "
                      f"{check['tolerance']:.1e})", flush=True)
                if not check["ok"]:
                    raise KerasftError(f"{out}: {fmt} logits ({what}) differ from Keras by {check['max_abs_diff']:.3g}, "
                                       f"above the tolerance {check['tolerance']:.3g}; nothing was written")
    worst = max(results.values(), key=lambda check: check["max_abs_diff"])
    report["verify"] = {**worst, "checks": results}
    return report
