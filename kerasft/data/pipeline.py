"""Examples -> token ids with loss weights -> padded batches of a few static shapes.

The pipeline alone owns the loss mask: weight 1 on response tokens and the closing
`<end_of_turn>`, 0 on the prompt and padding, for every Gemma family alike. Batches carry the
positions of the weighted tokens, so the training step computes the vocabulary projection only
there (Gemma's 262k-entry head is most of the cost of a 270M model).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from kerasft.data.records import Example
from kerasft.data.template import ChatTokens, encode_prompt, encode_response
from kerasft.errors import KerasftError

LENGTH_BUCKET = 64  # sequence lengths are padded to a multiple of this: few shapes, few compiles
TARGET_BUCKET = 16


@dataclass
class TokenizedSet:
    """Token ids and loss weights of each example (ragged), plus what was trimmed or dropped."""

    ids: list[np.ndarray]
    weights: list[np.ndarray]
    trimmed: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_targets(self) -> int:
        """The static number of loss positions per row: the most any example needs, bucketed."""
        most = max(int(w.sum()) for w in self.weights)
        return int(math.ceil(most / TARGET_BUCKET) * TARGET_BUCKET)


def tokenize_examples(tokens: ChatTokens, examples: list[Example], sequence_length: int, system: str = "") -> TokenizedSet:
    """Tokenises examples for training; QA contexts are trimmed around the answer to fit.

    Examples that cannot fit even with the context trimmed are dropped and counted (with a
    warning on stderr), never silently.
    """
    out = TokenizedSet([], [])
    for ex in examples:
        response = encode_response(tokens, ex.response)
        prompt = encode_prompt(tokens, ex.prompt, system)
        if len(prompt) + len(response) > sequence_length and ex.context and ex.answer_start >= 0:
            prompt = _trim_context(tokens, ex, system, sequence_length - len(response))
            out.trimmed += prompt is not None
        if prompt is None or len(prompt) + len(response) > sequence_length:
            out.dropped += 1
            continue
        ids = np.asarray(prompt + response, dtype=np.int32)
        weights = np.zeros(len(ids), dtype=np.float32)
        weights[len(prompt) :] = 1.0
        out.ids.append(ids)
        out.weights.append(weights)
    if out.dropped:
        print(
            f"warning: {out.dropped} of {len(examples)} examples are longer than sequence_length="
            f"{sequence_length} even after trimming and were left out",
            file=sys.stderr,
        )
    if not out.ids:
        raise KerasftError(f"no example fits in sequence_length={sequence_length}")
    return out


def _trim_context(tokens: ChatTokens, ex: Example, system: str, budget: int) -> list[int] | None:
    """The longest word window of the context that keeps the answer span and fits `budget`."""
    words = ex.context.split(" ")
    offsets, pos = [], 0
    for word in words:
        offsets.append(pos)
        pos += len(word) + 1
    first = max(i for i, start in enumerate(offsets) if start <= ex.answer_start)
    end_char = ex.answer_start + len(ex.response)
    last = max(i for i, start in enumerate(offsets) if start < end_char)

    def encode_window(extra: int) -> list[int]:
        lo, hi = max(0, first - extra), min(len(words), last + 1 + extra)
        window = " ".join(words[lo:hi])
        return encode_prompt(tokens, ex.prompt.replace(ex.context, window, 1), system)

    lo, hi, best = 0, len(words), None
    while lo <= hi:  # binary search on the number of words kept on each side of the answer
        mid = (lo + hi) // 2
        ids = encode_window(mid)
        if len(ids) <= budget:
            best, lo = ids, mid + 1
        else:
            hi = mid - 1
    return best


def padded_length(length: int, sequence_length: int) -> int:
    """Rounds a length up to the bucket grid, capped at sequence_length."""
    return min(int(math.ceil(length / LENGTH_BUCKET) * LENGTH_BUCKET), sequence_length)


def make_batch(data: TokenizedSet, indices, sequence_length: int, num_targets: int, pad_id: int = 0) -> dict:
    """Pads the chosen examples into one batch.

    Returns numpy arrays: token_ids and padding_mask (B, S); target_positions, target_ids and
    target_weights (B, K), where position p predicts target_ids at token p + 1.
    """
    rows = [data.ids[i] for i in indices]
    width = padded_length(max(len(r) for r in rows), sequence_length)
    batch = len(rows)
    token_ids = np.full((batch, width), pad_id, dtype=np.int32)
    padding_mask = np.zeros((batch, width), dtype=bool)
    positions = np.zeros((batch, num_targets), dtype=np.int32)
    targets = np.zeros((batch, num_targets), dtype=np.int32)
    target_weights = np.zeros((batch, num_targets), dtype=np.float32)
    for row, i in enumerate(indices):
        ids, weights = data.ids[i], data.weights[i]
        token_ids[row, : len(ids)] = ids
        padding_mask[row, : len(ids)] = True
        where = np.flatnonzero(weights)[:num_targets]
        positions[row, : len(where)] = where - 1
        targets[row, : len(where)] = ids[where]
        target_weights[row, : len(where)] = weights[where]
    return {
        "token_ids": token_ids,
        "padding_mask": padding_mask,
        "target_positions": positions,
        "target_ids": targets,
        "target_weights": target_weights,
    }


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """A fresh, reproducible permutation for each epoch."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def epoch_batches(data: TokenizedSet, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch as index arrays, a pure function of (data, seed, epoch).

    A short last batch is filled from the start of the same epoch's order, keeping one batch
    shape (one compilation) while every example is still seen each epoch.
    """
    order = epoch_order(len(data), seed, epoch)
    batches = []
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        if len(indices) < batch_size:
            indices = np.concatenate([indices, np.resize(order, batch_size - len(indices))])
        batches.append(indices)
    return batches
