"""Conversation extraction: a chat row (a list of ``{role, content}`` messages, the layout of
most chat datasets) → the text of the conversation, or one text per message.

Each kept message is rendered with ``message_template`` (``{role}``, ``{content}``, ``{index}``)
and the messages are joined with the preparation delimiter. ``roles`` keeps only those roles,
``max_messages`` the last N kept. ``unit`` ``conversation`` gives one unit per row (the row's
id); ``message`` one per kept message, id ``{conversation id}/{index}`` with ``index`` the
message's place in the original conversation (stable whatever the filters).
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from embedbatch.config import PrepareConfig
from embedbatch.errors import UsageError

__all__ = [
    "CONVERSATION_FIELD",
    "ConversationUnit",
    "Conversations",
    "find_messages_field",
    "is_messages",
    "message_text",
]

CONVERSATION_FIELD = "__conversation__"  # the field preparation reads the rendered text from


def is_messages(value: Any) -> bool:
    """True for a non-empty list of objects that all have ``role`` and ``content``."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def find_messages_field(row: dict[str, Any]) -> str | None:
    """The first column of ``row`` that holds a conversation, if any."""
    return next((k for k, v in row.items() if is_messages(v)), None)


@dataclass(frozen=True, slots=True)
class ConversationUnit:
    """One text to embed from a conversation: its id suffix (None: the row's own id), the
    text, and what was kept."""

    suffix: str | None
    text: str
    metadata: dict[str, Any]


def message_text(content: Any) -> str:
    """A message's text: a string as it is; a list of content parts (the chat API's
    ``[{"type": "text", "text": …}, {"type": "image_url", …}]``) as its text parts joined by a
    newline, other parts (images, audio) left out; None → ``""``.

    Raises:
        ValueError: content of another shape (a number, an object that is not a text part).
    """
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and "type" in part:
                if part.get("type") in ("text", "input_text") and isinstance(part.get("text"), str):
                    texts.append(part["text"])
            else:
                raise ValueError(f"a message content part is {type(part).__name__}, not a text part")
        return "\n".join(t for t in texts if t)
    raise ValueError(f"message content is {type(content).__name__}, not text or a list of parts")


class Conversations:
    """Renders conversations as :class:`PrepareConfig` says.

    Raises:
        UsageError: a bad ``--message-template`` or ``--max-messages``.
    """

    def __init__(self, config: PrepareConfig, field: str) -> None:
        self.field = field
        self.template = config.message_template
        self.roles = set(config.roles)
        self.unit = config.unit
        self.max_messages = config.max_messages
        self.delimiter = config.delimiter
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(self.template) if f}
        except ValueError as exc:
            raise UsageError(f"bad --message-template: {exc}") from exc
        unknown = names - {"role", "content", "index"}
        if unknown:
            raise UsageError(f"--message-template may use {{role}}, {{content}}, {{index}}; not {sorted(unknown)}")
        if self.max_messages is not None and self.max_messages < 1:
            raise UsageError("--max-messages must be at least 1")
        if self.unit not in ("conversation", "message"):
            raise UsageError(f"--unit must be conversation or message, got {self.unit!r}")

    def units(self, messages: Any) -> Iterator[ConversationUnit]:
        """The units of one row's ``messages`` (none when it holds no conversation).

        Raises:
            ValueError: the value is not a list of ``{role, content}`` objects.
        """
        if messages is None:
            return
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
            raise ValueError(f"{self.field!r} is not a list of {{role, content}} messages")
        kept = [
            (i, m, content)
            for i, m in enumerate(messages)
            if (not self.roles or str(m.get("role")) in self.roles) and (content := message_text(m["content"]))
        ]
        if self.max_messages is not None:
            kept = kept[-self.max_messages :]
        rendered = [
            (i, str(m.get("role")), self.template.format(role=m.get("role"), content=content, index=i))
            for i, m, content in kept
        ]
        if self.unit == "message":
            for i, role, text in rendered:
                yield ConversationUnit(str(i), text, {"message_index": i, "role": role})
            return
        yield ConversationUnit(
            None,
            self.delimiter.join(text for _, _, text in rendered),
            {"messages_total": len(messages), "messages_kept": len(rendered)},
        )
