"""Multi-query attention on the layouts the projections produce, for keras-hub's Gemma backbones.

keras-hub computes a Gemma attention layer's scores as einsum("btkgh,bskh->bkgts") and its output
as einsum("bkgts,bskh->btkgh"): the query heads are moved in front of the positions and back again,
and XLA's CPU backend does each move as a copy, forward and backward, in every layer. With one
key/value head (multi-query attention: Gemma 1 2B, Gemma 3 270M and 1B) the same products can be
written on the layouts the query projection already produces: einsum("btnh,bsh->btns") and
einsum("btns,bsh->btnh") keep the heads among the free dimensions, and no data moves.

The arithmetic is the same; only the order of the summations differs (loss within 4e-6 on the
embedded 270M). Measured on the 2-core CPU, QA step of bench.py: 1.80 -> 1.71 s. Layers with
several key/value heads, and layers where keras-hub uses a fused attention op (TPU, GPUs that
support it), keep keras-hub's code.
"""

from __future__ import annotations

import types

import numpy as np


def use_mqa_layout(backbone) -> int:
    """Binds the copy-free attention to each multi-query Gemma attention layer of `backbone`.

    Returns:
        How many layers use it (0 for other architectures).
    """
    count = 0
    for block in getattr(backbone, "transformer_layers", []):
        attention = getattr(block, "attention", None)
        if (type(attention).__name__ in ("CachedGemmaAttention", "CachedGemma3Attention")
                and attention.num_key_value_heads == 1 and "_compute_attention" not in vars(attention)):
            keras_hub_attention = attention._compute_attention
            attention._compute_attention = types.MethodType(_mqa_attention(keras_hub_attention), attention)
            count += 1
    return count


def _mqa_attention(keras_hub_attention):
    def compute_attention(self, q, k, v, attention_mask, training=False, cache_update_index=0):
        from keras import ops

        if self._use_fused_attention_op():
            return keras_hub_attention(q, k, v, attention_mask, training=training,
                                       cache_update_index=cache_update_index)
        heads = self.num_query_heads
        scale = 1 / np.sqrt(self.head_dim if self.query_head_dim_normalize else self.hidden_dim // heads)
        if self.use_sliding_window_attention and attention_mask is not None:
            attention_mask = self._mask_sliding_window(attention_mask, cache_update_index=cache_update_index)
        q = q * ops.cast(scale, q.dtype)  # (batch, query positions, heads, head_dim)
        logits = ops.einsum("btnh,bsh->btns", q, k[:, :, 0, :])
        if self.logit_soft_cap is not None:
            logits = ops.multiply(ops.tanh(ops.divide(logits, self.logit_soft_cap)), self.logit_soft_cap)
        if attention_mask is not None:
            attention_mask = attention_mask[:, :, None, :]  # (batch, query, 1, key): every head alike
        probabilities = ops.cast(self.softmax(logits, mask=attention_mask), logits.dtype)
        if self.dropout:
            probabilities = self.dropout_layer(probabilities, training=training)
        return ops.einsum("btns,bsh->btnh", probabilities, v[:, :, 0, :])

    return compute_attention
