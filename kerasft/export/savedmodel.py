"""Export to a TensorFlow SavedModel with two serving signatures, `logits` and `greedy`.

The Keras model is exported as it is (LoRA and int8 layers compute what they compute in Keras)
through keras.export.ExportArchive, which on the JAX backend converts the JAX computation with
jax2tf (StableHLO inside the SavedModel, lowered for CPU, CUDA and TPU) and keeps the weights as
TF variables. Both signatures take `token_ids` (int32, batch x length) and `padding_mask` (bool,
same shape) with any batch size and length:

- `logits`: the full-vocabulary logits (float, batch x length x vocabulary).
- `greedy`: rows are right-padded prompts (padding_mask True on the prompt) inside a buffer; each
  row's masked tail is filled with greedy tokens, one full forward pass per token (no KV cache,
  so a step costs the whole buffer), and after a stop token the rest of the row stays 0 (pad).
  The loop is a lax.while_loop, a TF While op in the graph, so the buffer length, not the export,
  sets how many tokens are generated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kerasft.errors import KerasftError

# The platforms the StableHLO in the SavedModel is lowered for (jax2tf native serialization).
PLATFORMS = ("cpu", "cuda", "tpu")


def export_savedmodel(backbone, staging: Path, stop_ids) -> None:
    """Writes the SavedModel of `backbone` into the (empty, staged) folder `staging`.

    Args:
        stop_ids: token ids that end a greedy row (eos, end of turn).
    """
    try:
        import jax
        import jax.numpy as jnp
        import keras
        import tensorflow as tf
    except ImportError:
        raise KerasftError("--format savedmodel needs tensorflow (a keras-hub dependency): pip install tensorflow") from None
    if keras.backend.backend() != "jax":
        raise KerasftError(f"--format savedmodel exports from the JAX backend, not {keras.backend.backend()}")
    stop = jnp.asarray(sorted(set(int(i) for i in stop_ids)), dtype="int32")

    def hidden_states(token_ids, padding_mask):
        return backbone({"token_ids": token_ids, "padding_mask": padding_mask})

    def logits(token_ids, padding_mask):
        return backbone.token_embedding(hidden_states(token_ids, padding_mask), reverse=True)

    def greedy(token_ids, padding_mask):
        positions = jnp.arange(token_ids.shape[1])[None, :]
        lengths = jnp.sum(padding_mask.astype("int32"), axis=1)
        # A row is done when its buffer is full or it produced a stop token.
        done = lengths >= token_ids.shape[1]
        ids = jnp.where(padding_mask, token_ids, 0).astype("int32")

        def step(state):
            ids, lengths, done = state
            hidden = hidden_states(ids, positions < lengths[:, None])
            last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # (batch, 1, hidden)
            scores = backbone.token_embedding(last, reverse=True)[:, 0]
            token = jnp.where(done, 0, jnp.argmax(scores, axis=-1).astype("int32"))
            ids = jnp.where((positions == lengths[:, None]) & ~done[:, None], token[:, None], ids)
            lengths = jnp.where(done, lengths, lengths + 1)
            done = done | jnp.isin(token, stop) | (lengths >= ids.shape[1])
            return ids, lengths, done

        ids, _, _ = jax.lax.while_loop(lambda state: ~jnp.all(state[2]), step, (ids, lengths, done))
        return ids

    signature = [tf.TensorSpec((None, None), tf.int32, name="token_ids"),
                 tf.TensorSpec((None, None), tf.bool, name="padding_mask")]
    # One symbolic (batch, length) for both inputs: the masks' shapes must equal the ids'.
    options = {"polymorphic_shapes": ["(b, s)", "(b, s)"], "native_serialization_platforms": PLATFORMS}
    archive = keras.export.ExportArchive()
    archive.track(backbone)
    archive.add_endpoint("logits", logits, input_signature=signature, jax2tf_kwargs=dict(options))
    archive.add_endpoint("greedy", greedy, input_signature=signature, jax2tf_kwargs=dict(options))
    archive.write_out(str(staging), verbose=False)


def load_savedmodel(folder: Path):
    """The SavedModel read back with tf.saved_model.load (as TensorFlow Serving would)."""
    import tensorflow as tf

    return tf.saved_model.load(str(folder))


def savedmodel_logits(model, token_ids, padding_mask=None) -> np.ndarray:
    """Logits of the `logits` signature of a loaded SavedModel (load_savedmodel)."""
    import tensorflow as tf

    token_ids = np.asarray(token_ids, dtype=np.int32)
    mask = np.ones_like(token_ids, dtype=bool) if padding_mask is None else np.asarray(padding_mask, dtype=bool)
    outputs = model.signatures["logits"](token_ids=tf.constant(token_ids), padding_mask=tf.constant(mask))
    return np.asarray(next(iter(outputs.values())).numpy(), dtype=np.float32)


def savedmodel_greedy(model, prompts: list[list[int]], max_new_tokens: int, stop_ids) -> list[list[int]]:
    """Greedy continuations of `prompts` from the `greedy` signature of a loaded SavedModel, each
    cut before its first stop token, as kerasft's generate_ids returns them."""
    import tensorflow as tf

    width = max(len(p) for p in prompts) + max_new_tokens
    ids = np.zeros((len(prompts), width), dtype=np.int32)
    mask = np.zeros((len(prompts), width), dtype=bool)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = True
    outputs = model.signatures["greedy"](token_ids=tf.constant(ids), padding_mask=tf.constant(mask))
    filled = next(iter(outputs.values())).numpy()
    stop = set(int(i) for i in stop_ids)
    continuations = []
    for row, prompt in enumerate(prompts):
        new = filled[row, len(prompt): len(prompt) + max_new_tokens].tolist()
        continuations.append(next((new[:cut] for cut, token in enumerate(new) if token in stop), new))
    return continuations
