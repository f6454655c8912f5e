"""The Gemma chat template: one set of functions for training, evaluation, generation and export.

Rendered text (what Hugging Face's chat template produces for Gemma):
    <bos><start_of_turn>user\n{system\n\n}{prompt}<end_of_turn>\n<start_of_turn>model\n{response}<end_of_turn>\n
Token ids are built piece by piece with the special tokens inserted as ids, so they are single
tokens whatever the tokenizer does with their text, and the prompt/response boundary is exactly
where generation starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from kerasft.errors import KerasftError

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

# Hugging Face chat_template (jinja) equivalent of render_chat, written into exported tokenizers.
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


# The plain template as Hugging Face jinja (render_chat(..., template="plain") with a generation prompt).
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


def hf_chat_template(template: str = "gemma") -> str:
    """The jinja chat template that renders like `render_chat` for an exported tokenizer."""
    return HF_PLAIN_TEMPLATE if template == "plain" else HF_CHAT_TEMPLATE


@dataclass(frozen=True)
class ChatTokens:
    """A SentencePiece processor plus the ids the template needs."""

    sp: object
    bos: int
    eos: int
    pad: int
    start_of_turn: int
    end_of_turn: int

    @property
    def stop_ids(self) -> tuple[int, int]:
        return (self.end_of_turn, self.eos)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def chat_tokens(tokenizer) -> ChatTokens:
    """Wraps a keras-hub Gemma tokenizer's SentencePiece model for numpy-side tokenisation.

    Raw strings never go through TF ops: keras-hub's tokenizers hit a flaky SentencePieceOp
    resource error inside tf.data.
    """
    import sentencepiece

    proto = getattr(tokenizer, "proto", None)
    if not proto:
        raise KerasftError(f"{type(tokenizer).__name__} has no SentencePiece model; kerasft needs a Gemma tokenizer")
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    ids = {}
    for piece in (START_OF_TURN, END_OF_TURN):
        ids[piece] = sp.piece_to_id(piece)
        if ids[piece] == sp.unk_id():
            raise KerasftError(f"tokenizer has no {piece} token: not a Gemma chat vocabulary")
    return ChatTokens(sp, sp.bos_id(), sp.eos_id(), max(sp.pad_id(), 0), ids[START_OF_TURN], ids[END_OF_TURN])


TEMPLATES = ("gemma", "plain")
PLAIN_USER = "### Instruction:\n"
PLAIN_MODEL = "\n\n### Response:\n"


def render_chat(prompt: str, response: str | None = None, system: str = "", history=(), template: str = "gemma") -> str:
    """The template as text (for display, the server and parity with Hugging Face)."""
    turns = [*history, (prompt, response)]
    if template == "plain":
        text = f"<bos>{system}\n\n" if system else "<bos>"
        for n, (user, model) in enumerate(turns):
            text += ("\n\n" if n else "") + f"{PLAIN_USER}{user}{PLAIN_MODEL}"
            if model is not None:
                text += f"{model}<eos>"
        return text
    text = "<bos>"
    for n, (user, model) in enumerate(turns):
        if n == 0 and system:
            user = f"{system}\n\n{user}"
        text += f"{START_OF_TURN}user\n{user}{END_OF_TURN}\n{START_OF_TURN}model\n"
        if model is not None:
            text += f"{model}{END_OF_TURN}\n"
    return text


def encode_prompt(tokens: ChatTokens, prompt: str, system: str = "", history=(), template: str = "gemma") -> list[int]:
    """Token ids of the rendered prompt, up to where the model's answer starts
    (`<start_of_turn>model\\n` for Gemma); earlier turns of `history` come first."""
    ids, _ = encode_conversation(tokens, prompt, None, system, history, template)
    return ids


def example_prompt_ids(tokens: ChatTokens, example, data_cfg) -> list[int]:
    """The prompt ids of an example exactly as training renders it: its own system prompt or
    the config's, its earlier turns, the configured template. Evaluation and serving use this."""
    return encode_prompt(tokens, example.prompt, example.system or data_cfg.system, example.history,
                         data_cfg.template)


def encode_response(tokens: ChatTokens, response: str, template: str = "gemma") -> list[int]:
    """Token ids of a response and the token that closes it (it carries loss too)."""
    return tokens.encode(response) + [tokens.eos if template == "plain" else tokens.end_of_turn]


def encode_conversation(tokens: ChatTokens, prompt: str, response: str | None, system: str = "", history=(),
                        template: str = "gemma", encode=None) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and their loss weights: 1 on every assistant turn and
    the token that closes it, 0 on system and user turns and on the template's own text.

    encode: text -> ids; defaults to the tokenizer (the pipeline passes a batched lookup).
    """
    enc = encode or tokens.encode
    if template not in TEMPLATES:
        raise KerasftError(f"data.template: unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    ids, weights = [tokens.bos], [0]

    def add(piece, weight=0):
        ids.extend(piece)
        weights.extend([weight] * len(piece))

    for n, (user, model) in enumerate([*history, (prompt, response)]):
        if template == "plain":
            head = (f"{system}\n\n" if system and n == 0 else "") + ("\n\n" if n else "")
            add(enc(f"{head}{PLAIN_USER}{user}{PLAIN_MODEL}"))
        else:
            if n:
                add(enc("\n"))
            user = f"{system}\n\n{user}" if system and n == 0 else user
            add([tokens.start_of_turn] + enc(f"user\n{user}") + [tokens.end_of_turn] + enc("\n")
                + [tokens.start_of_turn] + enc("model\n"))
        if model is not None:
            add(enc(model) + [tokens.eos if template == "plain" else tokens.end_of_turn], weight=1)
    return ids, weights


def encode_text(tokens: ChatTokens, text: str) -> list[int]:
    """A raw document for continued pretraining: <bos> text <eos>, no chat template."""
    return [tokens.bos] + tokens.encode(text) + [tokens.eos]
