"""Prompts as the engines get them: checked, and encoded as plain text or through the
tokenizer's chat template (with a system message), and as the cell shows them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import MpbookError


@dataclass(frozen=True)
class EncodedPrompts:
    """The prompts as the engines get them, and as the cell shows them."""

    input_ids: tuple[tuple[int, ...], ...]
    shown: list[str]  # what the printout shows of each prompt: the user's line, not the template
    messages: list[list[dict]] | None  # the chat messages of each prompt, with the chat template


def encode_prompts(tokenizer, prompts: Sequence, *, chat: bool | None = None, system: str | None = None) -> EncodedPrompts:
    """Token ids of each prompt: the text as it is, or (chat) the user's message, after an
    optional system message, through the tokenizer's chat template with the assistant's turn
    opened (``add_generation_prompt=True``).

    ``chat=None`` (the default) applies the template when the tokenizer has one: an instruct
    model answers end-of-turn at once to a prompt without its template. A prompt may also be
    a list of messages ({"role", "content"} dicts), which always goes through the template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    listed = [p for p in prompts if not isinstance(p, str)]
    if chat is False and listed:
        raise MpbookError("--no-chat: the prompts include message lists, which need the chat template; leave out --no-chat")
    use_chat = has_template if chat is None else chat
    if (use_chat or listed) and not has_template:
        what = "--chat" if chat else "a prompt given as a list of messages"
        raise MpbookError(
            f"{what}: this model's tokenizer has no chat template; give plain prompts (--no-chat) "
            "or use an instruct model that ships one"
        )
    if system is not None and not (use_chat or listed):
        raise MpbookError("--system: a system message needs the chat template; "
                          + ("leave out --no-chat" if has_template else "this model's tokenizer has no chat template"))
    if not (use_chat or listed):
        return EncodedPrompts(tuple(tuple(ids) for ids in tokenizer(list(prompts))["input_ids"]), list(prompts), None)
    messages = []
    for i, prompt in enumerate(prompts):
        turn = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _checked_messages(i, prompt)
        if system is not None and turn[0]["role"] != "system":
            turn = [{"role": "system", "content": system}, *turn]
        messages.append(turn)
    ids = tuple(
        tuple(tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=False))
        for turn in messages
    )
    shown = [p if isinstance(p, str) else _last_user_line(p) for p in prompts]
    return EncodedPrompts(ids, shown, messages)


def _checked_messages(index: int, messages) -> list[dict]:
    ok = isinstance(messages, (list, tuple)) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise MpbookError(
            f"prompt {index}: give a str, or a list of messages like "
            "[{'role': 'user', 'content': 'Hi'}]"
        )
    return [dict(m) for m in messages]


def _last_user_line(messages) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else str(messages[-1].get("content", ""))


def check_prompts(prompts: Sequence) -> None:
    """Something to tokenize: at least one prompt, none of them empty (a prompt is a str or
    a list of chat messages)."""
    if not prompts:
        raise MpbookError("no prompts: write one prompt per line in the cell, or pass --prompts VARIABLE")
    for i, p in enumerate(prompts):
        if isinstance(p, (list, tuple)) and p:
            continue
        if not isinstance(p, str) or not p.strip():
            raise MpbookError(f"prompt {i} is empty; every prompt needs at least one token")
