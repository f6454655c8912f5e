"""From the configured sources to reproducible train / validation / test splits:
read -> clean -> de-duplicate -> split (stratified, seeded) -> augment (train only) -> write.

`build_datasets(cfg.data)` is the one entry point; the training run, `kerasft data inspect`
and the UI call it. Stdlib only.
"""

from __future__ import annotations

import html
import json
import random
import re
import sys
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

from kerasft.data.records import Example, RecordError
from kerasft.data.sources import iter_source, read_source, source_identity, SourceResult
from kerasft.errors import KerasftError

SPLITS = ("train", "validation", "test")


@dataclass
class DataSplits:
    """Examples of each split and a report of what happened to the records on the way."""

    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    report: dict = field(default_factory=dict)

    @property
    def eval(self) -> list[Example]:
        """The held-out examples evaluation scores: test, or validation when there is no test."""
        return self.test or self.validation

    def held_out(self, split: str = "") -> list[Example]:
        """The examples of eval.split: "" is `eval`; "test" / "validation" that split, which must exist."""
        if not split:
            return self.eval
        examples = getattr(self, split)
        if not examples:
            source = "data.eval" if split == "test" else "data.validation"
            raise KerasftError(f"eval.split: {split}: this data has no {split} split (set {source} or data.split.ratios)")
        return examples


def build_datasets(cfg, *, need_train: bool = True, need_eval: bool = True) -> DataSplits:
    """Reads, cleans, de-duplicates, splits and augments the configured data.

    Args:
        cfg: kerasft.config.DataConfig.
        need_train / need_eval: which sources must be present (e.g. `kerasft eval` needs no
            training data unless the held-out split is cut from it).

    Raises KerasftError on the first bad record (data.on_error=raise) or when a needed source
    is missing; with on_error=skip bad records are listed in `report["skipped"]`.
    """
    splitting = bool(cfg.split.ratios)
    if splitting and len(cfg.split.ratios) == 3 and cfg.eval:
        raise KerasftError("data.split.ratios has a test share and data.eval is set too: use one of them")
    if (need_train or (need_eval and splitting)) and not cfg.train:
        raise KerasftError("data.train: no training data configured")
    if need_eval and not splitting and not cfg.eval and not cfg.validation:
        raise KerasftError("data.eval: no held-out data configured (set data.eval or data.split.ratios)")
    report: dict = {"sources": {}, "skipped": [], "cleaning": {}, "duplicates_removed": [], "augmented": 0}
    splits = DataSplits(report=report)
    if cfg.task == "pretrain":
        unsupported = [name for name, on in (("split.ratios", splitting), ("clean.dedup", cfg.clean.dedup != "none"),
                                            ("augment.enabled", cfg.augment.enabled)) if on]
        if unsupported:
            raise KerasftError(f"data.{unsupported[0]}: not available for task=pretrain, whose corpus is streamed "
                               f"once; split or de-duplicate the text files beforehand")
        if cfg.train and need_train:
            splits.train = Corpus(cfg.train, cfg)
            report["sources"]["train"] = {"source": cfg.train, "streamed": True}

    def read(role: str, spec: str) -> list[Example]:
        result: SourceResult = read_source(spec, cfg)
        report["sources"][role] = {"source": spec, "records": len(result.examples) + len(result.skipped),
                                   "skipped": len(result.skipped)}
        report["skipped"].extend({"source": spec, **item} for item in result.skipped)
        return clean_examples(result.examples, cfg.clean, report)

    if cfg.train and (need_train or splitting) and cfg.task != "pretrain":
        train = dedup(read("train", cfg.train), cfg.clean.dedup, report)
        if splitting:
            parts = split_examples(train, cfg.split.ratios, cfg.split.stratify, cfg.split.seed)
            splits.train, splits.validation = parts[0], parts[1]
            splits.test = parts[2] if len(parts) == 3 else []
        else:
            splits.train = train
    if cfg.validation and (need_train or need_eval):
        splits.validation = read("validation", cfg.validation)
    if cfg.eval and need_eval:
        splits.test = read("eval", cfg.eval)
    if splits.train and (splits.validation or splits.test):
        _check_disjoint(splits, report)
    if cfg.augment.enabled and splits.train:
        added = augment_examples(splits.train, cfg.augment)
        report["augmented"] = len(added)
        splits.train = splits.train + added
    report["counts"] = {name: len(getattr(splits, name)) for name in SPLITS
                        if not isinstance(getattr(splits, name), Corpus)}
    if report["skipped"]:
        print(f"warning: skipped {len(report['skipped'])} bad records (data.on_error=skip), first: "
              f"{report['skipped'][0]['error']}", file=sys.stderr)
    return splits


def write_splits(splits: DataSplits, folder: str | Path) -> None:
    """Writes each split as JSONL (readable again as a data source) plus report.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        examples = getattr(splits, name)
        if isinstance(examples, Corpus):  # a streamed corpus is named, not copied
            (folder / f"{name}.source.json").write_text(json.dumps(
                {"source": examples.spec, "identity": examples.identity}) + "\n")
        elif examples:
            lines = (json.dumps(ex.to_json(), ensure_ascii=False) for ex in examples)
            (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "report.json").write_text(json.dumps(splits.report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


class Corpus:
    """A raw-text source for task=pretrain, read lazily document by document each time it is
    iterated (cleaned; bad records raised or skipped per data.on_error), so it never has to
    fit in memory. `count` and `skipped` describe the last complete pass."""

    def __init__(self, spec: str, cfg):
        self.spec, self.cfg = spec, cfg
        self.identity = source_identity(spec) + json.dumps([cfg.text_unit, cfg.separator, cfg.encoding,
                                                             cfg.clean.strip_html, cfg.clean.unicode_nfc,
                                                             cfg.clean.whitespace])
        self.count, self.skipped = 0, []

    def __iter__(self):
        count, skipped = 0, []
        for item in iter_source(self.spec, self.cfg):
            if isinstance(item, RecordError):
                if self.cfg.on_error != "skip":
                    raise item
                skipped.append({"source": self.spec, "error": str(item)})
                continue
            count += 1
            yield replace(item, response=clean_text(item.response, self.cfg.clean))
        if not count:
            raise KerasftError(f"{self.spec}: no documents found")
        self.count, self.skipped = count, skipped

    def __bool__(self) -> bool:
        return True


# --- cleaning -------------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]+>")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str, clean) -> str:
    """Applies the configured cleaning to one text (CleanConfig: strip_html, unicode_nfc, whitespace)."""
    if clean.strip_html:
        text = html.unescape(_TAG.sub(" ", text))
    if clean.unicode_nfc:
        text = unicodedata.normalize("NFC", text)
    if clean.whitespace:
        text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").split("\n"))
        text = _BLANK_LINES.sub("\n\n", text).strip()
    return text


def clean_examples(examples: list[Example], clean, report: dict) -> list[Example]:
    """Cleans every text field; a QA answer is looked up again in its cleaned context."""
    if not (clean.strip_html or clean.unicode_nfc or clean.whitespace):
        return examples
    out, changed = [], 0
    for ex in examples:
        c = lambda t: clean_text(t, clean)  # noqa: E731
        context, response = c(ex.context), c(ex.response)
        start = ex.answer_start
        if ex.context and ex.answerable:
            if context != ex.context or response != ex.response:
                start = context.find(response)
                if start < 0:
                    raise RecordError(f"{ex.origin} (id {ex.id}): answer {response!r} is not in the context after cleaning")
        new = replace(ex, prompt=c(ex.prompt), response=response, answers=tuple(c(a) for a in ex.answers),
                      context=context, answer_start=start, system=c(ex.system),
                      history=tuple((c(u), c(a)) for u, a in ex.history))
        changed += new != ex
        out.append(new)
    report["cleaning"]["changed"] = report["cleaning"].get("changed", 0) + changed
    return out


# --- de-duplication -------------------------------------------------------------------------

def normalized_key(text: str) -> str:
    """Lowercase, accents and punctuation removed, whitespace collapsed: `¿Dónde?` == `donde`."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text)
    return " ".join(text.split())


def dedup(examples: list[Example], mode: str, report: dict) -> list[Example]:
    """Keeps the first of examples with the same (prompt, response): exactly, or normalised."""
    if mode == "none":
        return examples
    key = (lambda t: t) if mode == "exact" else normalized_key
    seen: dict = {}
    kept = []
    for ex in examples:
        k = (key(ex.system), tuple(map(key, sum(ex.history, ()))), key(ex.prompt), key(ex.response))
        if k in seen:
            report["duplicates_removed"].append({"id": ex.id, "origin": ex.origin, "duplicate_of": seen[k]})
            continue
        seen[k] = ex.id
        kept.append(ex)
    return kept


def _check_disjoint(splits: DataSplits, report: dict) -> None:
    """Warns (in the report and on stderr) when held-out prompts also appear in training."""
    train = {normalized_key(ex.prompt) for ex in splits.train}
    overlap = [ex.id for ex in splits.validation + splits.test if normalized_key(ex.prompt) in train]
    if overlap:
        report["heldout_in_train"] = overlap
        print(f"warning: {len(overlap)} held-out examples also appear in the training data (first: {overlap[0]})",
              file=sys.stderr)


# --- splits ---------------------------------------------------------------------------------

def split_examples(examples: list[Example], ratios, stratify: str = "", seed: int = 0) -> list[list[Example]]:
    """Seeded split by ratio; with `stratify`, each value of that metadata column is split by
    the same ratios (largest-remainder rounding), so every split keeps its proportions."""
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        if stratify and stratify not in ex.meta:
            raise KerasftError(f"data.split.stratify: {ex.origin} (id {ex.id}) has no {stratify!r} column "
                               f"(add it to data.columns.meta)")
        groups.setdefault(ex.meta.get(stratify, "") if stratify else "", []).append(i)
    parts: list[list[int]] = [[] for _ in ratios]
    rng = random.Random(seed)
    for value in sorted(groups):
        members = groups[value][:]
        rng.shuffle(members)
        exact = [r * len(members) for r in ratios]
        counts = [int(x) for x in exact]
        for k in sorted(range(len(ratios)), key=lambda k: counts[k] - exact[k])[: len(members) - sum(counts)]:
            counts[k] += 1
        start = 0
        for k, count in enumerate(counts):
            parts[k].extend(members[start : start + count])
            start += count
    return [[examples[i] for i in sorted(part)] for part in parts]


# --- augmentation ---------------------------------------------------------------------------

def load_synonyms(path: str) -> dict[str, list[str]]:
    """A synonym table: JSON {word: [synonyms]} or TSV lines `word<TAB>syn1,syn2`."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise KerasftError(f"{file}: synonym table not found (data.augment.synonyms)")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() == ".json":
        try:
            table = json.loads(text)
        except json.JSONDecodeError as err:
            raise KerasftError(f"{file}: line {err.lineno}: invalid JSON: {err.msg}") from None
        if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
            raise KerasftError(f"{file}: expected an object of word -> list of synonyms")
        return {k.lower(): [str(s) for s in v] for k, v in table.items()}
    table = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        word, tab, synonyms = line.partition("\t")
        if not tab or not synonyms.strip():
            raise KerasftError(f"{file}: line {n}: expected 'word<TAB>synonym, synonym'")
        table[word.strip().lower()] = [s.strip() for s in synonyms.split(",") if s.strip()]
    return table


def augment_examples(examples: list[Example], cfg) -> list[Example]:
    """`cfg.copies` noisy variants of each example's prompt (the question only, for QA: the
    context and the response stay exact), seeded. Ops: insert, delete, swap, synonym."""
    unknown = set(cfg.ops) - {"insert", "delete", "swap", "synonym"}
    if unknown:
        raise KerasftError(f"data.augment.ops: unknown {sorted(unknown)}; use insert, delete, swap, synonym")
    synonyms = load_synonyms(cfg.synonyms)
    if "synonym" in cfg.ops and not synonyms and cfg.ops == ("synonym",):
        raise KerasftError("data.augment.ops is [synonym] but data.augment.synonyms names no table")
    rng = random.Random(cfg.seed)
    added = []
    for ex in examples:
        head, tail = _editable_part(ex)
        for copy in range(cfg.copies):
            words = tail.split(" ")
            for op in cfg.ops:
                words = _OPS[op](words, cfg.rate, rng, synonyms)
            variant = " ".join(words)
            if variant != tail:
                added.append(replace(ex, id=f"{ex.id}-aug{copy + 1}", prompt=head + variant,
                                     origin=f"{ex.origin} (augmented)"))
    return added


def _editable_part(ex: Example) -> tuple[str, str]:
    """Splits the prompt into a fixed head and the part noise may touch (after the QA context
    and its label word, e.g. 'Pregunta:')."""
    if ex.context and ex.context in ex.prompt:
        head, _, tail = ex.prompt.rpartition(ex.context)
        label, space, question = tail.partition(": ")
        if space:
            return head + ex.context + label + space, question
        return head + ex.context, tail
    return "", ex.prompt


def _insert(words, rate, rng, synonyms):
    words = words[:]
    for _ in range(max(1, round(rate * len(words)))):
        source = rng.choice(words)
        options = synonyms.get(source.lower().strip("¿?¡!.,;:"), [source])
        words.insert(rng.randrange(len(words) + 1), rng.choice(options))
    return words


def _delete(words, rate, rng, synonyms):
    kept = [w for w in words if rng.random() >= rate]
    return kept or [rng.choice(words)]


def _swap(words, rate, rng, synonyms):
    words = words[:]
    if len(words) > 1:
        for _ in range(max(1, round(rate * len(words)))):
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
    return words


def _synonym(words, rate, rng, synonyms):
    out = []
    for word in words:
        core = word.strip("¿?¡!.,;:")
        options = synonyms.get(core.lower())
        if options and rng.random() < max(rate, 0.5):
            out.append(word.replace(core, rng.choice(options)))
        else:
            out.append(word)
    return out


_OPS = {"insert": _insert, "delete": _delete, "swap": _swap, "synonym": _synonym}
