"""The request bodies chorus accepts, as pydantic models: OpenAI's fields, checked at the boundary.

Unknown fields are kept, not refused: OpenAI clients send many (user, metadata, penalties...). A model
proxy forwards them to llama-server, which understands most; a pipeline reports the ones it did not use
in the response's `chorus.ignored`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.errors import BadRequest

SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "seed", "stop")  # what a pipeline call can take
MAX_STOP = 16
ReasoningFormat = Literal["none", "auto", "deepseek", "deepseek-legacy"]  # llama-server's names


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(Open):
    include_usage: bool = False


class ChorusOptions(Open):
    """chorus's own request field (`extra_body={"chorus": {...}}` with the openai package)."""

    events: Literal["none", "progress", "tokens"] = "progress"  # tokens: every stage's tokens as events too


class Message(Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; text parts joined, anything else (images, audio) refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"message content of type {part.get('type')!r} is not supported: text only",
                                 param="messages")
            pieces.append(part["text"])
        return "".join(pieces)


class FunctionDef(Open):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Open):
    """One tool a request offers. Checked here, so a malformed one is refused naming the field (422) before a
    model server sees it: llama-server answers it 500, which the openai package retries."""

    type: Literal["function"]
    function: FunctionDef


class CompletionFields(Open):
    """What both endpoints share."""

    model: str = Field(min_length=1, max_length=200)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=128)
    # llama-server's request field: "none" turns a pipeline's reasoning stream off, "deepseek" (or
    # "deepseek-legacy") on, "auto" or unset leaves it to the pipeline's `defaults.stream_reasoning`
    reasoning_format: ReasoningFormat | None = None
    # offered tools: forwarded to a model as sent; a pipeline answers without a call (api/mapping.py)
    tools: list[Tool] | None = Field(None, max_length=1024)
    chorus: ChorusOptions = ChorusOptions()

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return [s for s in stops if s] or None

    def sampling(self) -> dict[str, Any]:
        """The sampling fields the request set, as a pipeline call takes them."""
        values: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p,
                                  "max_tokens": self.max_completion_tokens or self.max_tokens,
                                  "seed": self.seed, "stop": self.stop}
        return {k: v for k, v in values.items() if v is not None}

    def reasoning(self) -> bool | None:
        """Whether the request asks for the reasoning stream; None leaves it to the pipeline."""
        if self.reasoning_format in (None, "auto"):
            return None
        return self.reasoning_format != "none"

    def ignored(self) -> list[str]:
        """Fields sent that a pipeline run does not use (reported back, not silently dropped)."""
        unused = {k for k, v in (self.model_extra or {}).items() if v is not None}
        return sorted(unused | ({"tools"} if self.tools is not None else set()))

    def wire(self) -> dict[str, Any]:
        """The body to forward to a model server: as sent, less chorus's own field."""
        body = self.model_dump(mode="json", exclude_unset=True, exclude={"chorus"})
        if self.stop is not None:
            body["stop"] = self.stop
        return body


class ChatRequest(CompletionFields):
    messages: list[Message] = Field(min_length=1, max_length=10_000)


class CompletionRequest(CompletionFields):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("give one prompt (a string, or a list of one string)")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
