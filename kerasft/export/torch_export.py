"""Export to PyTorch: the state_dict of the transformers model built from the merged Hugging Face
export, and a torch.export program of its forward pass (input_ids, attention_mask -> logits).

The transformers model is loaded once from the HF export (kerasft.export.hf, LoRA merged), so the
weights are mapped in one place; ONNX (kerasft.export.onnx_export) starts from the same model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kerasft.errors import KerasftError

STATE_DICT = "model_state_dict.pt"
PROGRAM = "model.pt2"
# Files of the HF export that travel with the torch and ONNX exports (config and tokenizer), and
# the weights that do not (the formats carry their own).
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def load_transformers(hf_dir: Path):
    """The float32 transformers model of an HF export, in eval mode, eager attention (the
    implementation that applies Gemma 2's attention soft cap and exports without SDPA kernels)."""
    torch, transformers = torch_runtime()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                              attn_implementation="eager")
    model.config.use_cache = False
    return model.eval()


def logits_module(model):
    """A torch Module computing logits from (input_ids, attention_mask), without a KV cache."""
    torch, _ = torch_runtime()

    class Logits(torch.nn.Module):
        def __init__(self, causal_lm):
            super().__init__()
            self.causal_lm = causal_lm

        def forward(self, input_ids, attention_mask):
            return self.causal_lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits(model).eval()


def example_inputs(token_ids):
    """(input_ids, attention_mask) int64 tensors for tracing: two rows, since torch.export and the
    ONNX tracer specialise a batch of 1 to a constant."""
    torch, _ = torch_runtime()
    ids = np.asarray(token_ids, dtype=np.int64)
    ids = np.concatenate([ids, ids[:1]])[:2] if ids.shape[0] < 2 else ids
    return torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.int64)


def export_torch(model, staging: Path, token_ids) -> list[str]:
    """Writes STATE_DICT (torch.save of the state_dict, loadable with weights_only=True) and
    PROGRAM (torch.export.save of the logits module, batch and length dynamic) into `staging`."""
    torch, _ = torch_runtime()
    torch.save(model.state_dict(), staging / STATE_DICT)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", min=2, max=model.config.max_position_embeddings)
    dynamic = ({0: batch, 1: length}, {0: batch, 1: length})
    with torch.no_grad():
        program = torch.export.export(logits_module(model), example_inputs(token_ids), dynamic_shapes=dynamic)
    torch.export.save(program, staging / PROGRAM)
    return [STATE_DICT, PROGRAM]


def torch_logits(folder: Path, token_ids) -> dict:
    """Logits of a torch export read back both ways: {"state_dict": ..., "program": ...}.

    The state_dict goes into a model built from the folder's config.json (no weights from
    anywhere else), loaded with torch.load(weights_only=True) and strict=True; the program is
    torch.export.load-ed and run as it is.
    """
    torch, transformers = torch_runtime()
    config = transformers.AutoConfig.from_pretrained(str(folder))
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = torch.load(folder / STATE_DICT, weights_only=True)
    model.load_state_dict(state, strict=True)
    ids = torch.from_numpy(np.asarray(token_ids, dtype=np.int64))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        from_state = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
        program = torch.export.load(folder / PROGRAM)
        from_program = program.module()(ids, mask).numpy()
    return {"state_dict": from_state, "program": from_program}


def torch_runtime():
    """(torch, transformers), or a one-line error naming the extra."""
    try:
        import torch
        import transformers
    except ImportError:
        raise KerasftError("--format torch and onnx need torch and transformers: pip install 'kerasft[verify]'") from None
    return torch, transformers
