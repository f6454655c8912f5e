"""Batched generation and scoring, for a Keras model and for a Hugging Face folder in transformers.

Keras: one decode loop, shared with the server (kerasft.serve): a jitted prefill that writes one
prompt into a row of keras-hub's KV cache, and a jitted one-token step over all rows, each row at
its own position, so a row that finishes takes the next prompt at the next step (continuous
batching). Greedy by default; temperature / top-k / top-p sampling with a per-row seed.
Log-probabilities of given responses come from one jitted forward pass of the backbone.

Hugging Face: the same prompts (rendered by the shared chat template, tokenised by the folder's
tokenizer) through transformers' generate and forward pass, so an export can be scored with the
exact metrics of the Keras model it came from.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import numpy as np

from kerasft.data.template import chat_tokens, encode_prompt
from kerasft.errors import KerasftError
from kerasft.models.families import family_of, output_head, ties_embeddings

PROMPT_BUCKET = 32
# Row counts a prefill call is padded to (then the cache's rows): prompts that join together are
# prefilled in one call, and few programs compile.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TARGET_BUCKET = 16
# Rows x scored positions per scoring call: bounds the (rows, positions, vocabulary) logits.
SCORE_CELLS = 1024


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when temperature is 0, else sampled.

    top_k: sample among the k most likely tokens (0 = no limit); top_p: the smallest set whose
    probability reaches p (1.0 = no limit). The same seed gives the same tokens.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def causal_lm_for(backbone):
    """keras-hub's causal LM around a backbone, without a TF preprocessor (we tokenise ourselves)."""
    import keras_hub

    causal_lm_class = getattr(keras_hub.models, family_of(backbone).causal_lm_class)
    return causal_lm_class(backbone=backbone, preprocessor=None)


def generate_ids(causal_lm, prompts: list[list[int]], max_new_tokens: int, batch_size: int, stop_ids,
                 sampling: Sampling | None = None, entries: list | None = None) -> tuple[list[list[int]], dict]:
    """Continuations of tokenised prompts, cut at the first stop token.

    The server's decode loop (DecodeFunctions) with `batch_size` cache rows: prompts go in
    longest first, those that fill free rows prefilled in one call; a row that stops takes the
    next prompt at the next step.

    Args:
        sampling: greedy (the default) or temperature / top-k / top-p with a seed; prompt i
            samples from its own stream (seed, i), so its tokens do not depend on the batching.
        entries: a list to fill with one list per prompt of token_entry records (token,
            log-probability, the TOP_LOGPROBS most likely), one per new token.

    Returns:
        (new token ids per prompt, in input order; timing: seconds, generated_tokens, prompts,
        prompt_tokens, batches: [(seconds from a prompt's prefill to its last token, [its index],
        its padded width)]).
    """
    sampling = sampling or Sampling()
    fns = decode_functions(causal_lm)
    stop = set(int(i) for i in stop_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    if entries is not None:
        entries[:] = [[] for _ in prompts]
    batches = []
    started = time.perf_counter()
    if not prompts or max_new_tokens < 1:
        return outputs, _timing(started, prompts, outputs, batches)
    width = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET + max_new_tokens
    cache = fns.empty_cache(batch_size, width)
    values = fns.values()
    pending = [int(i) for i in np.argsort([-len(p) for p in prompts], kind="stable")]
    slots: list[int | None] = [None] * batch_size
    tokens = np.zeros(batch_size, np.int32)
    positions = np.zeros(batch_size, np.int32)
    began = [0.0] * len(prompts)

    def row(index, counter):
        return (sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed, counter, index)

    def take(slot, index, choice, row) -> None:
        token = int(choice.tokens[row])
        finished = token in stop
        if not finished:
            outputs[index].append(token)
            if entries is not None:
                entries[index].append(token_entry(choice, row))
            finished = len(outputs[index]) >= max_new_tokens
        if finished:
            slots[slot] = None
            batches.append((time.perf_counter() - began[index], [index], -(-len(prompts[index]) // PROMPT_BUCKET) * PROMPT_BUCKET))

    while pending or any(s is not None for s in slots):
        free = [slot for slot in range(batch_size) if slots[slot] is None]
        while free and pending:  # one prefill call for all the prompts that join (again if some end at once)
            joining = [pending.pop(0) for _ in range(min(len(free), len(pending)))]
            free = free[: len(joining)]
            for slot, index in zip(free, joining):
                began[index] = time.perf_counter()
                slots[slot] = index
            cache, choice = fns.prefill(cache, free, [prompts[i] for i in joining], [row(i, 0) for i in joining],
                                        values=values)
            for r, (slot, index) in enumerate(zip(free, joining)):
                tokens[slot], positions[slot] = choice.tokens[r], len(prompts[index])
                take(slot, index, choice, r)
            free = [slot for slot in range(batch_size) if slots[slot] is None]
        if all(s is None for s in slots):
            continue
        rows = [row(index if index is not None else 0, len(outputs[index]) if index is not None else 0)
                for index in slots]
        cache, choice = fns.step(cache, tokens, positions, rows, values=values)
        for slot, index in enumerate(slots):
            if index is None:
                continue
            tokens[slot] = choice.tokens[slot]
            positions[slot] += 1
            take(slot, index, choice, slot)
    return outputs, _timing(started, prompts, outputs, batches)


# ---------------------------------------------------------------------------------------------
# The decode loop: a KV cache of `slots` rows, each at its own position.
#
# keras-hub's call_with_cache takes one scalar cache_update_index for the whole batch, so rows that
# joined at different times (continuous batching) cannot share it. The step below vmaps a
# one-row call_with_cache over the rows, each with its own index: every row's prompt sits at
# positions 0..len-1 of its own cache row and the causal mask hides everything past its index, so
# no left padding, no per-row key mask and no re-alignment is needed when a request joins.
# ---------------------------------------------------------------------------------------------

TOP_LOGPROBS = 20  # OpenAI's largest top_logprobs


@dataclass
class Choice:
    """What one decode call chose for each row (numpy): the token, its log-probability under the
    model's distribution (before temperature, top-k, top-p), and the TOP_LOGPROBS most likely."""

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def token_entry(choice: Choice, row: int) -> dict:
    """Row `row` of a decode call's Choice as one new token's record: {"token": id, "logprob",
    "top": [(id, logprob)] for the TOP_LOGPROBS most likely, most likely first}, under the
    model's own distribution (before temperature, top-k and top-p). The server's logprobs and
    token_probabilities are made from these."""
    return {"token": int(choice.tokens[row]), "logprob": float(choice.logprobs[row]),
            "top": list(zip(choice.top_ids[row].tolist(), choice.top_logprobs[row].tolist()))}


def token_probabilities(entries: list[dict], decode, top_k: int) -> list[dict]:
    """One answer's token_entry records as {"token": text, "id", "prob", "top": [{"token", "id",
    "prob"}] * top_k} (probabilities, not logs; decode: ids -> text)."""
    if not 0 <= top_k <= TOP_LOGPROBS:
        raise KerasftError(f"top-k must be from 0 to {TOP_LOGPROBS}, got {top_k}")

    def item(token, logprob):
        return {"token": decode([token]), "id": int(token), "prob": float(np.exp(logprob))}

    return [{**item(e["token"], e["logprob"]), "top": [item(t, lp) for t, lp in e["top"][:top_k]]}
            for e in entries]


def _choose(logits, temperature, top_k, top_p, seed, counter, choice):
    """Picks a token per row: argmax where temperature is 0, else a sample from the tempered
    distribution restricted to the top_k most likely tokens (0: all), then to the smallest set
    of those whose probability reaches top_p. The random key of a row depends only on its seed,
    choice index and token counter, so the same seed gives the same tokens whatever the batch."""
    import jax
    import jax.numpy as jnp

    logits = logits.astype(jnp.float32)
    # log_softmax as jax.nn.log_softmax computes it, (x - max) - log(sum(exp(x - max))), but taken
    # only where needed: the top_k of the logits gives the max and, its first index (the lowest
    # index among equals, as argmax), the greedy token. A full (rows, vocabulary) log_softmax and
    # an argmax reduce cost the 270M's step about a sixth of its time on XLA's CPU backend.
    # The barrier keeps XLA from folding the [:, :1] slices below into the top_k's sort, which
    # then stays a full sort of the vocabulary instead of the CPU's TopK call.
    top_logits, top_ids = jax.lax.optimization_barrier(jax.lax.top_k(logits, TOP_LOGPROBS))
    peak = top_logits[:, :1]
    log_total = jnp.log(jnp.sum(jnp.exp(logits - peak), axis=-1, keepdims=True))
    top_lp = (top_logits - peak) - log_total
    greedy = top_ids[:, 0].astype(jnp.int32)
    vocabulary = logits.shape[-1]

    def sample(_):
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        ordered = -jnp.sort(-scaled, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocabulary), vocabulary)
        ranks = jnp.arange(vocabulary)[None, :]
        within_k = jnp.where(ranks < k[:, None], ordered, -jnp.inf)
        probs = jax.nn.softmax(within_k, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]  # the first token is always kept
        keep = keep & (ranks < k[:, None])
        count = jnp.maximum(jnp.sum(keep, axis=-1), 1)
        threshold = jnp.take_along_axis(ordered, (count - 1)[:, None], axis=-1)
        masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)

        def row_key(s, c, n):
            return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), s), n), c)

        keys = jax.vmap(row_key)(seed, counter, choice)
        gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (vocabulary,)))(keys)
        sampled = jnp.argmax(masked + gumbel, axis=-1).astype(jnp.int32)
        return jnp.where(temperature > 0, sampled, greedy)

    tokens = jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)
    token_lp = ((jnp.take_along_axis(logits, tokens[:, None], axis=-1) - peak) - log_total)[:, 0]
    return tokens, token_lp, top_ids.astype(jnp.int32), top_lp


class DecodeFunctions:
    """The jitted prefill and one-token step of a keras-hub causal LM, compiled once per shape
    and shared by every Decoder over that model (generate_ids and the server).

    Model weights are arguments, not constants: a LoRA model being trained, or adapters swapped
    per row, need no recompilation.
    """

    def __init__(self, causal_lm, row_lora_variables=()):
        import jax

        self.causal_lm = causal_lm
        self.variables = [*causal_lm.trainable_variables, *causal_lm.non_trainable_variables]
        # LoRA variables whose values come per row (several adapters over one base in one batch).
        self.row_lora_variables = list(row_lora_variables)
        self.stored_layouts = stored_layouts(causal_lm, self.variables)
        self._stored = {}  # variable index -> (its value, that value in its stored layout)
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(2,))
        self._step = jax.jit(self._step_fn, donate_argnums=(2,))

    def values(self):
        """The model's variable values as the jitted functions take them: the kernels named in
        stored_layouts transposed (once per value: an unchanged variable reuses its copy)."""
        import jax.numpy as jnp

        values = [v.value for v in self.variables]
        for index, permutation in self.stored_layouts.items():
            source = values[index]
            known = self._stored.get(index)
            if known is None or known[0] is not source:
                known = self._stored[index] = (source, jnp.transpose(source, permutation))
            values[index] = known[1]
        return values

    def empty_cache(self, rows: int, length: int, batch_axis: bool = True):
        """Zeros for `rows` x `length` positions: each row a one-row cache of this model's
        call_with_cache (leaves (rows, 1, ...)); batch_axis=False: one cache of `rows` rows.

        The step vmaps over the rows and hands each its (1, ...) slice as is. Adding that axis
        inside the step instead (c[None]) made XLA's CPU compiler copy every cache tensor twice
        a step around the cache update (the keras-hub layouts carry size-1 axes, such as one
        key/value head, whose layouts it did not unify): 2 x 36 MB a step for the 270M.
        """
        import jax.numpy as jnp

        if batch_axis:
            return self._add_row_axis(self.empty_cache(rows, length, batch_axis=False))

        backbone = self.causal_lm.backbone
        heads = backbone.num_key_value_heads
        head_dim = getattr(backbone, "head_dim", None) or backbone.hidden_dim // backbone.num_query_heads
        dtype = self.causal_lm.compute_dtype
        if type(self.causal_lm).__name__.startswith("Gemma3"):
            return tuple((jnp.zeros((rows, length, heads, head_dim), dtype), jnp.zeros((rows, length, heads, head_dim), dtype))
                         for _ in range(backbone.num_layers))
        return jnp.zeros((rows, backbone.num_layers, 2, length, heads, head_dim), dtype)

    def grow_cache(self, cache, rows: int, length: int):
        """`cache` (None: none yet) with room for `length` positions per row; rows keep their contents."""
        import jax

        fresh = self.empty_cache(rows, length)
        if cache is None:
            return fresh
        axis = self._length_axis(cache)

        def grow(old, new):
            index = (slice(None),) * axis + (slice(0, old.shape[axis]),)
            return new.at[index].set(old)

        return jax.tree_util.tree_map(grow, cache, fresh)

    @staticmethod
    def _add_row_axis(cache):
        import jax

        return jax.tree_util.tree_map(lambda c: c[:, None], cache)

    @staticmethod
    def _length_axis(cache) -> int:
        """The positions axis of a cache from empty_cache (leaves (rows, 1, ...))."""
        return 2 if isinstance(cache, tuple) else 4

    def _with_weights(self, values, lora, fn):
        """Runs fn with the model's variables bound to `values` (and row_lora_variables to `lora`)."""
        import jax.numpy as jnp
        import keras

        # Back to each variable's own layout: XLA folds this transpose into the one its dot
        # wanted, so the kernel is read in place (see stored_layouts).
        values = [jnp.transpose(x, np.argsort(self.stored_layouts[i])) if i in self.stored_layouts else x
                  for i, x in enumerate(values)]
        mapping = dict(zip((id(v) for v in self.variables), values))
        if lora:
            mapping.update(zip((id(v) for v in self.row_lora_variables), lora))
        with keras.StatelessScope(state_mapping=[(v, mapping[id(v)]) for v in self.variables]):
            return fn()

    def _logits(self, hidden):
        """The output head on hidden states (rows, hidden) -> (rows, vocabulary), as keras-hub's
        ReversibleEmbedding(reverse=True) computes it. A tied table is multiplied as
        (vocabulary, hidden) @ (hidden, rows) and transposed back: XLA's CPU dot is about 2.5x
        faster in that order than rows @ table.T for a few rows (the step's largest matmul)."""
        import jax
        import jax.numpy as jnp
        from keras import ops

        embedding = self.causal_lm.backbone.token_embedding
        if not getattr(embedding, "tie_weights", True) or getattr(embedding, "quantization_mode", None):
            return embedding(hidden, reverse=True)
        # The value bound by _with_weights, cast as Keras casts a layer's inputs and variables.
        table = ops.convert_to_tensor(embedding.embeddings).astype(embedding.compute_dtype)
        hidden = hidden.astype(embedding.compute_dtype)
        dtype = getattr(embedding, "reverse_dtype", None)
        if dtype is not None:
            hidden, table = hidden.astype(dtype), table.astype(dtype)
        # The barrier keeps XLA from folding the transpose back into a rows @ table.T dot.
        logits = jax.lax.optimization_barrier(jnp.matmul(table, hidden.T)).T
        soft_cap = getattr(embedding, "logit_soft_cap", None)
        if soft_cap is not None:
            logits = jnp.tanh(logits / soft_cap) * soft_cap
        return logits

    def _prefill_fn(self, values, lora, cache, slots, token_ids, lengths, sampling):
        """Writes prompts (token_ids: (k, width), right-padded) into cache rows `slots` (a slot
        past the cache's rows: a padding row, dropped) and chooses each one's first new token from
        its last prompt position's logits only. Every prompt starts at position 0 of its own row,
        so k prompts are one call_with_cache at index 0. Pad positions after a prompt are
        overwritten by decoding before any query can see them (causal mask)."""
        import jax
        import jax.numpy as jnp

        length_of_cache = jax.tree_util.tree_leaves(cache)[0].shape[self._length_axis(cache)]
        rows = self.empty_cache(token_ids.shape[0], length_of_cache, batch_axis=False)

        def run():
            _, hidden, new_rows = self.causal_lm.call_with_cache(token_ids, rows, 0)
            last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
            # Logits at the last prompt position only (the other positions' are never computed).
            return self._logits(last), new_rows

        logits, new_rows = self._with_weights(values, lora, run)
        cache = jax.tree_util.tree_map(lambda c, r: c.at[slots].set(r.astype(c.dtype), mode="drop"), cache,
                                       self._add_row_axis(new_rows))
        return cache, _choose(logits, *sampling)

    def _step_fn(self, values, lora_table, cache, adapter_ids, tokens, positions, sampling):
        """One token for every row: row r reads `tokens[r]` at `positions[r]` of its cache row."""
        import jax

        def one_row(row_cache, token, position, adapter):  # row_cache: a one-row cache (see empty_cache)
            lora = [table[adapter] for table in lora_table]

            def run():
                _, hidden, new_cache = self.causal_lm.call_with_cache(token[None, None], row_cache, position)
                return hidden[0, 0], new_cache

            return self._with_weights(values, lora, run)

        hidden, cache = jax.vmap(one_row)(cache, tokens, positions, adapter_ids)
        # The output head once over all rows, outside the vmap (keras-hub's logits are unused and
        # dropped by XLA): one (vocabulary, hidden) @ (hidden, rows) matmul (see _logits).
        logits = self._with_weights(values, (), lambda: self._logits(hidden))
        return cache, _choose(logits, *sampling)

    def prefill(self, cache, slots, prompts, sampling_rows, lora=(), values=None):
        """Prompts into cache rows `slots` in one call; returns (cache, Choice of each prompt's
        first new token, one row per prompt).

        The call is padded to ROW_BUCKETS rows (up to the cache's rows) and to a multiple of
        PROMPT_BUCKET tokens, so few programs compile. sampling_rows: per prompt (temperature,
        top_k, top_p, seed, counter, choice); lora: the values of row_lora_variables, shared by
        these prompts (prefill prompts of different adapters in separate calls)."""
        import jax
        import jax.numpy as jnp

        count = len(prompts)
        cache_rows = jax.tree_util.tree_leaves(cache)[0].shape[0]
        if not 0 < count <= cache_rows or len(slots) != count or len(sampling_rows) != count:
            raise ValueError(f"prefill: {count} prompts, {len(slots)} slots, {len(sampling_rows)} sampling rows "
                             f"for a cache of {cache_rows} rows")
        rows = min([b for b in ROW_BUCKETS if b >= count] + [cache_rows])
        width = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
        token_ids = np.zeros((rows, width), np.int32)
        lengths = np.ones(rows, np.int32)
        targets = np.full(rows, cache_rows, np.int32)  # padding rows: past the cache, dropped
        for r, ids in enumerate(prompts):
            token_ids[r, : len(ids)] = ids
            lengths[r], targets[r] = len(ids), slots[r]
        padded = list(sampling_rows) + [(0.0, 0, 1.0, 0, 0, 0)] * (rows - count)
        cache, chosen = self._prefill(values if values is not None else self.values(), list(lora), cache,
                                      jnp.asarray(targets), token_ids, jnp.asarray(lengths), _sampling_arrays(padded))
        return cache, Choice(*(np.asarray(x)[:count] for x in chosen))

    def step(self, cache, tokens, positions, sampling_rows, adapter_ids=None, lora_table=(), values=None):
        """One new token for every cache row; returns (cache, Choice). The cache is donated.

        lora_table: per row_lora_variable, its values stacked over adapters; adapter_ids picks
        each row's."""
        rows = len(tokens)
        adapter_ids = np.zeros(rows, np.int32) if adapter_ids is None else np.asarray(adapter_ids, np.int32)
        cache, chosen = self._step(values if values is not None else self.values(),
                                   list(lora_table), cache, adapter_ids, np.asarray(tokens, np.int32),
                                   np.asarray(positions, np.int32), _sampling_arrays(sampling_rows))
        return cache, Choice(*(np.asarray(x) for x in chosen))


def stored_layouts(causal_lm, variables) -> dict[int, tuple[int, ...]]:
    """{variable index: axis permutation} of the kernels the decode functions take transposed.

    keras-hub's Gemma attention keeps its projection kernels head-major: query (heads, hidden,
    head_dim), attention_output (heads, head_dim, hidden), key/value (kv_heads, hidden,
    head_dim). In the vmapped one-token step XLA's CPU dot wants the heads axis in the middle,
    and with the kernels as arguments it transposed each of them on every step (the
    embedded 270M: 36 copies of 2.6 MB a step, about a fifth of the step's time; the compiled
    step's HLO shows them as copy fusions of the weight parameters). Passed as (hidden, heads,
    head_dim) / (head_dim, heads, hidden) and transposed back inside the jitted function, the
    two transposes cancel and the kernel is read where it lies. A kernel with one head needs
    no transpose and is left as it is.
    """
    if not type(causal_lm).__name__.startswith("Gemma"):
        return {}
    names = ("/attention/query/kernel", "/attention/key/kernel", "/attention/value/kernel",
             "/attention/attention_output/kernel")
    return {index: (1, 0, 2) for index, v in enumerate(variables)
            if len(v.shape) == 3 and v.shape[0] > 1 and v.path.endswith(names)}


def _sampling_arrays(rows):
    """[(temperature, top_k, top_p, seed, counter, choice)] -> the arrays _choose takes."""
    temperature, top_k, top_p, seed, counter, choice = zip(*rows)
    return (np.asarray(temperature, np.float32), np.asarray(top_k, np.int32), np.asarray(top_p, np.float32),
            np.asarray(seed, np.uint32), np.asarray(counter, np.int32), np.asarray(choice, np.int32))


_DECODE_FUNCTIONS = weakref.WeakKeyDictionary()


def decode_functions(causal_lm) -> DecodeFunctions:
    """The DecodeFunctions of a causal LM (one per model, so compiled programs are reused)."""
    if causal_lm not in _DECODE_FUNCTIONS:
        _DECODE_FUNCTIONS[causal_lm] = DecodeFunctions(causal_lm)
    return _DECODE_FUNCTIONS[causal_lm]


def cut_at_stop(new_ids: list[int], stop_ids) -> list[int]:
    """The ids before the first stop id."""
    for cut, token in enumerate(new_ids):
        if token in stop_ids:
            return new_ids[:cut]
    return new_ids


def _length_sorted_batches(prompts, batch_size: int) -> list[list[int]]:
    order = np.argsort([len(p) for p in prompts], kind="stable")
    # Balanced batches: 108 prompts at batch_size 32 run as 4 batches of 27, not 3 of 32 and a padded one.
    batch_size = -(-len(prompts) // -(-len(prompts) // batch_size))
    return [[int(i) for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


def _padded_prompts(rows, batch_size: int, pad_id: int, extra: int):
    rows = rows + [rows[-1]] * (batch_size - len(rows))  # fixed batch size: one compiled shape
    # keras-hub decodes until the row width unless every row has stopped, so the width is the
    # bucketed prompt length plus exactly `extra` new tokens: few shapes, no wasted decode steps.
    prompt_width = -(-max(len(r) for r in rows) // PROMPT_BUCKET) * PROMPT_BUCKET
    width = prompt_width + extra
    token_ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    padding_mask = np.zeros((len(rows), width), dtype=bool)
    for r, ids in enumerate(rows):
        token_ids[r, : len(ids)] = ids
        padding_mask[r, : len(ids)] = True
    return token_ids, padding_mask, prompt_width


def _timing(started: float, prompts, outputs, batches) -> dict:
    return {
        "seconds": time.perf_counter() - started,
        "generated_tokens": sum(len(o) for o in outputs),
        "prompts": len(prompts),
        "prompt_tokens": sum(len(p) for p in prompts),
        "batches": batches,
    }


def make_response_scorer(backbone):
    """Builds score(token_ids, padding_mask, positions, targets) -> log-probabilities (numpy).

    One jitted forward pass of the backbone (its current weights, LoRA included); the
    vocabulary projection runs only at `positions`, where the log-probability of `targets`
    (the next tokens) is taken.
    """
    import jax
    import jax.numpy as jnp

    embedding = backbone.token_embedding
    soft_cap = getattr(embedding, "logit_soft_cap", None)
    variables = [*backbone.trainable_variables, *backbone.non_trainable_variables]
    table_index = [id(v) for v in variables].index(id(output_head(backbone)))
    tied = ties_embeddings(backbone)
    num_trainable = len(backbone.trainable_variables)

    @jax.jit
    def score(trainable, non_trainable, token_ids, padding_mask, positions, targets):
        hidden, _ = backbone.stateless_call(trainable, non_trainable,
                                            {"token_ids": token_ids, "padding_mask": padding_mask})
        table = [*trainable, *non_trainable][table_index]
        table = table if tied else table.T  # untied: keras-hub keeps (hidden, vocabulary)
        picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)
        logits = jnp.einsum("bkd,vd->bkv", picked, table.astype(picked.dtype)).astype(jnp.float32)
        if soft_cap:
            logits = jnp.tanh(logits / soft_cap) * soft_cap
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]

    def run(token_ids, padding_mask, positions, targets):
        state = [v.value for v in variables]
        out = score(state[:num_trainable], state[num_trainable:], token_ids, padding_mask, positions, targets)
        return np.asarray(out)

    return run


def response_logprobs(score_fn, prompts: list[list[int]], responses: list[list[int]], batch_size: int,
                      pad_id: int = 0) -> list[tuple[float, int]]:
    """Sum of log p(response token | everything before it) and the token count, per pair.

    Args:
        score_fn: a make_response_scorer function, or any function with its signature.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    results: list[tuple[float, int]] = [(0.0, 0)] * len(prompts)
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    longest = max((len(r) for r in responses), default=0)
    num_targets = max(TARGET_BUCKET, -(-longest // TARGET_BUCKET) * TARGET_BUCKET)
    rows_per_call = max(1, min(batch_size, SCORE_CELLS // num_targets))
    for chosen in _length_sorted_batches(sequences, rows_per_call):
        rows = [sequences[i] for i in chosen]
        token_ids, padding_mask, _ = _padded_prompts(rows, rows_per_call, pad_id, 0)
        positions = np.zeros((len(token_ids), num_targets), dtype=np.int32)
        targets = np.zeros_like(positions)
        for r, index in enumerate(chosen):
            start, count = len(prompts[index]), len(responses[index])
            # Position t predicts token t + 1: the response's tokens are predicted from start - 1 on.
            positions[r, :count] = np.arange(start - 1, start - 1 + count)
            targets[r, :count] = responses[index]
        log_probs = score_fn(token_ids, padding_mask, positions, targets)
        for r, index in enumerate(chosen):
            count = len(responses[index])
            results[index] = (float(np.sum(log_probs[r, :count], dtype=np.float64)), count)
    return results


class KerasModel:
    """A keras-hub Gemma backbone (LoRA or not) with the shared chat template, for evaluation."""

    kind = "keras"

    def __init__(self, backbone, tokenizer, name: str = ""):
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.tokens = chat_tokens(tokenizer)
        self.name = name
        self._causal_lm = None
        self._scorer = None
        self._forward = None

    def encode_prompt(self, prompt: str, system: str = "") -> list[int]:
        return encode_prompt(self.tokens, prompt, system)

    def encode(self, text: str) -> list[int]:
        return self.tokens.encode(text)

    def decode(self, ids) -> str:
        return self.tokens.decode(ids)

    @property
    def stop_ids(self):
        return self.tokens.stop_ids

    def generate(self, prompts, max_new_tokens: int, batch_size: int, sampling: Sampling | None = None):
        if self._causal_lm is None:
            self._causal_lm = causal_lm_for(self.backbone)
        return generate_ids(self._causal_lm, prompts, max_new_tokens, batch_size, self.stop_ids, sampling)

    def logprobs(self, prompts, responses, batch_size: int):
        if self._scorer is None:
            self._scorer = make_response_scorer(self.backbone)
        return response_logprobs(self._scorer, prompts, responses, batch_size, self.tokens.pad)

    def prefill_seconds(self, prompts, rows, batch_size: int) -> float:
        """Wall time of a forward pass over one padded prompt batch (compiled before timing)."""
        import jax

        if self._forward is None:
            backbone = self.backbone

            @jax.jit
            def forward(trainable, non_trainable, token_ids, padding_mask):
                hidden, _ = backbone.stateless_call(trainable, non_trainable,
                                                    {"token_ids": token_ids, "padding_mask": padding_mask})
                return hidden[:, -1]

            self._forward = forward
        token_ids, padding_mask, _ = _padded_prompts([prompts[i] for i in rows], batch_size, self.tokens.pad, 0)
        args = ([v.value for v in self.backbone.trainable_variables], [v.value for v in self.backbone.non_trainable_variables],
                token_ids, padding_mask)
        np.asarray(self._forward(*args))  # compile and warm up
        start = time.perf_counter()
        np.asarray(self._forward(*args))
        return time.perf_counter() - start


class HFModel:
    """A Hugging Face folder in transformers: the same prompts, generate() and forward pass."""

    kind = "transformers"

    def __init__(self, folder, name: str = ""):
        try:
            import torch
            import transformers
        except ImportError:
            raise KerasftError("evaluating a Hugging Face folder needs transformers and torch: "
                               "pip install 'kerasft[verify]'") from None
        self.torch = torch
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
            self.model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        except (OSError, ValueError) as err:
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise KerasftError(f"{folder}: transformers cannot load this folder: {first_line}") from None
        self.model.eval()
        self.name = name or str(folder)
        # The chat template "auto" stands for, from the turn token the vocabulary has (as
        # kerasft.data.template.chat_tokens decides for Keras models).
        vocabulary = self.tokenizer.get_vocab()
        closing = next((token for token in ("<end_of_turn>", "<|eot_id|>") if token in vocabulary), None)
        self.template = {"<end_of_turn>": "gemma", "<|eot_id|>": "llama3", None: "zephyr"}[closing]
        eos = self.tokenizer.eos_token_id
        self.stop_ids = tuple(dict.fromkeys((vocabulary[closing], eos))) if closing else (eos,)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def encode_prompt_text(self, rendered: str) -> list[int]:
        """Ids of a prompt rendered by kerasft.data.template.render_chat: it holds <bos> and the
        turn markers as text, which the tokenizer maps to their single ids, as the export's
        chat_template does."""
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def generate(self, prompts, max_new_tokens: int, batch_size: int, sampling: Sampling | None = None):
        torch = self.torch
        sampling = sampling or Sampling()
        options = {"do_sample": False}
        if not sampling.greedy:
            torch.manual_seed(sampling.seed)
            options = {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k or None,
                       "top_p": sampling.top_p}
        outputs: list[list[int]] = [[] for _ in prompts]
        batches = []
        started = time.perf_counter()
        for chosen in _length_sorted_batches(prompts, batch_size):
            rows = [prompts[i] for i in chosen]
            width = max(len(r) for r in rows)
            # Left padding: every row's next token is then at the same position.
            token_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, ids in enumerate(rows):
                token_ids[r, width - len(ids):] = torch.tensor(ids)
                attention[r, width - len(ids):] = 1
            batch_start = time.perf_counter()
            with torch.no_grad():
                out = self.model.generate(input_ids=token_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                          eos_token_id=list(self.stop_ids), pad_token_id=self.pad_id, **options)
            batches.append((time.perf_counter() - batch_start, chosen, width))
            for r, index in enumerate(chosen):
                outputs[index] = cut_at_stop(out[r, width:].tolist(), self.stop_ids)
        return outputs, _timing(started, prompts, outputs, batches)

    def logprobs(self, prompts, responses, batch_size: int):
        torch = self.torch
        results = []
        for prompt, response in zip(prompts, responses):
            ids = torch.tensor([list(prompt) + list(response)])
            with torch.no_grad():
                logits = self.model(input_ids=ids).logits[0].double()
            log_probs = torch.log_softmax(logits, dim=-1)
            start = len(prompt)
            picked = log_probs[start - 1 : start - 1 + len(response)].gather(1, torch.tensor(response)[:, None])
            results.append((float(picked.sum()), len(response)))
        return results

    def prefill_seconds(self, prompts, rows, batch_size: int) -> float:
        torch = self.torch
        width = max(len(prompts[i]) for i in rows)
        token_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            token_ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
        start = time.perf_counter()
        with torch.no_grad():
            self.model(input_ids=token_ids)
        return time.perf_counter() - start
