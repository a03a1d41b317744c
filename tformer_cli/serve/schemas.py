"""The request bodies of the OpenAI API as far as tformer serves them, checked field by field.

Strict types: a string where a number belongs, or "yes" for a boolean, is a 422 naming the field,
as is a field OpenAI does not define. Fields OpenAI defines that tformer cannot honour (penalties,
logit_bias, logprobs, tools) are accepted at their neutral values and refused with 400 otherwise
(see unsupported()), so a client never gets silently different behaviour. tformer's own extras
are top_k, min_p, repetition_penalty and ignore_eos (as llama.cpp's and vLLM's servers take them).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1  # choice k of a request samples with seed + k: it stays within 2**64 - 1
MAX_STOPS = 8
MAX_STOP_CHARS = 500

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class TextPart(BaseModel):
    """One part of a message's content; only text parts are served."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """A message of the conversation. Extra keys a client echoes back from an earlier reply
    (name, refusal, tool_calls: null) are ignored rather than refused."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str


class SamplingFields(BaseModel):
    """What chat completions and completions share: the model, sampling, limits, streaming."""

    model_config = _STRICT
    model: str | None = None  # None: the first model the server loaded
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # tformer's extras (also llama.cpp's and vLLM's names)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    # OpenAI's fields that tformer takes only at their neutral values (see unsupported())
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        """The stop strings as a list (one string, a list, or none)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> str | None:
        """The first field set to something tformer cannot do, if any."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                return name
        return "logit_bias" if self.logit_bias else None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> str | None:
        """The first field set to something tformer cannot do, if any."""
        if name := super().unsupported():
            return name
        if self.logprobs or self.top_logprobs:
            return "logprobs"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        if self.tools:
            return "tools"
        return "tool_choice" if self.tool_choice not in (None, "none", "auto") else None


class CompletionRequest(SamplingFields):
    """POST /v1/completions: one prompt or several, as text or as token ids."""

    prompt: str | list[str] | list[int] | list[list[int]] = ""
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        """The first field set to something tformer cannot do, if any."""
        if name := super().unsupported():
            return name
        if self.logprobs:
            return "logprobs"
        if self.suffix:
            return "suffix"
        return "best_of" if self.best_of not in (None, self.n) else None
