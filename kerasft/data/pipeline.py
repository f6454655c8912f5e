"""Examples -> token ids with loss weights -> padded batches of a few static shapes.

The pipeline alone owns the loss mask: weight 1 on every assistant turn and the token that
closes it, 0 on system and user turns, the template's own text and padding; for raw text
(task=pretrain) weight 1 on every token. Batches carry the positions of the weighted tokens, so
the training step computes the vocabulary projection only there (Gemma's 262k-entry head is
most of the cost of a 270M model).

Preference pairs (train.objective dpo / orpo) are tokenised by the same template function, with
the same response mask, into two rows each: chosen at row 2i, rejected at 2i + 1. A batch of B
pairs is 2B rows, the B chosen rows first (the layout TRL's trainers use).

Token ids live in one flat array with offsets, so a tokenised set saved in the cache is
memory-mapped on reuse rather than read into memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from kerasft.data.records import Example
from kerasft.data.template import ChatTokens, encode_conversation
from kerasft.errors import KerasftError

LENGTH_BUCKET = 64  # sequence lengths are padded to a multiple of this: few shapes, few compiles
TARGET_BUCKET = 16
SORT_WINDOW = 32  # length-grouped batching sorts within windows of this many batches
CACHE_VERSION = 3  # 3: info.json records sequence_length


@dataclass
class TokenizedSet:
    """Token ids and 0/1 loss weights of each row, stored flat; plus what was trimmed or dropped.

    A row is one example, or several packed ones (packing, task=pretrain). `sequence_length` is
    the longest a row may be (data.sequence_length when tokenised): the widest a batch is padded
    to; 0 means no limit beyond the rows' own lengths.
    """

    tokens: np.ndarray  # int32, all rows concatenated
    loss_mask: np.ndarray  # uint8, same length
    offsets: np.ndarray  # int64, len(rows) + 1
    sequence_length: int = 0
    trimmed: int = 0
    dropped: int = 0
    dropped_origins: list[str] = field(default_factory=list)
    group_by_length: bool = False
    cache_key: str = ""  # set by tokenize_cached
    pairs: bool = False  # rows 2i and 2i + 1 are the chosen and rejected answers of pair i
    reference_logps: np.ndarray | None = None  # per row, under the reference model (precompute_reference)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_examples(self) -> int:
        """What an epoch counts and a batch index picks: rows, or pairs of rows."""
        return len(self) // 2 if self.pairs else len(self)

    def rows_of(self, indices) -> np.ndarray:
        """The row indices of examples `indices`: for pairs, every chosen row, then every rejected row."""
        indices = np.asarray(indices, dtype=np.int64)
        return np.concatenate([2 * indices, 2 * indices + 1]) if self.pairs else indices

    @property
    def example_lengths(self) -> np.ndarray:
        """Tokens per example (a pair: its longer row)."""
        lengths = self.lengths
        return np.maximum(lengths[0::2], lengths[1::2]) if self.pairs else lengths

    @property
    def ids(self):
        return _Rows(self.tokens, self.offsets, np.int32)

    @property
    def weights(self):
        return _Rows(self.loss_mask, self.offsets, np.float32)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_targets(self) -> int:
        """The static number of loss positions per row: the most any row needs, bucketed."""
        counts = np.add.reduceat(self.loss_mask.astype(np.int64), self.offsets[:-1]) if len(self) else [0]
        return int(math.ceil(max(int(np.max(counts)), 1) / TARGET_BUCKET) * TARGET_BUCKET)

    @classmethod
    def from_rows(cls, rows: list[tuple[list[int], list[int]]], **info) -> "TokenizedSet":
        lengths = [len(ids) for ids, _ in rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if not rows:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.uint8), offsets, **info)
        tokens = np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in rows])
        mask = np.concatenate([np.asarray(ws, dtype=np.uint8) for _, ws in rows])
        return cls(tokens, mask, offsets, **info)

    def save(self, folder: Path, tmp: Path | None = None) -> None:
        """Writes the arrays and counts into `folder` atomically: into `tmp` (this process's own
        sibling folder, see private_tmp), then one rename. When another process has saved the same
        folder meanwhile, its copy is kept and ours removed: both hold the same tokens."""
        tmp = tmp or private_tmp(folder)
        tmp.mkdir(parents=True, exist_ok=True)
        for name in ("tokens", "loss_mask", "offsets"):
            array = getattr(self, name)
            if isinstance(array, np.memmap) and Path(array.filename) == (tmp / f"{name}.npy").resolve():
                array.flush()  # streamed straight into this folder already
                continue
            np.save(tmp / f"{name}.npy", array)
        info = {"sequence_length": self.sequence_length, "trimmed": self.trimmed, "dropped": self.dropped,
                "dropped_origins": self.dropped_origins, "pairs": self.pairs}
        (tmp / "info.json").write_text(json.dumps(info))
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "info.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process saved it first

    @classmethod
    def load(cls, folder: Path) -> "TokenizedSet":
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("tokens", "loss_mask", "offsets")}
        return cls(**arrays, **json.loads((folder / "info.json").read_text()))


class _Rows:
    """Read-only list-like view of the rows of a flat array."""

    def __init__(self, flat, offsets, dtype):
        self.flat, self.offsets, self.dtype = flat, offsets, dtype

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return np.asarray(self.flat[self.offsets[i] : self.offsets[i + 1]], dtype=self.dtype)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def tokenize_examples(tokens: ChatTokens, examples: list[Example], sequence_length: int, system: str = "",
                      template: str = "auto", packing: bool = False) -> TokenizedSet:
    """Tokenises chat examples for training; QA contexts are trimmed around the answer to fit.

    Examples that cannot fit even with the context trimmed are left out, counted and named in
    a warning on stderr (and in `dropped_origins`), never silently.

    Args:
        system: the config's system prompt, used where an example has none of its own.
        template: "auto" (the model's own), "gemma", "llama3", "zephyr" or "plain" (see
            kerasft.data.template).
        packing: concatenate short examples into rows of up to sequence_length tokens.
    """
    encode = _batch_encoder(tokens, examples, system, template)
    rows, trimmed, dropped = [], 0, []
    for ex in examples:
        ex_system = ex.system or system
        ids, weights = encode_conversation(tokens, ex.prompt, ex.response, ex_system, ex.history, template, encode)
        if len(ids) > sequence_length and ex.context and ex.answer_start >= 0 and not ex.history:
            window = _trim_context(tokens, ex, ex_system, template, sequence_length)
            if window is not None:
                (ids, weights), trimmed = window, trimmed + 1
        if len(ids) > sequence_length:
            dropped.append(f"{ex.origin or ex.id} ({len(ids)} tokens)")
            continue
        rows.append((ids, weights))
    if dropped:
        shown = "; ".join(dropped[:3]) + (" ..." if len(dropped) > 3 else "")
        print(f"warning: {len(dropped)} of {len(examples)} examples are longer than sequence_length={sequence_length} "
              f"even after trimming and were left out: {shown}", file=sys.stderr)
    if not rows:
        raise KerasftError(f"no example fits in sequence_length={sequence_length}; raise data.sequence_length")
    if packing:
        rows = pack_rows(rows, sequence_length)
    return TokenizedSet.from_rows(rows, sequence_length=sequence_length, trimmed=trimmed, dropped=len(dropped),
                                  dropped_origins=dropped)


def tokenize_pairs(tokens: ChatTokens, examples: list[Example], sequence_length: int, system: str = "",
                   template: str = "auto") -> TokenizedSet:
    """Tokenises preference pairs (Examples with `rejected`) into two rows each with the SFT
    template and loss mask: chosen at row 2i, rejected at row 2i + 1. A pair whose longer row does
    not fit sequence_length is left out whole, counted and named on stderr (contexts are not
    trimmed: both answers must see the same prompt).

    Raises KerasftError naming the first example that has no rejected answer.
    """
    missing = next((ex for ex in examples if not ex.rejected), None)
    if missing is not None:
        raise KerasftError(f"{missing.origin or missing.id}: no rejected answer; train.objective dpo / orpo "
                           "trains on preference pairs (prompt or messages, chosen, rejected)")
    answers = [replace(ex, response=answer) for ex in examples for answer in (ex.response, ex.rejected)]
    encode = _batch_encoder(tokens, answers, system, template)
    rows, dropped, trimmed = [], [], 0
    for chosen, rejected in zip(answers[0::2], answers[1::2]):
        pair = [encode_conversation(tokens, ex.prompt, ex.response, ex.system or system, ex.history, template, encode)
                for ex in (chosen, rejected)]
        longest = max(len(ids) for ids, _ in pair)
        if longest > sequence_length and chosen.context and chosen.answer_start >= 0 and not chosen.history:
            # One context window for both answers: around the chosen span, fitting the longer answer.
            longer = replace(chosen, response=max(chosen.response, rejected.response, key=len))
            prompt = _trimmed_prompt(tokens, longer, chosen.system or system, template, sequence_length)
            if prompt is not None:
                pair = [encode_conversation(tokens, prompt, ex.response, ex.system or system, (), template)
                        for ex in (chosen, rejected)]
                longest, trimmed = max(len(ids) for ids, _ in pair), trimmed + 1
        if longest > sequence_length:
            dropped.append(f"{chosen.origin or chosen.id} ({longest} tokens)")
            continue
        rows.extend(pair)
    if dropped:
        shown = "; ".join(dropped[:3]) + (" ..." if len(dropped) > 3 else "")
        print(f"warning: {len(dropped)} of {len(examples)} preference pairs are longer than sequence_length="
              f"{sequence_length} and were left out: {shown}", file=sys.stderr)
    if not rows:
        raise KerasftError(f"no preference pair fits in sequence_length={sequence_length}; raise data.sequence_length")
    return TokenizedSet.from_rows(rows, sequence_length=sequence_length, trimmed=trimmed, dropped=len(dropped),
                                  dropped_origins=dropped, pairs=True)


def tokenize_documents(tokens: ChatTokens, documents, sequence_length: int, folder: Path | None = None,
                       chunk: int = 1024) -> TokenizedSet:
    """Raw text for continued pretraining: <bos> doc <eos> streams, concatenated and cut into
    rows of exactly sequence_length tokens (the last row may be shorter); every token is a
    target except each row's first and each document's <bos>.

    Args:
        documents: any iterable of Examples (their `response` is the text); read once, in
            chunks, so a corpus larger than memory streams through.
        folder: when given, the token stream goes straight to files there and the result is
            memory-mapped from them (this is how the cache stores a corpus); else in memory.
    """
    sink = _TokenSink(folder)
    batch: list[str] = []
    for ex in documents:
        batch.append(ex.response)
        if len(batch) == chunk:
            sink.extend(tokens, batch)
            batch = []
    if batch:
        sink.extend(tokens, batch)
    stream = sink.finish()
    total = len(stream)
    starts = np.arange(0, total, sequence_length, dtype=np.int64)
    if total and total - starts[-1] < 2:  # a last row of one token has nothing to predict
        total, starts = int(starts[-1]), starts[:-1]
    if not len(starts):
        raise KerasftError("the text corpus is empty after tokenisation")
    offsets = np.append(starts, total)
    mask = sink.mask_array(total)
    for lo in range(0, total, 1 << 22):  # in slices: never a second full-size temporary
        hi = min(total, lo + (1 << 22))
        mask[lo:hi] = stream[lo:hi] != tokens.bos
    mask[starts] = 0
    return TokenizedSet(stream[:total], mask, offsets, sequence_length=sequence_length)


class _TokenSink:
    """Collects token ids in memory or appends them to a file, for tokenize_documents."""

    def __init__(self, folder: Path | None):
        self.folder, self.parts, self.count = folder, [], 0
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.raw = (folder / "tokens.bin").open("wb")

    def extend(self, tokens: ChatTokens, texts: list[str]) -> None:
        pieces = [[tokens.bos, *ids, tokens.eos] for ids in tokens.encode_batch(texts, after_special=True)]
        array = np.fromiter((t for ids in pieces for t in ids), dtype=np.int32, count=sum(map(len, pieces)))
        self.count += len(array)
        if self.folder is None:
            self.parts.append(array)
        else:
            array.tofile(self.raw)

    def finish(self) -> np.ndarray:
        if self.folder is None:
            return np.concatenate(self.parts) if self.parts else np.zeros(0, np.int32)
        self.raw.close()
        if not self.count:
            return np.zeros(0, np.int32)
        out = np.lib.format.open_memmap(self.folder / "tokens.npy", mode="w+", dtype=np.int32, shape=(self.count,))
        raw = np.memmap(self.folder / "tokens.bin", dtype=np.int32, mode="r", shape=(self.count,))
        for lo in range(0, self.count, 1 << 22):
            out[lo : lo + (1 << 22)] = raw[lo : lo + (1 << 22)]
        del raw
        (self.folder / "tokens.bin").unlink()
        return out

    def mask_array(self, total: int) -> np.ndarray:
        if self.folder is None:
            return np.zeros(total, np.uint8)
        return np.lib.format.open_memmap(self.folder / "loss_mask.npy", mode="w+", dtype=np.uint8, shape=(total,))


def pack_rows(rows, sequence_length: int):
    """First-fit-decreasing packing of (ids, weights) rows into rows of at most sequence_length."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    bins: list[list] = []  # [free space, ids, weights]
    for i in order:
        ids, weights = rows[i]
        for b in bins:
            if b[0] >= len(ids):
                b[0] -= len(ids)
                b[1].extend(ids)
                b[2].extend(weights)
                break
        else:
            bins.append([sequence_length - len(ids), list(ids), list(weights)])
    return [(b[1], b[2]) for b in bins]


def tokenize_cached(tokens: ChatTokens, examples, data_cfg, cache_root: Path | None,
                    pairs: bool = False) -> tuple[TokenizedSet, bool]:
    """tokenize_examples / tokenize_documents / tokenize_pairs (`pairs`) through an on-disk cache
    keyed by the examples (for a streamed corpus: the source's path, size and mtime), the
    tokenizer, the template, the system prompt, the sequence length and packing.

    Returns (the set, whether it came from the cache). The set's `cache_key` names its cache entry
    (what a cache of values computed from these rows, such as reference log-probs, is keyed by).
    """
    pretrain = data_cfg.task == "pretrain"
    digest = hashlib.sha256()
    settings = [CACHE_VERSION, data_cfg.task, data_cfg.template, data_cfg.system, data_cfg.sequence_length,
                data_cfg.packing] + (["pairs"] if pairs else [])
    digest.update(json.dumps(settings).encode())
    digest.update(hashlib.sha256(tokens.fingerprint()).digest())
    identity = getattr(examples, "identity", None)  # a streamed corpus: keyed without reading it
    if identity is not None:
        digest.update(identity.encode())
    else:
        for ex in examples:
            digest.update(json.dumps(ex.to_json(), ensure_ascii=False, sort_keys=True).encode())
    folder = None if not data_cfg.cache or cache_root is None else Path(cache_root) / "tokens" / digest.hexdigest()[:32]
    if folder is not None and (folder / "info.json").is_file():
        result, hit = TokenizedSet.load(folder), True
    elif pairs:
        result, hit = tokenize_pairs(tokens, examples, data_cfg.sequence_length, data_cfg.system,
                                     data_cfg.template), False
        if folder is not None:
            result.save(folder)
    elif pretrain:
        tmp = None if folder is None else private_tmp(folder)
        result, hit = tokenize_documents(tokens, examples, data_cfg.sequence_length, tmp), False
        if folder is not None:
            result.save(folder, tmp)
            result = TokenizedSet.load(folder)
    else:
        result, hit = tokenize_examples(tokens, examples, data_cfg.sequence_length, data_cfg.system,
                                        data_cfg.template, data_cfg.packing), False
        if folder is not None:
            result.save(folder)
    result.group_by_length = data_cfg.batching == "length"
    result.cache_key = digest.hexdigest()[:32] if folder is not None else ""
    return result, hit


def private_tmp(folder: Path) -> Path:
    """A temporary sibling of `folder` that only this process writes: named after the host and
    process id, so processes sharing a cache (several per host, or hosts on one file system) never
    write into one another's. Such folders left by processes of this host that are gone (killed
    mid-write) are removed first."""
    host = socket.gethostname()
    for stale in folder.parent.glob(f"{folder.name}.{host}-*.tmp"):
        pid = stale.name[len(folder.name) + len(host) + 2 : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.{host}-{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _batch_encoder(tokens: ChatTokens, examples: list[Example], system: str, template: str):
    """Encodes every text piece the template will ask for in one batched (multi-threaded) tokenizer
    call (a dry run records them), and returns a lookup with the same signature as encode."""
    wanted: list[str] = []

    def record(text):
        wanted.append(text)
        return []

    for ex in examples:
        encode_conversation(tokens, ex.prompt, ex.response, ex.system or system, ex.history, template, record)
    unique = list(dict.fromkeys(t for t in wanted if t))
    memo = dict(zip(unique, tokens.encode_batch(unique))) if unique else {}
    return lambda text: memo[text] if text else []


def _trim_context(tokens: ChatTokens, ex: Example, system: str, template: str, budget: int):
    """(ids, weights) with the longest word window of the context that keeps the answer span and
    fits `budget`, or None."""
    prompt = _trimmed_prompt(tokens, ex, system, template, budget)
    return None if prompt is None else encode_conversation(tokens, prompt, ex.response, system, (), template)


def _trimmed_prompt(tokens: ChatTokens, ex: Example, system: str, template: str, budget: int) -> str | None:
    """The prompt with the longest word window of the context that keeps the answer span
    (ex.answer_start, ex.response) and whose conversation with ex.response fits `budget`, or None."""
    words = ex.context.split(" ")
    offsets, pos = [], 0
    for word in words:
        offsets.append(pos)
        pos += len(word) + 1
    first = max(i for i, start in enumerate(offsets) if start <= ex.answer_start)
    end_char = ex.answer_start + len(ex.response)
    last = max(i for i, start in enumerate(offsets) if start < end_char)

    def window_prompt(extra: int) -> str:
        lo, hi = max(0, first - extra), min(len(words), last + 1 + extra)
        return ex.prompt.replace(ex.context, " ".join(words[lo:hi]), 1)

    lo, hi, best = 0, len(words), None
    while lo <= hi:  # binary search on the number of words kept on each side of the answer
        mid = (lo + hi) // 2
        prompt = window_prompt(mid)
        if len(encode_conversation(tokens, prompt, ex.response, system, (), template)[0]) <= budget:
            best, lo = prompt, mid + 1
        else:
            hi = mid - 1
    return best


def padded_length(length: int, sequence_length: int) -> int:
    """Rounds a length up to the bucket grid, capped at sequence_length (0: no cap)."""
    bucketed = int(math.ceil(length / LENGTH_BUCKET) * LENGTH_BUCKET)
    return min(bucketed, sequence_length) if sequence_length else bucketed


def batch_width(data: TokenizedSet, indices) -> int:
    """The width make_batch pads these rows to by default: their longest, rounded up to the
    LENGTH_BUCKET grid (few shapes, few compiles), capped at data.sequence_length."""
    return padded_length(int(np.max(data.lengths[data.rows_of(indices)])), data.sequence_length)


def make_batch(data: TokenizedSet, indices, num_targets: int, pad_id: int = 0, width: int | None = None) -> dict:
    """Pads the chosen rows into one batch: the training step's input.

    Args:
        num_targets: K, the loss positions a row (data.num_targets: compute it once per set).
        width: S, the padded width; default batch_width(data, indices). A fixed width gives every
            batch one shape (the validation batches: one compile).

    Returns numpy arrays: token_ids (int32) and padding_mask (bool) (B, S); target_positions,
    target_ids (int32) and target_weights (float32) (B, K), where position p predicts
    target_ids at token p + 1. For preference pairs `indices` picks pairs and B is twice their
    number (chosen rows, then rejected rows); with precomputed reference log-probs the batch
    carries them too (reference_logps, (B,) float32).
    """
    rows_ids, rows_weights = data.ids, data.weights
    width = batch_width(data, indices) if width is None else width
    indices = data.rows_of(indices)
    rows = [rows_ids[i] for i in indices]
    if max(len(r) for r in rows) > width:
        raise KerasftError(f"a row of {max(len(r) for r in rows)} tokens does not fit a batch {width} wide")
    batch = len(rows)
    token_ids = np.full((batch, width), pad_id, dtype=np.int32)
    padding_mask = np.zeros((batch, width), dtype=bool)
    positions = np.zeros((batch, num_targets), dtype=np.int32)
    targets = np.zeros((batch, num_targets), dtype=np.int32)
    target_weights = np.zeros((batch, num_targets), dtype=np.float32)
    for row, (i, ids) in enumerate(zip(indices, rows)):
        weights = rows_weights[i]
        token_ids[row, : len(ids)] = ids
        padding_mask[row, : len(ids)] = True
        where = np.flatnonzero(weights)[:num_targets]
        positions[row, : len(where)] = where - 1
        targets[row, : len(where)] = ids[where]
        target_weights[row, : len(where)] = weights[where]
    batch = {
        "token_ids": token_ids,
        "padding_mask": padding_mask,
        "target_positions": positions,
        "target_ids": targets,
        "target_weights": target_weights,
    }
    if data.reference_logps is not None:
        batch["reference_logps"] = np.asarray(data.reference_logps, dtype=np.float32)[indices]
    return batch


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """A fresh, reproducible permutation for each epoch."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def epoch_batches(data: TokenizedSet, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch as index arrays, a pure function of (data, seed, epoch).

    With `data.group_by_length`, rows are sorted by length inside windows of SORT_WINDOW
    batches and the batches then shuffled: less padding, and still a different mix each epoch.
    A short last batch is filled from the start of the same epoch's order, keeping one batch
    shape (one compilation) while every example is still seen each epoch.
    """
    order = epoch_order(data.num_examples, seed, epoch)
    if data.group_by_length:
        lengths = data.example_lengths
        window = batch_size * SORT_WINDOW
        order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                for chunk in np.array_split(order, max(1, math.ceil(len(order) / window)))])
    batches = []
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        if len(indices) < batch_size:
            indices = np.concatenate([indices, np.resize(order, batch_size - len(indices))])
        batches.append(indices)
    if data.group_by_length:
        shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
        batches = [batches[i] for i in shuffle]
    return batches


def padding_fraction(data: TokenizedSet, batch_size: int, seed: int = 0) -> float:
    """The share of padding in the batches of one epoch, at the widths make_batch pads them to
    (what bucketing and packing save)."""
    lengths = data.lengths
    real = padded = 0
    for indices in epoch_batches(data, batch_size, seed, 0):
        width = batch_width(data, indices)
        rows = data.rows_of(indices)
        real += int(lengths[rows].sum())
        padded += width * len(rows)
    return 1.0 - real / padded if padded else 0.0
