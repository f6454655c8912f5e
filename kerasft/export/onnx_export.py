"""Export to ONNX: the transformers model built from the merged Hugging Face export
(kerasft.export.torch_export.load_transformers), traced with torch.onnx's TorchScript exporter
(input_ids, attention_mask -> logits; batch and length dynamic), run back in onnxruntime.

The TorchScript exporter, not the dynamo one: on the tiny Gemma 3 it writes the same graph's
logits (3e-6 from Keras either way) in 3 s instead of 40 s, and needs no onnxscript. torch 2.9+
warns that it is deprecated.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from kerasft.errors import KerasftError
from kerasft.export.torch_export import example_inputs, logits_module, torch_runtime

MODEL = "model.onnx"
OPSET = 17


def export_onnx(model, staging: Path, token_ids) -> list[str]:
    """Writes MODEL (weights inside the file under 2 GB, else beside it as external data)."""
    torch, _ = torch_runtime()
    before = {p.name for p in staging.iterdir()}
    axes = {0: "batch", 1: "length"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings of the TorchScript exporter
        torch.onnx.export(logits_module(model), example_inputs(token_ids), str(staging / MODEL),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes},
                          opset_version=OPSET, dynamo=False)
    return sorted({p.name for p in staging.iterdir()} - before)


def onnx_logits(folder: Path, token_ids, attention_mask=None) -> np.ndarray:
    """Logits of the exported model in an onnxruntime CPU session."""
    try:
        import onnxruntime
    except ImportError:
        raise KerasftError("--format onnx needs onnx and onnxruntime: pip install 'kerasft[export]'") from None
    ids = np.asarray(token_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    session = onnxruntime.InferenceSession(str(folder / MODEL), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0], dtype=np.float32)
