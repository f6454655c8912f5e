"""The training loss: response-only logits through the (tied) vocabulary head, normalised by the
sum of loss weights (keras' weighted losses divide by all positions instead).

Only the weighted positions go through the vocabulary projection; above FUSED_ABOVE of them
(full-sequence losses: pretraining) the projection runs in chunks of LOSS_CHUNK positions with
its gradient computed in the same pass (fused_weighted_nll).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kerasft.models.families import output_head
from kerasft.models.lora import lora_dropout

LOSS_CHUNK = 128  # target positions per vocabulary-projection chunk (128 x 262k f32 logits: 134 MB)
FUSED_ABOVE = 256  # more target positions per batch than this (full-sequence losses) take the fused path


def make_loss_fn(backbone, token_rows=None, dropout: float = 0.0):
    """Builds loss(params, non_trainable, batch, rng=None) -> (loss, weight_sum) for a Gemma backbone.

    params is {"lora": the backbone's trainable variables (the adapters), "token_delta": a
    (len(token_rows), hidden) update to those embedding rows, or None}. The rows feed both the
    input embedding and the tied output head, so the model can learn its chat tokens: in a
    pretrained Gemma, <end_of_turn> sits among thousands of untrained rows (<unusedNN> and
    the like) and LoRA alone ends answers with one of them instead. An untied head (Llama 2,
    TinyLlama: keras-hub's `reverse_embeddings`) is used as it is; the rows then train the
    input embedding only.

    The loss is the weighted NLL sum over max(sum of the batch's weights, 1), or, when the batch
    carries "loss_normaliser" (one equal value a row: gradient accumulation, see
    kerasft.train.loop.accumulation_normaliser), over that value.

    With `dropout` > 0 and an `rng` key, the LoRA branches see their input through dropout
    (lora.dropout); without a key (evaluation) there is none.
    """
    embedding = backbone.token_embedding
    soft_cap = getattr(embedding, "logit_soft_cap", None)
    non_trainable_ids = [id(v) for v in backbone.non_trainable_variables]
    if id(embedding.embeddings) not in non_trainable_ids:
        raise ValueError("the embedding table must be frozen: only LoRA adapters and token rows are trained")
    table_index = non_trainable_ids.index(id(embedding.embeddings))
    head_index = non_trainable_ids.index(id(output_head(backbone)))  # table_index when tied
    rows = None if token_rows is None else jnp.asarray(token_rows, dtype=jnp.int32)

    def loss_fn(params, non_trainable, batch, rng=None):
        table = non_trainable_table = non_trainable[table_index]
        if rows is not None:
            table = table.at[rows].add(params["token_delta"].astype(table.dtype))
            non_trainable = [*non_trainable[:table_index], table, *non_trainable[table_index + 1 :]]
        with lora_dropout(backbone, dropout if rng is not None else 0.0, rng):
            hidden, _ = backbone.stateless_call(
                params["lora"],
                non_trainable,
                {"token_ids": batch["token_ids"], "padding_mask": batch["padding_mask"]},
            )
        if head_index != table_index:  # untied: (hidden, vocabulary), no trained rows
            table = non_trainable_table = non_trainable[head_index].T
        # Only the K response positions go through the 262k-entry vocabulary projection.
        picked = jnp.take_along_axis(hidden, batch["target_positions"][..., None], axis=1)
        weights = batch["target_weights"]
        weight_sum = jnp.sum(weights)
        if picked.shape[0] * picked.shape[1] > FUSED_ABOVE:  # full-sequence loss: fused, chunked head
            tied_rows = rows if head_index == table_index else None
            delta = params["token_delta"] if tied_rows is not None else None
            total = fused_weighted_nll(picked, non_trainable_table, batch["target_ids"], weights, soft_cap, tied_rows, delta)
        else:
            total = jnp.sum(token_nll(picked, table, batch["target_ids"], soft_cap) * weights)
        if "loss_normaliser" in batch:
            return total / batch["loss_normaliser"][0], weight_sum
        return total / jnp.maximum(weight_sum, 1.0), weight_sum

    return loss_fn


def token_nll(hidden, table, target_ids, soft_cap=None):
    """-log p(target) at each (B, K) position of `hidden` under the tied head `table`, in one
    matmul: for the few response positions of SFT."""
    logits = jnp.einsum("...d,vd->...v", hidden, table.astype(hidden.dtype)).astype(jnp.float32)
    if soft_cap:
        logits = jnp.tanh(logits / soft_cap) * soft_cap
    target = jnp.take_along_axis(logits, target_ids[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target


def fused_weighted_nll(hidden, table, target_ids, weights, soft_cap=None, rows=None, delta=None, chunk=LOSS_CHUNK):
    """sum(weights * -log p(target)) over (B, K) positions, for full-sequence losses.

    The vocabulary projection runs in chunks of `chunk` positions, and each chunk's gradient
    with respect to the hidden states (and the trained embedding rows) is computed right there
    in the forward pass, from the softmax it already has: no pass ever holds more than
    chunk x vocabulary logits, and none is recomputed. `table` gets no gradient (it is the frozen
    embedding); `delta` is the trained update of the embedding rows `rows`, whose logits columns
    it shifts.
    """
    batch, positions, width = hidden.shape
    total = batch * positions
    pad = -total % chunk

    def chunks(x, fill=0):
        x = x.reshape(total, *x.shape[2:])
        return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill).reshape(-1, chunk, *x.shape[1:])

    xs, ids, ws = chunks(hidden), chunks(target_ids), chunks(weights.astype(jnp.float32))
    has_rows = rows is not None
    d0 = delta.astype(jnp.float32) if has_rows else jnp.zeros((0, width), jnp.float32)

    def forward(x_chunks, d):
        head = table.astype(jnp.float32)

        def body(carry, inputs):
            loss, d_grad = carry
            x, i, w = inputs
            x = x.astype(jnp.float32)
            z = x @ head.T
            if has_rows:
                z = z.at[:, rows].add(x @ d.T)
            capped = jnp.tanh(z / soft_cap) if soft_cap else None
            logits = capped * soft_cap if soft_cap else z
            lse = jax.nn.logsumexp(logits, axis=-1)
            nll = lse - jnp.take_along_axis(logits, i[:, None], axis=-1)[:, 0]
            g = jnp.exp(logits - lse[:, None]).at[jnp.arange(chunk), i].add(-1.0) * w[:, None]
            if soft_cap:
                g = g * (1.0 - capped * capped)
            x_grad = g @ head
            if has_rows:
                x_grad = x_grad + g[:, rows] @ d
                d_grad = d_grad + g[:, rows].T @ x
            return (loss + jnp.sum(nll * w), d_grad), x_grad

        (loss, d_grad), x_grad = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros_like(d)), (x_chunks, ids, ws))
        return loss, (x_grad, d_grad)

    @jax.custom_vjp
    def weighted_sum(x_chunks, d):
        return forward(x_chunks, d)[0]

    def backward(residuals, cotangent):
        x_grad, d_grad = residuals
        return (x_grad * cotangent).astype(hidden.dtype), d_grad * cotangent

    weighted_sum.defvjp(forward, backward)
    return weighted_sum(xs.astype(hidden.dtype), d0)
