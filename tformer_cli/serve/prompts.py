"""From a checked request to the rows the scheduler decodes: prompts, limits, sampling.

A chat request is rendered exactly as `tformer chat` renders a conversation (render_prompt: the
chat template for a model fine-tuned for chat, a plain transcript with its stop strings for a
base model); a completion prompt is BOS and its tokens, as `tformer generate` builds it. A prompt
that does not fit the context window is refused (400, naming the limit), never cut.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from tformer_cli.data.chat_template import PLAIN_STOPS
from tformer_cli.inference.chat import render_prompt
from tformer_cli.inference.sampling import SamplingConfig
from tformer_cli.runs.rundir import Run
from tformer_cli.serve.batching import RowSpec
from tformer_cli.serve.errors import APIError
from tformer_cli.serve.schemas import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)


@dataclass
class ServeSettings:
    """What the server allows and how it decodes (the `tformer serve` options)."""

    api_key: str | None = None  # required as `Authorization: Bearer KEY` on /v1 and /metrics
    max_batch: int = 16  # rows decoded together per model; more requests wait in the queue
    max_queue: int = 64  # requests waiting per model; more get 503
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # max_tokens when a request gives none
    max_choices: int = 8  # n x prompts in one request
    max_body_bytes: int = 1 << 20
    timeout: float = 600.0  # seconds a request may take, its time in the queue included


@dataclass
class ServedModel:
    """A loaded run and how the API names and prompts it."""

    name: str
    run: Run
    mode: str  # "chat" (the chat template) or "plain" (a transcript), as `tformer chat` decides
    created: int = 0  # when its weights were written (Unix time), for /v1/models

    @property
    def window(self) -> int:
        """The model's context window in tokens."""
        return self.run.config.max_seq_len

    def describe(self) -> dict:
        """The model as /v1/models lists it."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "tformer",
            "context_window": self.window,
            "mode": self.mode,
        }


def model_names(paths: list[Path]) -> list[str]:
    """A distinct API name per run: its directory's name (`corpus`, `corpus/best` for a best/),
    with -2, -3, ... added where two runs would share one."""
    names: list[str] = []
    for path in paths:
        base = f"{path.parent.name}/{path.name}" if path.name == "best" else path.name
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def created_time(path: Path) -> int:
    """When the run's weights were written, else now."""
    times = [p.stat().st_mtime for p in path.glob("*.safetensors")]
    return int(max(times)) if times else int(time.time())


# -- requests to rows ------------------------------------------------------------------------


@dataclass
class Plan:
    """A request turned into rows: one per prompt and choice, and the prompts' token counts."""

    rows: list[RowSpec]
    prompt_tokens: int
    prompt_texts: list[str]  # what `echo` prints before each prompt's completions


def plan_chat(model: ServedModel, req: ChatCompletionRequest, settings: ServeSettings) -> Plan:
    """The rows of a chat completion: the conversation rendered as `tformer chat` does it."""
    messages = [_message(m.role, m.content, i) for i, m in enumerate(req.messages)]
    ids = render_prompt(model.run.tokenizer, model.mode, messages)
    _check_length(len(ids), model.window, "messages")
    extra = PLAIN_STOPS if model.mode == "plain" else ()
    max_new = req.max_tokens or req.max_completion_tokens
    spec = _spec(ids, req, settings, max_new, extra)
    return Plan(_choices([spec], req.n, settings), len(ids), [""])


def plan_completion(model: ServedModel, req: CompletionRequest, settings: ServeSettings) -> Plan:
    """The rows of a completion: BOS and each prompt's tokens, as `tformer generate` does it."""
    tok = model.run.tokenizer
    prompts = _prompt_list(req.prompt)
    specs, texts, total = [], [], 0
    for k, prompt in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt.{k}"
        if isinstance(prompt, str):
            ids = [tok.bos_id, *tok.encode(_text(prompt, param))]
            texts.append(prompt)
        else:
            ids = _token_ids(prompt, tok.vocab_size, param)
            texts.append(tok.decode(ids))
        _check_length(len(ids), model.window, param)
        total += len(ids)
        specs.append(_spec(ids, req, settings, req.max_tokens))
    return Plan(_choices(specs, req.n, settings), total, texts)


def _message(role: str, content, index: int) -> dict[str, str]:
    """A message as the chat template takes it; "developer" is OpenAI's newer name for system."""
    where = f"messages.{index}.content"
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"{where}: only text content is served", param=where)
            parts.append(part.text)
        text = "".join(parts)
    return {"role": "system" if role == "developer" else role, "content": _text(text, where)}


def _text(text: str, param: str) -> str:
    """text, or 400 when it holds a lone surrogate (JSON can spell one; no text holds it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            400, f"{param}: not valid text (a lone surrogate at character {e.start + 1})", param
        ) from None
    return text


def _prompt_list(prompt) -> list:
    """One prompt or several: a string, token ids, or a list of either."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        return [""]
    return list(prompt)


def _token_ids(ids: list[int], vocab: int, param: str) -> list[int]:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"{param}: token id {bad} is outside 0..{vocab - 1}", param)
    if not ids:
        raise APIError(400, f"{param}: no token ids", param)
    return list(ids)


def _check_length(n: int, window: int, param: str) -> None:
    """A prompt must leave the reply at least one slot of the context window."""
    if n > window - 1:
        raise APIError(
            400,
            f"the prompt is {n:,} tokens, over this model's limit of {window - 1:,} (its context "
            f"window of {window:,} tokens, less one for the reply); shorten it",
            param=param,
            code="context_length_exceeded",
        )


def _spec(
    ids: list[int],
    req: SamplingFields,
    settings: ServeSettings,
    max_tokens: int | None,
    extra_stops: tuple[str, ...] = (),
) -> RowSpec:
    """One row's settings from the request's fields, the server's defaults and limits."""
    if name := req.unsupported():
        raise APIError(400, f"{name} is not supported by tformer serve", param=name)
    max_new = max_tokens or settings.default_max_tokens
    if max_new > settings.max_tokens:
        raise APIError(
            400,
            f"max_tokens is {max_new:,}; this server allows at most {settings.max_tokens:,} "
            "(tformer serve --max-tokens)",
            param="max_tokens",
        )
    stops = req.stops()
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(
            400, f"stop: at most {MAX_STOPS} strings of {MAX_STOP_CHARS} characters", "stop"
        )
    sampling = SamplingConfig(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=req.top_k or 0,
        top_p=1.0 if req.top_p is None else req.top_p,
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
    )
    stops = tuple(_text(s, "stop") for s in stops) + extra_stops
    return RowSpec(ids, max_new, sampling, req.seed, stops, req.ignore_eos)


def _choices(specs: list[RowSpec], n: int, settings: ServeSettings) -> list[RowSpec]:
    """n rows per prompt; choice k of a seeded request samples with seed + k."""
    limit = min(settings.max_choices, settings.max_batch)
    if len(specs) * n > limit:
        raise APIError(
            400,
            f"{len(specs)} prompts x n={n} is {len(specs) * n} choices; at most {limit} go in "
            "one request",
            param="n",
        )
    return [
        replace(spec, seed=None if spec.seed is None else spec.seed + k)
        for spec in specs
        for k in range(n)
    ]
