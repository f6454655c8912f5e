"""Chat templates: one set of functions for training, evaluation, generation and export.

Rendered text of one turn (what the exported tokenizer's chat_template produces):
    gemma   <bos><start_of_turn>user\n{system\n\n}{prompt}<end_of_turn>\n<start_of_turn>model\n{response}<end_of_turn>\n
    llama3  <|begin_of_text|>{<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>}
            <|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{response}<|eot_id|>
    zephyr  <s>{<|system|>\n{system}</s>\n}<|user|>\n{prompt}</s>\n<|assistant|>\n{response}</s>\n   (TinyLlama-Chat)
    plain   <bos>{system\n\n}### Instruction:\n{prompt}\n\n### Response:\n{response}<eos>
The template is chosen from the model's tokenizer ("auto"; kerasft.models.families) unless
data.template names one. Token ids are built piece by piece with the special tokens inserted as
ids, so they are single tokens whatever the tokenizer does with their text, and the
prompt/response boundary is exactly where generation starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kerasft.errors import KerasftError
from kerasft.models.families import tokenizer_kind

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"

TEMPLATES = ("auto", "gemma", "llama3", "zephyr", "plain")
PLAIN_USER = "### Instruction:\n"
PLAIN_MODEL = "\n\n### Response:\n"

# Llama 3's pre-tokenizer split (tokenizer.json of every Llama 3 release).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Hugging Face chat_template (jinja) of each template, written into exported tokenizers; each
# renders exactly like render_chat (tests compare them through transformers' apply_chat_template).
HF_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

HF_PLAIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\\n\\n' }}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ ('' if loop.first else '\\n\\n') + '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

HF_LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# TinyLlama-Chat's template with the bos written out (as Gemma's is), so apply_chat_template's
# text carries every token the model sees.
HF_ZEPHYR_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_HF_TEMPLATES = {"gemma": HF_CHAT_TEMPLATE, "plain": HF_PLAIN_TEMPLATE, "llama3": HF_LLAMA3_TEMPLATE,
                 "zephyr": HF_ZEPHYR_TEMPLATE}


def hf_chat_template(template: str = "gemma", tokens: ChatTokens | None = None) -> str:
    """The jinja chat template that renders like `render_chat` for an exported tokenizer."""
    return _HF_TEMPLATES[resolve_template(template, tokens)]


class _SentencePiece:
    """SentencePiece encoding (Gemma, Llama 2, TinyLlama).

    A vocabulary with a dummy-prefix space (Llama 2, TinyLlama) is encoded without it, and the
    templates put the space back only at the start of a text and right after a special token,
    as llama.cpp (and so Ollama) tokenizes a rendered chat: a response that continues the
    prompt's text does not start with a space the model never sees at inference.
    """

    def __init__(self, proto: bytes):
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        model = sp_pb2.ModelProto()
        model.ParseFromString(proto)
        self.space_prefix = " " if model.normalizer_spec.add_dummy_prefix else ""
        model.normalizer_spec.add_dummy_prefix = False
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())
        self.proto = proto

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=0)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def piece_id(self, piece: str) -> int | None:
        token_id = self.sp.piece_to_id(piece)
        return None if token_id == self.sp.unk_id() and piece != self.sp.id_to_piece(token_id) else token_id

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def fingerprint(self) -> bytes:
        return self.sp.serialized_model_proto()


class _BytePair:
    """Byte-level BPE encoding (Llama 3) with Hugging Face's `tokenizers` (a keras-hub
    dependency): the exact algorithm of transformers and llama.cpp, in Rust, off the TF graph."""

    def __init__(self, vocabulary: dict, merges: list, special: list[str]):
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        self.vocabulary = dict(vocabulary)
        self.merges = [" ".join(p) for p in pairs]
        self.special = list(special)
        tokenizer = Tokenizer(models.BPE(vocab=self.vocabulary, merges=pairs, ignore_merges=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens(self.special)
        self.tokenizer = tokenizer

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def piece_id(self, piece: str) -> int | None:
        return self.vocabulary.get(piece)

    def piece(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id)

    def fingerprint(self) -> bytes:
        return self.tokenizer.to_str().encode("utf-8")

    space_prefix = ""


@dataclass(frozen=True)
class ChatTokens:
    """A tokenizer for numpy-side tokenisation plus the ids the templates need.

    template: the model's own chat template ("gemma", "llama3" or "zephyr"), used for "auto".
    special: piece -> id of every template token this vocabulary has.
    """

    encoder: object
    bos: int
    eos: int
    pad: int
    template: str
    special: dict = field(default_factory=dict)

    @property
    def end_of_turn(self) -> int:
        """The id that closes an assistant turn in the model's own template."""
        return {"gemma": self.special.get(END_OF_TURN), "llama3": self.special.get(EOT)}.get(self.template, self.eos)

    @property
    def start_of_turn(self) -> int | None:
        return self.special.get(START_OF_TURN)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((self.end_of_turn, self.eos)))

    @property
    def bos_text(self) -> str:
        return self.encoder.piece(self.bos)

    @property
    def eos_text(self) -> str:
        return self.encoder.piece(self.eos)

    @property
    def sp(self):
        """The SentencePiece processor (SentencePiece vocabularies only)."""
        return self.encoder.sp

    @property
    def space_prefix(self) -> str:
        """" " when the vocabulary starts texts with a dummy-prefix space (Llama 2), else ""."""
        return self.encoder.space_prefix

    def encode(self, text: str) -> list[int]:
        return self.encoder.encode_batch([text])[0] if text else []

    def encode_batch(self, texts: list[str], after_special: bool = False) -> list[list[int]]:
        """Ids of each text; after_special: the texts start a document or follow a special
        token (they get the dummy-prefix space of vocabularies that have one)."""
        if after_special and self.space_prefix:
            texts = [self.space_prefix + t for t in texts]
        return self.encoder.encode_batch(texts) if texts else []

    def decode(self, ids) -> str:
        return self.encoder.decode([int(i) for i in ids])

    def fingerprint(self) -> bytes:
        """Bytes that change whenever the tokenisation would (for data caches)."""
        return self.encoder.fingerprint()


def chat_tokens(tokenizer) -> ChatTokens:
    """Wraps a keras-hub tokenizer (SentencePiece: Gemma, Llama 2, TinyLlama; byte-level BPE:
    Llama 3) for numpy-side tokenisation, and picks the model's chat template from its
    special tokens.

    Raw strings never go through TF ops: keras-hub's tokenizers hit a flaky SentencePieceOp
    resource error inside tf.data.
    """
    if tokenizer_kind(tokenizer) == "sentencepiece":
        encoder = _SentencePiece(tokenizer.proto)
        sp = encoder.sp
        special = {p: encoder.piece_id(p) for p in (START_OF_TURN, END_OF_TURN)}
        special = {p: i for p, i in special.items() if i is not None}
        template = "gemma" if len(special) == 2 else "zephyr"
        return ChatTokens(encoder, sp.bos_id(), sp.eos_id(), max(sp.pad_id(), 0), template, special)
    vocabulary = dict(tokenizer.vocabulary)
    special = [t for t in vocabulary if t.startswith("<|") and t.endswith("|>")]
    encoder = _BytePair(vocabulary, list(tokenizer.merges), special)
    ids = {p: vocabulary[p] for p in (START_HEADER, END_HEADER, EOT) if p in vocabulary}
    if len(ids) != 3:
        missing = [p for p in (START_HEADER, END_HEADER, EOT) if p not in ids]
        raise KerasftError(f"tokenizer has no {missing[0]} token: not a Llama 3 chat vocabulary")
    bos, eos = vocabulary[tokenizer.start_token], vocabulary[tokenizer.end_token]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ChatTokens(encoder, bos, eos, pad, "llama3", ids)


def resolve_template(template: str, tokens: ChatTokens | None) -> str:
    """`template` with "auto" replaced by the model's own; checks that the vocabulary has the
    template's special tokens."""
    if template not in TEMPLATES:
        raise KerasftError(f"data.template: unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    if template == "auto":
        if tokens is None:
            raise KerasftError("data.template: 'auto' needs the model's tokenizer to choose a template")
        return tokens.template
    needs = {"gemma": (START_OF_TURN, END_OF_TURN), "llama3": (START_HEADER, END_HEADER, EOT)}.get(template, ())
    missing = [p for p in needs if tokens is not None and p not in tokens.special]
    if missing:
        raise KerasftError(f"data.template: {template} needs the {missing[0]} token, which this model's vocabulary "
                           f"lacks; use data.template=auto ({tokens.template}) or plain")
    return template


def render_chat(prompt: str, response: str | None = None, system: str = "", history=(), template: str = "auto",
                tokens: ChatTokens | None = None) -> str:
    """The template as text (for display, the server and parity with Hugging Face).

    tokens: the model's ChatTokens, for "auto" (Gemma's template without them) and for the
    bos/eos texts of the plain and zephyr templates (Gemma's <bos>/<eos> otherwise, Llama 2's
    <s>/</s> for zephyr).
    """
    template = resolve_template("gemma" if template == "auto" and tokens is None else template, tokens)
    bos, eos = (tokens.bos_text, tokens.eos_text) if tokens else ({"zephyr": ("<s>", "</s>"),
                                                                   "llama3": ("<|begin_of_text|>", "<|end_of_text|>")}
                                                                  .get(template, ("<bos>", "<eos>")))
    turns = [*history, (prompt, response)]
    if template == "plain":
        text = f"{bos}{system}\n\n" if system else bos
        for n, (user, model) in enumerate(turns):
            text += ("\n\n" if n else "") + f"{PLAIN_USER}{user}{PLAIN_MODEL}"
            if model is not None:
                text += f"{model}{eos}"
        return text
    if template == "llama3":
        text = bos + (f"{START_HEADER}system{END_HEADER}\n\n{system}{EOT}" if system else "")
        for user, model in turns:
            text += f"{START_HEADER}user{END_HEADER}\n\n{user}{EOT}{START_HEADER}assistant{END_HEADER}\n\n"
            if model is not None:
                text += f"{model}{EOT}"
        return text
    if template == "zephyr":
        text = bos + (f"<|system|>\n{system}{eos}\n" if system else "")
        for user, model in turns:
            text += f"<|user|>\n{user}{eos}\n<|assistant|>\n"
            if model is not None:
                text += f"{model}{eos}\n"
        return text
    text = bos
    for n, (user, model) in enumerate(turns):
        if n == 0 and system:
            user = f"{system}\n\n{user}"
        text += f"{START_OF_TURN}user\n{user}{END_OF_TURN}\n{START_OF_TURN}model\n"
        if model is not None:
            text += f"{model}{END_OF_TURN}\n"
    return text


def encode_prompt(tokens: ChatTokens, prompt: str, system: str = "", history=(), template: str = "auto") -> list[int]:
    """Token ids of the rendered prompt, up to where the model's answer starts
    (`<start_of_turn>model\\n` for Gemma); earlier turns of `history` come first."""
    ids, _ = encode_conversation(tokens, prompt, None, system, history, template)
    return ids


def example_prompt_ids(tokens: ChatTokens, example, data_cfg) -> list[int]:
    """The prompt ids of an example exactly as training renders it: its own system prompt or
    the config's, its earlier turns, the configured template. Evaluation and serving use this."""
    return encode_prompt(tokens, example.prompt, example.system or data_cfg.system, example.history,
                         data_cfg.template)


def closing_id(tokens: ChatTokens, template: str = "auto") -> int:
    """The id that ends an assistant turn under `template` (it carries loss and stops generation)."""
    template = resolve_template(template, tokens)
    return {"gemma": tokens.special.get(END_OF_TURN), "llama3": tokens.special.get(EOT)}.get(template, tokens.eos)


def encode_response(tokens: ChatTokens, response: str, template: str = "auto") -> list[int]:
    """Token ids of a response and the token that closes it (it carries loss too)."""
    return tokens.encode(response) + [closing_id(tokens, template)]


def encode_conversation(tokens: ChatTokens, prompt: str, response: str | None, system: str = "", history=(),
                        template: str = "auto", encode=None) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and their loss weights: 1 on every assistant turn and
    the token that closes it, 0 on system and user turns and on the template's own text.

    encode: text -> ids; defaults to the tokenizer (the pipeline passes a batched lookup).
    """
    enc = encode or tokens.encode
    space = tokens.space_prefix

    def opening(text):  # text right after a special token (bos, a turn marker, eos)
        return enc(space + text)

    template = resolve_template(template, tokens)
    close = closing_id(tokens, template)
    ids, weights = [tokens.bos], [0]

    def add(piece, weight=0):
        ids.extend(piece)
        weights.extend([weight] * len(piece))

    special = tokens.special
    if template == "llama3":
        header = [special[START_HEADER]], [special[END_HEADER]]
        if system:
            add(header[0] + enc("system") + header[1] + enc(f"\n\n{system}") + [close])
    elif template == "zephyr" and system:
        add(opening(f"<|system|>\n{system}") + [tokens.eos])
    for n, (user, model) in enumerate([*history, (prompt, response)]):
        if template == "plain":
            head = (f"{system}\n\n" if system and n == 0 else "") + ("\n\n" if n else "")
            add(opening(f"{head}{PLAIN_USER}{user}{PLAIN_MODEL}"))
        elif template == "llama3":
            add(header[0] + enc("user") + header[1] + enc(f"\n\n{user}") + [close]
                + header[0] + enc("assistant") + header[1] + enc("\n\n"))
        elif template == "zephyr":
            # The text between two special tokens is one chunk, as llama.cpp and transformers cut it.
            lead = "\n" if n or system else ""
            add(opening(f"{lead}<|user|>\n{user}") + [tokens.eos] + opening("\n<|assistant|>\n"))
        else:
            if n:
                add(opening("\n"))
            user = f"{system}\n\n{user}" if system and n == 0 else user
            add([special[START_OF_TURN]] + opening(f"user\n{user}") + [special[END_OF_TURN]] + opening("\n")
                + [special[START_OF_TURN]] + opening("model\n"))
        if model is not None:
            add(enc(model) + [close], weight=1)
    return ids, weights


def encode_text(tokens: ChatTokens, text: str) -> list[int]:
    """A raw document for continued pretraining: <bos> text <eos>, no chat template."""
    return [tokens.bos] + tokens.encode_batch([text], after_special=True)[0] + [tokens.eos]
