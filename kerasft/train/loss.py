"""The training losses: supervised (response-only NLL) and preference (DPO, IPO, ORPO) on the
same forward pass. SFT: response-only logits through the (tied) vocabulary head, normalised by the
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


def _make_forward(backbone, token_rows=None, dropout: float = 0.0):
    """forward(params, non_trainable, batch, rng=None) -> Forward: the backbone's hidden states
    under the trained weights, and the head to project them with (see make_loss_fn)."""
    embedding = backbone.token_embedding
    soft_cap = getattr(embedding, "logit_soft_cap", None)
    non_trainable_ids = [id(v) for v in backbone.non_trainable_variables]
    if id(embedding.embeddings) not in non_trainable_ids:
        raise ValueError("the embedding table must be frozen: only LoRA adapters and token rows are trained")
    table_index = non_trainable_ids.index(id(embedding.embeddings))
    head_index = non_trainable_ids.index(id(output_head(backbone)))  # table_index when tied
    rows = None if token_rows is None else jnp.asarray(token_rows, dtype=jnp.int32)

    def forward(params, non_trainable, batch, rng=None):
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
        tied = head_index == table_index
        if not tied:  # untied: (hidden, vocabulary), no trained rows
            table = non_trainable_table = non_trainable[head_index].T
        tied_rows = rows if tied else None
        delta = params["token_delta"] if tied_rows is not None else None

        def weighted_nll(picked, target_ids, weights):
            """sum(weights * -log p(target)) at (B, K) hidden states: one matmul for the few
            response positions of SFT, the fused chunked head above FUSED_ABOVE of them."""
            if picked.shape[0] * picked.shape[1] > FUSED_ABOVE:
                return fused_weighted_nll(picked, non_trainable_table, target_ids, weights, soft_cap, tied_rows, delta)
            return jnp.sum(token_nll(picked, table, target_ids, soft_cap) * weights)

        def response_logps(picked, target_ids):
            """log p(target) at each (B, K) response position."""
            return -token_nll(picked, table, target_ids, soft_cap)

        return hidden, weighted_nll, response_logps

    return forward


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
    forward = _make_forward(backbone, token_rows, dropout)

    def loss_fn(params, non_trainable, batch, rng=None):
        hidden, weighted_nll, _ = forward(params, non_trainable, batch, rng)
        # Only the K response positions go through the 262k-entry vocabulary projection.
        picked = jnp.take_along_axis(hidden, batch["target_positions"][..., None], axis=1)
        weights = batch["target_weights"]
        weight_sum = jnp.sum(weights)
        total = weighted_nll(picked, batch["target_ids"], weights)
        if "loss_normaliser" in batch:
            return total / batch["loss_normaliser"][0], weight_sum
        return total / jnp.maximum(weight_sum, 1.0), weight_sum

    return loss_fn


# The statistics a preference step reports (metrics.jsonl, the progress line, plots), averaged
# over the step's pairs. Log-probs are summed over each answer's response tokens (ORPO: their
# mean per token, as its loss uses them); rewards are beta times DPO's log-ratios to the
# reference, or beta times ORPO's mean log-probs (TRL's definitions).
PREFERENCE_STATS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps",
                    "rejected_logps")


def lora_b_mask(backbone) -> list[bool]:
    """Which of the backbone's trainable variables are LoRA B matrices (zero: the adapter is off)."""
    return [variable.path.endswith("lora_kernel_b") for variable in backbone.trainable_variables]


def make_sequence_logps(backbone, token_rows=None):
    """logps(params, non_trainable, batch, reference=False) -> (sum of log p over each row's
    response tokens, their count), both (B,), without dropout. With `reference`, under the base
    model (LoRA off: reference_params). Used for the reference log-probs computed once per data
    set (train.precompute_reference) and for scoring held-out pairs."""
    forward = _make_forward(backbone, token_rows)
    b_mask = lora_b_mask(backbone)

    def logps(params, non_trainable, batch, reference=False):
        if reference:
            params = {**params, "lora": [jnp.zeros_like(x) if is_b else x for x, is_b in zip(params["lora"], b_mask)]}
            if "token_delta" in params:
                params["token_delta"] = jnp.zeros_like(params["token_delta"])
        hidden, _, response_logps = forward(params, non_trainable, batch)
        picked = jnp.take_along_axis(hidden, batch["target_positions"][..., None], axis=1)
        weights = batch["target_weights"]
        return jnp.sum(response_logps(picked, batch["target_ids"]) * weights, axis=1), jnp.sum(weights, axis=1)

    return logps


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (TRL's ORPO uses the same split)."""
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def make_preference_loss_fn(backbone, train_cfg, token_rows=None, dropout: float = 0.0):
    """Builds loss(params, non_trainable, batch, rng=None) -> (loss, stats) for preference pairs.

    The batch is make_batch's for a pairs set: rows [chosen of each pair..., rejected of each
    pair...], response-only targets as in SFT. train_cfg (TrainConfig) gives the objective:

    - dpo, dpo_loss sigmoid: mean of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with
      pi and ref the log-probs of each answer summed over its response tokens under the trained
      model and the reference. The reference is the base model: the same backbone call with LoRA
      switched off (reference_params), in the same step, without gradient; or the batch's
      precomputed `reference_logps` (train.precompute_reference).
    - dpo, dpo_loss ipo: mean of ((c - r) - 1 / (2 beta))^2, c and r the log-ratios averaged per
      response token (TRL's "ipo").
    - orpo: NLL of the chosen rows (every non-padding token after the first, prompt included,
      averaged per token, as TRL's ORPOTrainer) - beta * mean(log sigmoid(log odds(c) - log
      odds(r))), with c and r the per-token mean log-probs of the answers. No reference model.

    stats holds PREFERENCE_STATS (and "targets": the response tokens of the batch).
    """
    forward = _make_forward(backbone, token_rows, dropout)
    objective, beta, kind = train_cfg.objective, float(train_cfg.beta), train_cfg.dpo_loss
    b_mask = lora_b_mask(backbone)

    def sequence_logps(forward_out, batch):
        hidden, _, response_logps = forward_out
        picked = jnp.take_along_axis(hidden, batch["target_positions"][..., None], axis=1)
        weights = batch["target_weights"]
        return jnp.sum(response_logps(picked, batch["target_ids"]) * weights, axis=1), jnp.sum(weights, axis=1)

    def loss_fn(params, non_trainable, batch, rng=None):
        out = forward(params, non_trainable, batch, rng)
        logps, counts = sequence_logps(out, batch)
        n = logps.shape[0] // 2
        if objective == "dpo":
            if "reference_logps" in batch:
                reference = batch["reference_logps"]
            else:
                frozen = jax.lax.stop_gradient(params)
                frozen = {**frozen, "lora": [jnp.zeros_like(x) if is_b else x for x, is_b in zip(frozen["lora"], b_mask)]}
                if "token_delta" in frozen:
                    frozen["token_delta"] = jnp.zeros_like(frozen["token_delta"])
                reference = jax.lax.stop_gradient(sequence_logps(forward(frozen, non_trainable, batch), batch)[0])
            ratios = logps - reference
            chosen, rejected = ratios[:n], ratios[n:]
            if kind == "ipo":
                delta = chosen / jnp.maximum(counts[:n], 1.0) - rejected / jnp.maximum(counts[n:], 1.0)
                losses = (delta - 1.0 / (2.0 * beta)) ** 2
            else:
                losses = -jax.nn.log_sigmoid(beta * (chosen - rejected))
            loss = jnp.mean(losses)
            chosen_reward, rejected_reward = beta * chosen, beta * rejected
            shown = logps
        else:  # orpo
            mean_logps = logps / counts
            chosen, rejected = mean_logps[:n], mean_logps[n:]
            log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
            hidden, weighted_nll, _ = out
            mask = batch["padding_mask"][:n, 1:].astype(jnp.float32)
            nll = weighted_nll(hidden[:n, :-1], batch["token_ids"][:n, 1:], mask) / jnp.maximum(jnp.sum(mask), 1.0)
            loss = nll - beta * jnp.mean(jax.nn.log_sigmoid(log_odds))
            chosen_reward, rejected_reward = beta * chosen, beta * rejected
            shown = mean_logps
        stats = {
            "reward_accuracy": jnp.mean((chosen_reward > rejected_reward).astype(jnp.float32)),
            "reward_margin": jnp.mean(chosen_reward - rejected_reward),
            "chosen_reward": jnp.mean(chosen_reward),
            "rejected_reward": jnp.mean(rejected_reward),
            "chosen_logps": jnp.mean(jax.lax.stop_gradient(shown[:n])),
            "rejected_logps": jnp.mean(jax.lax.stop_gradient(shown[n:])),
            "targets": jnp.sum(batch["target_weights"]),
        }
        return loss, jax.tree.map(jax.lax.stop_gradient, stats)

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
