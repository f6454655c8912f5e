"""Vocabulary expansion for Gemma: measure how a tokenizer splits words, add whole-word pieces to
its SentencePiece model, and grow the tied embedding to match.

keras-hub has no API to add tokens or resize embeddings, so `add_words` edits the ModelProto
itself, builds a new backbone with the larger `vocabulary_size` from the old config, copies every
weight and fills the new rows (the mean embedding, or the mean of the word's old sub-tokens).

Pieces are added as they appear in running text: Gemma's tokenizer adds no dummy prefix and
escapes spaces as U+2581, so the word "cierzo" becomes the piece "▁cierzo" (" cierzo" in text).
A word at the very start of a text, with no space before it, still splits into old pieces.

Two piece types:
    user_defined: one piece per word, matched greedily before BPE wherever "▁word" occurs, also
        as the start of a longer word: "▁cierzos" -> "▁cierzo" "s", but also "▁mañana" ->
        "▁maña" "na", which splits a common word into a wrong piece. The Hugging Face export marks
        them normalized added tokens so transformers matches them the same way.
    normal (the default): BPE pieces. SentencePiece's BPE only reaches a piece through a chain of merges whose
        results are all pieces, so each word also brings the missing prefixes of that chain. They
        score below every existing piece, so every old merge still happens first and old words keep
        their segmentation up to the new merges; `kerasft vocab check --add` shows what changed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from pathlib import Path

import numpy as np

from kerasft.config import load_config, ModelConfig
from kerasft.errors import KerasftError
from kerasft.models.families import model_family
from kerasft.models.presets import cache_dir, load_tokenizer, resolve_preset
from kerasft.paths import staged_dir
from kerasft.runtime import init_backend, tokenizer_logs_quiet

SPACE = "\u2581"  # SentencePiece's escaped space
VOCAB_FILE = "kerasft_vocab.json"  # written into a preset by add_words: which rows are new
PIECE_TYPES = ("user_defined", "normal")
INITS = ("mean", "subtokens")
_NORMAL, _USER_DEFINED = 1, 4
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")  # letters, with inner apostrophes or hyphens


def read_word_list(path: str | Path) -> list[str]:
    """Words to add, one per line; blank lines and lines starting with # are skipped.

    Raises KerasftError (naming the file and line) for a missing file, an empty list, a word with
    whitespace inside, or a word listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise KerasftError(f"{path}: word list not found")
    words, seen = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if any(ch.isspace() or ch == SPACE for ch in word):
            raise KerasftError(f"{path}: line {number}: {word!r} has whitespace inside; put one word per line")
        if word in seen:
            raise KerasftError(f"{path}: line {number}: {word!r} is already listed on line {seen[word]}")
        seen[word] = number
        words.append(word)
    if not words:
        raise KerasftError(f"{path}: the word list is empty")
    return words


def corpus_words(path: str | Path) -> list[str]:
    """Every word (run of letters) of a text file, in order, with repeats."""
    path = Path(path)
    if not path.is_file():
        raise KerasftError(f"{path}: corpus file not found")
    words = _WORD.findall(path.read_text(encoding="utf-8"))
    if not words:
        raise KerasftError(f"{path}: no words in the corpus")
    return words


def processor(proto: bytes):
    """A sentencepiece processor for a serialized ModelProto."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=proto)


def word_ids(sp, word: str) -> list[int]:
    """Ids of a word as it occurs in running text (after a space)."""
    return sp.encode(" " + word)


def expand_proto(proto: bytes, words, piece_type: str = "normal", source: str = "words") -> tuple[bytes, list[dict]]:
    """Adds one piece per word (plus BPE chain pieces for normal pieces) to a SentencePiece model.

    Args:
        proto: the serialized ModelProto.
        words: words to add (see read_word_list).
        piece_type: user_defined or normal.
        source: names the word list in error messages.

    Returns:
        The new serialized proto and one record per added piece: {"piece", "id", "word", "text"},
        where "word" is the listed word a chain piece serves and "text" the piece as plain text.
        Every listed word is checked to encode as one token alone and inside a sentence.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    if piece_type not in PIECE_TYPES:
        raise KerasftError(f"piece type must be one of {', '.join(PIECE_TYPES)}, got {piece_type!r}")
    words = list(words)
    if not words:
        raise KerasftError(f"{source}: the word list is empty")
    model = sp_pb2.ModelProto()
    model.ParseFromString(proto)
    old = processor(proto)
    vocab = {piece.piece: index for index, piece in enumerate(model.pieces)}
    for word in words:
        if any(ch.isspace() or ch == SPACE for ch in word):
            raise KerasftError(f"{source}: {word!r} has whitespace inside; add one word per piece")
        normalized = old.normalize(unicodedata.normalize("NFC", word))
        if normalized != word:
            raise KerasftError(f"{source}: {word!r} would be normalised to {normalized!r} before tokenisation, so "
                               "the piece would never match; write it as the normaliser leaves it (NFC)")
        if SPACE + word in vocab:
            raise KerasftError(f"{source}: {word!r} is already one piece of the vocabulary "
                               f"({SPACE + word!r}, id {vocab[SPACE + word]})")
    if len(set(words)) != len(words):
        twice = next(w for w in words if words.count(w) > 1)
        raise KerasftError(f"{source}: {twice!r} is listed twice")

    added: list[dict] = []

    def add(piece: str, word: str, score: float, piece_type_id: int):
        vocab[piece] = len(model.pieces)
        model.pieces.add(piece=piece, score=score, type=piece_type_id)
        added.append({"piece": piece, "id": vocab[piece], "word": word, "text": piece.replace(SPACE, " ")})

    if piece_type == "user_defined":
        for word in words:
            add(SPACE + word, word, 0.0, _USER_DEFINED)
    else:
        scores = [p.score for p in model.pieces if p.type == _NORMAL]
        score = (min(scores) if scores else 0.0) - 1.0
        for word in words:
            # Merge the first two tokens of the current encoding until the word is one piece; each
            # new piece scores below all others, so it applies only after every older merge.
            for _ in range(len(word) + 1):
                current = processor(_serialize(model))
                pieces = current.encode(" " + word, out_type=str)
                if len(pieces) == 1:
                    break
                merged = pieces[0] + pieces[1]
                if merged in vocab:  # cannot happen after a finished BPE pass; guard against a loop
                    raise KerasftError(f"{source}: cannot make {word!r} one BPE piece ({pieces})")
                add(merged, word, score, _NORMAL)
                score -= 1.0
    model.trainer_spec.vocab_size = len(model.pieces)
    new_proto = _serialize(model)
    check = processor(new_proto)
    for word in words:
        for text in (" " + word, f"la {word} y"):
            pieces = check.encode(text, out_type=str)
            if SPACE + word not in pieces:
                raise KerasftError(f"{source}: {word!r} does not encode as one token in {text!r} ({pieces})")
    return new_proto, added


def _serialize(model) -> bytes:
    return model.SerializeToString()


def segmentation_stats(sp, words, top: int = 10) -> dict:
    """Tokens per word and per character of `words` (as in running text) and the most fragmented."""
    counts = [len(word_ids(sp, word)) for word in words]
    chars = sum(len(word) for word in words)
    distinct = {}
    for word, count in zip(words, counts):
        distinct[word] = count
    worst = sorted(distinct.items(), key=lambda item: (-item[1], item[0]))[:top]
    return {
        "words": len(words),
        "distinct_words": len(distinct),
        "tokens": sum(counts),
        "tokens_per_word": round(sum(counts) / len(words), 4),
        "tokens_per_char": round(sum(counts) / chars, 4),
        "single_token_words": round(sum(1 for c in counts if c == 1) / len(counts), 4),
        "most_fragmented": [{"word": w, "tokens": c, "pieces": sp.encode(" " + w, out_type=str)} for w, c in worst],
    }


def check_vocab(proto: bytes, words, add_words_list=None, piece_type: str = "normal", top: int = 10,
                add_source: str = "--add") -> dict:
    """Segmentation statistics of `words` before (and, with `add_words_list`, after) an expansion.

    Returns:
        {"before": stats, "after": stats | None, "added_pieces": n, "changed_words": [...]}:
        changed_words are words not in the add list whose segmentation the expansion changes.
    """
    before_sp = processor(proto)
    report = {"piece_type": piece_type, "vocabulary_size": before_sp.get_piece_size(),
              "before": segmentation_stats(before_sp, words, top), "after": None}
    if add_words_list:
        new_proto, added = expand_proto(proto, add_words_list, piece_type, source=add_source)
        after_sp = processor(new_proto)
        listed = set(add_words_list)
        changed = sorted({w for w in set(words) - listed
                          if before_sp.encode(" " + w) != after_sp.encode(" " + w)})
        report.update(after=segmentation_stats(after_sp, words, top), added_pieces=len(added),
                      new_vocabulary_size=after_sp.get_piece_size(), changed_words=changed[:50],
                      changed_word_count=len(changed))
    return report


def format_check(report: dict) -> str:
    """A short text table of check_vocab's report."""
    rows = [("", "before") + (("after",) if report["after"] else ())]
    for key in ("vocabulary_size", "tokens_per_word", "tokens_per_char", "single_token_words", "tokens"):
        if key == "vocabulary_size":
            rows.append((key, str(report["vocabulary_size"]))
                        + ((str(report["new_vocabulary_size"]),) if report["after"] else ()))
            continue
        rows.append((key, str(report["before"][key])) + ((str(report["after"][key]),) if report["after"] else ()))
    width = max(len(r[0]) for r in rows)
    lines = ["  ".join([r[0].ljust(width), *(c.rjust(10) for c in r[1:])]) for r in rows]
    lines.append(f"words: {report['before']['words']} ({report['before']['distinct_words']} distinct)")
    lines.append("most fragmented before: " + ", ".join(
        f"{item['word']} ({item['tokens']})" for item in report["before"]["most_fragmented"]))
    if report["after"]:
        lines.append("most fragmented after:  " + ", ".join(
            f"{item['word']} ({item['tokens']})" for item in report["after"]["most_fragmented"]))
        lines.append(f"added pieces: {report['added_pieces']} ({report['piece_type']}); other words whose "
                     f"segmentation changed: {report['changed_word_count']}"
                     + (f" (e.g. {', '.join(report['changed_words'][:8])})" if report["changed_words"] else ""))
    return "\n".join(lines)


def read_proto(preset: str, cache: str = "") -> bytes:
    """The SentencePiece model of any preset string (a keras-hub or Hugging Face folder, a .gguf
    file, embedded, ...); vocabulary expansion works on SentencePiece models only."""
    tokenizer = load_tokenizer(ModelConfig(preset=preset, cache_dir=cache))
    if not getattr(tokenizer, "proto", None):
        raise KerasftError(f"{preset}: the tokenizer is not SentencePiece; kerasft needs a Gemma tokenizer")
    return tokenizer.proto


def check(source: str, *, words_file=None, corpus_file=None, add_file=None, piece_type: str = "normal",
          top: int = 10) -> dict:
    """`kerasft vocab check`: SOURCE is a YAML config (its model.preset) or a preset string."""
    if bool(words_file) == bool(corpus_file):
        raise KerasftError("vocab check: give exactly one of --words FILE or --corpus FILE")
    preset, cache = source, ""
    if source.endswith((".yaml", ".yml")):

        cfg = load_config(source)
        preset, cache = cfg.model.preset, cfg.model.cache_dir
    words = read_word_list(words_file) if words_file else corpus_words(corpus_file)
    add_list = read_word_list(add_file) if add_file else None
    return check_vocab(read_proto(preset, cache), words, add_list, piece_type, top, add_source=str(add_file))


def add_words(src: str, words_file, out_dir, *, init: str = "mean", piece_type: str = "normal",
              overwrite: bool = False, cache: str = "") -> dict:
    """`kerasft vocab add`: a new keras-hub preset with the listed words as single pieces.

    The tied embedding grows by one row per added piece; new rows start at the mean embedding
    (init="mean") or at the mean of the rows the word split into before (init="subtokens").
    The preset is built beside `out_dir` and renamed into place. It records the added pieces
    in kerasft_vocab.json, which `lora.train_new_tokens` reads.

    Returns:
        The record written to kerasft_vocab.json.
    """
    if init not in INITS:
        raise KerasftError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise KerasftError(f"{out}: already exists; pass --overwrite to replace it")
    words = read_word_list(words_file)
    path = resolve_preset(src, cache_dir(cache))
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if config.get("model_type") == "llama" or config.get("class_name") in ("LlamaBackbone", "Llama3Backbone"):
        # Llama 2's untied head would need its rows grown too; Llama 3's vocabulary is not SentencePiece.
        raise KerasftError(f"{src}: a Llama model: kerasft vocab add supports Gemma models only")
    old_proto = read_proto(path)
    new_proto, added = expand_proto(old_proto, words, piece_type, source=str(words_file))

    init_backend()
    import keras_hub

    try:
        backbone = keras_hub.models.Backbone.from_preset(path, dtype="float32")
        with tokenizer_logs_quiet():
            tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(path)
    except Exception as err:  # keras-hub raises many types; one line for the user
        raise KerasftError(f"{src}: could not load model: {(str(err).strip().splitlines() or [type(err).__name__])[0]}") from err
    family = model_family(backbone)
    if family is None or family.startswith("llama"):
        raise KerasftError(f"{src}: {type(backbone).__name__}: kerasft vocab add supports Gemma models only")
    old_size = int(backbone.vocabulary_size)
    if processor(old_proto).get_piece_size() != old_size:
        raise KerasftError(f"{src}: the tokenizer has {processor(old_proto).get_piece_size()} pieces but the "
                           f"embedding has {old_size} rows; kerasft resizes only matching pairs")
    table = np.asarray(backbone.token_embedding.embeddings.numpy(), dtype=np.float32)
    old_sp = processor(old_proto)
    mean_row = table.astype(np.float64).mean(axis=0)
    new_rows = []
    for record in added:
        ids = old_sp.encode(record["text"])
        record["init_from"] = [int(i) for i in ids] if init == "subtokens" else "mean"
        new_rows.append(table[ids].astype(np.float64).mean(axis=0) if init == "subtokens" else mean_row)
    new_table = np.concatenate([table, np.asarray(new_rows, dtype=np.float32)], axis=0)

    config = backbone.get_config()
    config["vocabulary_size"] = int(new_table.shape[0])
    grown = type(backbone).from_config(config)
    old_weights = {v.path: v for v in backbone.weights}
    embedding_path = backbone.token_embedding.embeddings.path
    for variable in grown.weights:
        if variable.path == embedding_path:
            variable.assign(new_table)
            continue
        if variable.path not in old_weights or tuple(old_weights[variable.path].shape) != tuple(variable.shape):
            raise KerasftError(f"{src}: rebuilding the backbone changed weight {variable.path}; cannot copy it")
        variable.assign(old_weights[variable.path].numpy())

    tokenizer_config = {**tokenizer.get_config(), "proto": new_proto}
    tokenizer_config.pop("config_file", None)
    new_tokenizer = type(tokenizer).from_config(tokenizer_config)
    if family == "gemma3":
        preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer=new_tokenizer)
    else:
        preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer=new_tokenizer)
    record = {
        "format": "kerasft-vocab-v1",
        "base_model": src,
        "piece_type": piece_type,
        "init": init,
        "old_vocabulary_size": old_size,
        "vocabulary_size": int(new_table.shape[0]),
        "words": words,
        "added": added,
    }
    with staged_dir(out, overwrite) as staging:
        grown.save_to_preset(str(staging))
        preprocessor.save_to_preset(str(staging))
        (staging / VOCAB_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return record


def added_pieces(preset_path: str | Path) -> list[str]:
    """The pieces `add_words` added to a preset (its kerasft_vocab.json); an error if it has none."""
    path = Path(preset_path) / VOCAB_FILE
    if not path.is_file():
        raise KerasftError(f"lora.train_new_tokens: {preset_path} has no {VOCAB_FILE}; make the preset with "
                           "`kerasft vocab add` or turn train_new_tokens off")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KerasftError(f"{path}: line {err.lineno}: invalid JSON: {err.msg}") from None
    return [item["piece"] for item in record.get("added", [])]


def hf_word_pieces(proto: bytes) -> dict:
    """tokenizer_config.json entries that make transformers match user-defined word pieces.

    transformers turns SentencePiece's user-defined pieces into added tokens matched against the
    raw text, where "▁cierzo" never occurs (the text has " cierzo"). Listed in
    added_tokens_decoder as normalized tokens, they are matched after spaces become "▁", as
    SentencePiece does. Returns {} when the vocabulary has no such piece.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    model.ParseFromString(proto)
    entries = {
        str(index): {"content": piece.piece, "lstrip": False, "normalized": True, "rstrip": False,
                     "single_word": False, "special": False}
        for index, piece in enumerate(model.pieces)
        if piece.type == _USER_DEFINED and SPACE in piece.piece and piece.piece.strip(SPACE)
    }
    return {"added_tokens_decoder": entries} if entries else {}


def with_new_tokens(cfg, preset_path):
    """The run config with the preset's added pieces appended to lora.trainable_tokens.

    A preset that `kerasft vocab add` did not make has no added pieces: the run says so and
    trains lora.trainable_tokens only (so one config serves the expanded model and the base).
    """
    if not (Path(preset_path) / VOCAB_FILE).is_file():
        print(f"note: lora.train_new_tokens: {preset_path} has no {VOCAB_FILE} (not made by `kerasft vocab add`); "
              "no added rows to train", flush=True)
        return cfg
    pieces = [p for p in added_pieces(preset_path) if p not in cfg.lora.trainable_tokens]
    print(f"training the embedding rows of {len(pieces)} added pieces (lora.train_new_tokens)", flush=True)
    lora = dataclasses.replace(cfg.lora, trainable_tokens=(*cfg.lora.trainable_tokens, *pieces))
    return dataclasses.replace(cfg, lora=lora)
