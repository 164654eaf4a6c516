"""A conversation as prompt token ids: the model's chat template renders it, and nothing a caller
wrote becomes one of the template's control tokens (`<|im_start|>system` in a message is text to
the model, never a new turn), unless the model opts out (`[models.NAME] allow_special_tokens`).

transformers' `apply_chat_template(..., sanitize_control_tokens=True)` (5.20 and later) encodes each
control token spelled in a message as plain text. Control tokens here are all the tokenizer's
added tokens, special or not, whatever chat format they belong to (only whitespace ones aside);
they are listed in the tokenizer's `chat_control_tokens`, so the library marks exactly the tokens
checked here. The result is then checked, so a gap in that escaping can't pass: the prompt's
control tokens must be exactly the ones the template writes for the same conversation with
neutral contents. What can't be kept as text (a spelling the tokenizer's normalizer turns into a
control token; a control token that plain text encodes to) is refused: INVALID_ARGUMENT,
SPECIAL_TOKEN_IN_CONTENT.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence
from typing import Any

from airlock.errors import InvalidRequestError
from airlock.types import Message

__all__ = ["ChatPrompter", "control_tokens"]

_NEUTRAL = "x"  # a skeleton message's content: plain text that spells no token of any template


def control_tokens(tokenizer: Any) -> frozenset[str]:
    """The tokens a caller's text must never produce: every added token of the tokenizer (the
    template's own and any other: a reasoning, tool or file marker is as much structure), except
    non-special whitespace ones (a run of spaces or newlines is text, as templates use it)."""
    return frozenset(
        token.content
        for token in tokenizer.added_tokens_decoder.values()
        if token.special or not token.content.isspace()
    )


class ChatPrompter:
    """Builds one request's prompt ids; safe to call from several threads (one at a time inside:
    encoding sets options on the shared tokenizer, such as the Rust tokenizer's
    `encode_special_tokens` flag, so two prompts built at once could swap settings)."""

    def __init__(self, tokenizer: Any, *, allow_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.allow_special_tokens = allow_special_tokens
        self._lock = threading.Lock()
        self.control_ids: frozenset[int] = frozenset()
        if allow_special_tokens:
            return
        if "sanitize_control_tokens" not in inspect.signature(tokenizer.apply_chat_template).parameters:
            # An older transformers would pass the option to the template, which ignores it: refuse to start.
            raise RuntimeError(
                "keeping callers' text out of control tokens needs transformers >= 5.20 "
                "(apply_chat_template's sanitize_control_tokens); upgrade it, or set the model's "
                "allow_special_tokens"
            )
        tokens = control_tokens(tokenizer)
        non_special = {t.content for t in tokenizer.added_tokens_decoder.values() if not t.special}
        listed = set(getattr(tokenizer, "chat_control_tokens", None) or ())
        tokenizer.chat_control_tokens = sorted(listed | (tokens & non_special))  # special ones always are
        self.control_ids = frozenset(tokenizer.convert_tokens_to_ids(sorted(tokens)))

    def ids(self, messages: Sequence[Message]) -> list[int]:
        """The prompt for `messages`, ending with the assistant's turn opened."""
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        with self._lock:
            if self.allow_special_tokens:
                return self._render(conversation, sanitize=False)
            try:
                ids = self._render(conversation, sanitize=True)
            except ValueError:  # a marked control token that plain text encodes to: no text form
                raise _refused() from None
            skeleton = self._render([{"role": m.role, "content": _NEUTRAL} for m in messages], sanitize=True)
        if self._controls(ids) != self._controls(skeleton):
            raise _refused()
        return ids

    def _render(self, conversation: list[dict[str, str]], *, sanitize: bool) -> list[int]:
        options = {"sanitize_control_tokens": True} if sanitize else {}
        ids = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=False, **options
        )
        return [int(i) for i in ids]

    def _controls(self, ids: list[int]) -> list[int]:
        return [i for i in ids if i in self.control_ids]


def _refused() -> InvalidRequestError:
    return InvalidRequestError(
        "a message spells one of the model's control tokens in a form that can't be kept as text",
        reason="SPECIAL_TOKEN_IN_CONTENT",
        field="messages",
    )
