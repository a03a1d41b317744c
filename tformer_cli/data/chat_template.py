"""The chat template, shared by fine-tuning and `tformer chat` so both see the same token layout.

A conversation is BOS, then for each message its role marker, its content and <|end|>:

    <s><|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>

A prompt for a reply ends with <|assistant|>; the reply ends when the model emits <|end|>
(or EOS). Base models that never saw the markers get a plain transcript instead.
"""

from __future__ import annotations

from tformer_cli.data.tokenizer import CHAT_MARKERS, Tokenizer
from tformer_cli.errors import TformerError

ROLES = ("system", "user", "assistant")
PLAIN_NAMES = {"system": "", "user": "User", "assistant": "Assistant"}
PLAIN_STOPS = ("\nUser:", "\nAssistant:")


def encode_chat_with_mask(
    tok: Tokenizer, messages: list[dict[str, str]]
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, for each, whether it is assistant output (its content
    and <|end|>)."""
    if not tok.has_chat_markers:
        raise TformerError(
            f"{tok.path}: this tokenizer has no chat markers ({', '.join(CHAT_MARKERS)}), "
            "which chat, Alpaca and prompt/completion data need; "
            'use text data ({"text": ...} or .txt) with this base'
        )
    end = tok.marker_ids["<|end|>"]
    ids, mask = [tok.bos_id], [False]
    for message in messages:
        role = message["role"]
        if role not in ROLES:
            raise TformerError(f"unknown role {role!r}: use system, user or assistant")
        content = tok.encode(message["content"])
        is_reply = role == "assistant"
        ids += [tok.marker_ids[f"<|{role}|>"], *content, end]
        mask += [False] + [is_reply] * (len(content) + 1)
    return ids, mask


def encode_chat(
    tok: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a conversation, ending with <|assistant|> when a reply is wanted."""
    ids, _ = encode_chat_with_mask(tok, messages)
    if add_generation_prompt:
        ids.append(tok.marker_ids["<|assistant|>"])
    return ids


def plain_transcript(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The conversation as a plain transcript for base models: "User: ...\\nAssistant: ..."."""
    lines = []
    for m in messages:
        name = PLAIN_NAMES[m["role"]]
        lines.append(f"{name}: {m['content']}" if name else m["content"])
    text = "\n".join(lines)
    if add_generation_prompt:
        text += "\nAssistant:"
    return text
