"""Chat rendering: prompts and off-policy responses tokenized exactly as the engines see them.

The policy's chat template on the prompt (`render_prompt`), response + EOS cut at the response budget
(`render_response`), and the tokenizer of a model folder exactly as saved (`load_tokenizer`).

A prompt row is plain user text, or, when the data settings give a system prompt, the whole conversation in one
string (`encode_prompt`: JSON {"chat": [system turn, user turn]}). Every stage renders prompts through
`render_prompt`, so sampling, SFT, teacher sampling and evaluation all see the same system turn.

`check_prompt_lengths` refuses, before any engine loads, a prompt that an engine would refuse at generate time:
its rendered tokens plus the response budget do not fit `engine.max_model_len`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RenderedResponse", "PromptTooLong", "load_tokenizer", "encode_prompt", "prompt_messages", "render_prompt",
           "render_response", "pad_id", "check_prompt_lengths"]


@dataclass(frozen=True)
class RenderedResponse:
    """Token ids of one off-policy response (+ EOS unless cut); `truncated` when the budget cut it."""

    ids: list[int]
    truncated: bool


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model folder or hub id, exactly as saved. transformers 5's AutoTokenizer maps a
    folder whose config says e.g. `qwen2` onto that family's tokenizer class and rebuilds its pre-tokenizer,
    which silently changes a custom `tokenizer.json` (the embedded default's character tokenizer loses its
    spaces); a folder saved as a generic fast tokenizer is therefore loaded as one."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(path) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("tokenizer_class") in _GENERIC_TOKENIZERS:
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


_CHAT_KEY = '{"chat": ['


def encode_prompt(user: str, system: str | None = None) -> str:
    """The prompt row of a user turn: the text itself, or with a system turn the JSON of both."""
    if system is None:
        return user
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return json.dumps({"chat": messages}, ensure_ascii=False)


def prompt_messages(prompt: str) -> list[dict[str, str]]:
    """The chat turns of a prompt row (`encode_prompt`'s inverse): one user turn unless it is an encoded chat."""
    if prompt.startswith(_CHAT_KEY):
        try:
            chat = json.loads(prompt)
        except json.JSONDecodeError:
            chat = None
        if isinstance(chat, dict) and list(chat) == ["chat"] and all(
                isinstance(m, dict) and set(m) == {"role", "content"} for m in chat["chat"]):
            return list(chat["chat"])
    return [{"role": "user", "content": prompt}]


def render_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of the chat template on a prompt row (a user turn, or the system + user turns of
    `encode_prompt`), with the generation prompt: what an engine is fed."""
    out = tokenizer.apply_chat_template(prompt_messages(text), add_generation_prompt=True, tokenize=True)
    if isinstance(out, Mapping):  # transformers 5 returns a BatchEncoding; 4.x a list
        out = out["input_ids"]
    ids = list(out)
    if ids and isinstance(ids[0], (list, tuple)):
        if len(ids) != 1:
            raise ValueError(f"apply_chat_template returned {len(ids)} sequences for one conversation")
        ids = list(ids[0])
    return [int(t) for t in ids]


def render_response(tokenizer: Any, text: str, *, max_tokens: int) -> RenderedResponse:
    """An off-policy response tokenized as a generated one: its ids + EOS, cut at `max_tokens` (then no EOS)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; a response must end with EOS")
    ids = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]] + [int(eos)]
    if len(ids) > max_tokens:
        return RenderedResponse(ids[:max_tokens], truncated=True)
    return RenderedResponse(ids, truncated=False)


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class PromptTooLong(ValueError):
    """A prompt row whose tokens plus the response budget exceed the engine's context (`engine.max_model_len`)."""


_BOUNDARY_SLACK = 16
"""Tokens allowed for merges across the template's edges when bounding a row's length by its bytes (below)."""


def check_prompt_lengths(tokenizer: Any, rows: Iterable[tuple[str, str]], *, max_new_tokens: int, max_model_len: int,
                         where: str, budget_setting: str) -> int:
    """Refuse the first (id, prompt) row whose rendered tokens + `max_new_tokens` exceed `max_model_len`, the rule
    the engines apply at generate time, naming the row (`where`: its file), both settings and the numbers. A row is
    tokenized only when it might not fit: a token covers at least one byte, so the template's own tokens plus the
    row's UTF-8 bytes (plus a small slack for merges at the edges) bound its length. Returns the rows checked."""
    limit = max_model_len - max_new_tokens
    overhead = len(render_prompt(tokenizer, "")) + _BOUNDARY_SLACK
    checked = 0
    for row_id, prompt in rows:
        checked += 1
        if overhead + len(prompt.encode("utf-8")) <= limit:
            continue
        n = len(render_prompt(tokenizer, prompt))
        if n > limit:
            raise PromptTooLong(
                f"{where}: prompt {row_id!r} has {n} tokens; with {budget_setting} = {max_new_tokens} it needs "
                f"{n + max_new_tokens} > engine.max_model_len = {max_model_len}. Raise engine.max_model_len, lower "
                f"{budget_setting}, or drop the row (data.max_prompt_chars refuses or skips long rows)")
    return checked
