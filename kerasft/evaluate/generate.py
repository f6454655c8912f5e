"""Batched generation and scoring, for a Keras model and for a Hugging Face folder in transformers.

Keras: keras-hub's cached decoder with few static shapes. Prompts are sorted by length, so each
batch decodes from nearly the same position; batches are padded to a fixed size and their width
to a bucket grid, so a run compiles a handful of programs instead of one per call. Greedy by
default; temperature / top-k / top-p sampling through keras-hub's samplers, reproducible with a
seed. Log-probabilities of given responses come from one jitted forward pass of the backbone.

Hugging Face: the same prompts (rendered by the shared chat template, tokenised by the folder's
tokenizer) through transformers' generate and forward pass, so an export can be scored with the
exact metrics of the Keras model it came from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from kerasft.data.template import chat_tokens, encode_prompt
from kerasft.errors import KerasftError
from kerasft.models.families import family_of, output_head, ties_embeddings

PROMPT_BUCKET = 32
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


def keras_sampler(sampling: Sampling):
    """The keras-hub sampler for a Sampling (a fresh one, so its seed state starts over)."""
    import keras_hub

    if sampling.greedy:
        return keras_hub.samplers.GreedySampler()
    top_k = sampling.top_k or None
    if sampling.top_p < 1.0:
        return keras_hub.samplers.TopPSampler(p=sampling.top_p, k=top_k, seed=sampling.seed,
                                              temperature=sampling.temperature)
    if top_k:
        return keras_hub.samplers.TopKSampler(k=top_k, seed=sampling.seed, temperature=sampling.temperature)
    return keras_hub.samplers.RandomSampler(seed=sampling.seed, temperature=sampling.temperature)


def generate_ids(causal_lm, prompts: list[list[int]], max_new_tokens: int, batch_size: int, stop_ids, pad_id: int = 0,
                 sampling: Sampling | None = None) -> tuple[list[list[int]], dict]:
    """Continuations of tokenised prompts, cut at the first stop token.

    Args:
        sampling: greedy (the default) or temperature / top-k / top-p with a seed.

    Returns:
        (new token ids per prompt, in input order; timing: seconds, generated_tokens, prompts,
        prompt_tokens, batches: [(seconds, row indices, padded prompt width)]).
    """
    _use_sampler(causal_lm, sampling or Sampling())
    # keras-hub's jitted generate step, called directly: its `generate()` wrapper chokes on
    # Gemma 3's empty image output when no preprocessor is attached.
    generate_step = causal_lm.make_generate_function()
    outputs: list[list[int]] = [[] for _ in prompts]
    batches = []
    started = time.perf_counter()
    for chosen in _length_sorted_batches(prompts, batch_size):
        rows = [prompts[i] for i in chosen]
        token_ids, padding_mask, prompt_width = _padded_prompts(rows, batch_size, pad_id, max_new_tokens)
        batch_start = time.perf_counter()
        result = generate_step({"token_ids": token_ids, "padding_mask": padding_mask}, tuple(stop_ids))
        out_ids = np.asarray(result["token_ids"])  # device -> host: the batch is done here
        batches.append((time.perf_counter() - batch_start, chosen, prompt_width))
        for r, index in enumerate(chosen):
            prompt_len = len(prompts[index])
            outputs[index] = cut_at_stop(out_ids[r, prompt_len : prompt_len + max_new_tokens].tolist(), stop_ids)
    return outputs, _timing(started, prompts, outputs, batches)


def _use_sampler(causal_lm, sampling: Sampling) -> None:
    """Sets the causal LM's sampler, its random state at the seed's start.

    The same Sampling as last time keeps the compiled generate function and only rewinds the
    seed state; another one goes through compile(), which drops it (one more compilation).
    """
    sampler = causal_lm.sampler
    if getattr(sampler, "kerasft_sampling", None) == sampling or (
        sampling.greedy and type(sampler).__name__ == "GreedySampler"
    ):
        for variable, start in zip(sampler.variables, getattr(sampler, "kerasft_start", ())):
            variable.assign(start)
        return
    sampler = keras_sampler(sampling)
    sampler.kerasft_sampling = sampling
    sampler.kerasft_start = [np.asarray(v.value) for v in sampler.variables]
    causal_lm.compile(sampler=sampler)


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
        return generate_ids(self._causal_lm, prompts, max_new_tokens, batch_size, self.stop_ids, self.tokens.pad, sampling)

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
