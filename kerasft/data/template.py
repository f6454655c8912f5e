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


def render_chat(prompt: str, response: str | None = None, system: str = "") -> str:
    """The template as text (for display, the server and parity with Hugging Face)."""
    user = f"{system}\n\n{prompt}" if system else prompt
    text = f"<bos>{START_OF_TURN}user\n{user}{END_OF_TURN}\n{START_OF_TURN}model\n"
    if response is not None:
        text += f"{response}{END_OF_TURN}\n"
    return text


def encode_prompt(tokens: ChatTokens, prompt: str, system: str = "") -> list[int]:
    """Token ids of the rendered prompt up to and including `<start_of_turn>model\\n`."""
    user = f"{system}\n\n{prompt}" if system else prompt
    return (
        [tokens.bos, tokens.start_of_turn]
        + tokens.encode(f"user\n{user}")
        + [tokens.end_of_turn]
        + tokens.encode("\n")
        + [tokens.start_of_turn]
        + tokens.encode("model\n")
    )


def encode_response(tokens: ChatTokens, response: str) -> list[int]:
    """Token ids of a response and the `<end_of_turn>` that closes it (it carries loss too)."""
    return tokens.encode(response) + [tokens.end_of_turn]
