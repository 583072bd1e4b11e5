"""An OpenAI request onto a pipeline run: the question, the earlier turns, and the sampling fields.

- The question is the last user message; the messages before it are the history.
- A sampling field the request sets (temperature, top_p, max_tokens, seed, stop) applies to every call of
  this run: it becomes the pipeline default and replaces any stage or slot value of that field, so
  `max_tokens: 8` means at most 8 tokens per call. The pipeline file is not changed.
- `reasoning_format` ("none", "deepseek") becomes the run's `defaults.stream_reasoning`, so the stream
  reads one setting and the session records the one that was used.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from api.errors import BadRequest
from api.schemas import SAMPLING_KEYS, ChatRequest, CompletionFields, CompletionRequest
from orchestrator.config.schema import PipelineSpec

Turn = dict[str, str]


def conversation(request: ChatRequest) -> tuple[str, list[Turn]]:
    """(question, history): the last user message, and every message before it as {role, content}."""
    last_user = max((i for i, m in enumerate(request.messages) if m.role == "user"), default=None)
    if last_user is None:
        raise BadRequest("no user message: the last user message is the question", param="messages")
    if last_user != len(request.messages) - 1:
        raise BadRequest("the last message must be the user's question (a pipeline does not continue an "
                         "assistant message)", param="messages")
    question = request.messages[last_user].text()
    if not question.strip():
        raise BadRequest("the last user message is empty", param="messages")
    history = [{"role": m.role, "content": m.text()} for m in request.messages[:last_user]]
    return question, history


def prompt_question(request: CompletionRequest) -> str:
    """The question of a /v1/completions request: its prompt, refused when empty (naming `prompt`)."""
    question = request.text()
    if not question.strip():
        raise BadRequest("the prompt is empty", param="prompt")
    return question


def check_pipeline_request(request: CompletionFields) -> None:
    """What a pipeline cannot honour is refused rather than silently answered otherwise.

    Tools merely offered (`tool_choice` absent, "auto" or "none") are honoured by answering without a
    call, as a model may, and listed in `chorus.ignored`: Open WebUI offers its built-in tools with every
    request. A request that demands a call (`tool_choice` "required" or a named function) is refused.
    """
    if request.n != 1:
        raise BadRequest("a pipeline gives one answer: n must be 1", param="n")
    extra = {**(request.model_extra or {}), "tools": request.tools}
    for offered, choice in (("tools", "tool_choice"), ("functions", "function_call")):
        if extra.get(offered) and extra.get(choice) not in (None, "auto", "none"):
            raise BadRequest(f"a pipeline cannot call tools: {choice} {json.dumps(extra[choice])} asks for a call",
                             param=choice)


def with_sampling(pipeline: PipelineSpec, request: CompletionFields) -> PipelineSpec:
    """`pipeline` with the request's sampling fields applied to every call and its reasoning_format to the
    run's reasoning stream (a new spec)."""
    values = request.sampling()
    reasoning = request.reasoning()
    if not values and reasoning in (None, pipeline.defaults.stream_reasoning):
        return pipeline
    data = pipeline.model_dump(mode="python")
    data["defaults"].update(values)
    if reasoning is not None:
        data["defaults"]["stream_reasoning"] = reasoning
    for stage in data["stages"]:
        for key in values:
            stage[key] = None
            for slot in stage["models"]:
                slot[key] = None
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        bad = next((str(p) for p in err.get("loc", ()) if p in SAMPLING_KEYS), None)
        raise BadRequest(f"{bad or 'request'}: {err.get('msg', 'invalid value')}", param=bad) from None


def history_kwargs(history: list[Turn]) -> dict[str, Any]:
    """`history=` for Runner.arun: the earlier turns reach the prompt templates as `history`."""
    return {"history": history} if history else {}
