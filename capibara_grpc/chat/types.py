"""The plain Python values a chat is made of, shared by every service of the mesh: messages,
sampling parameters, and the stream a generation yields (reasoning and answer tokens, then one
Finished).

Their protobuf forms are in capibara.inference.v1 and imported by the other protos; the
conversions are in capibara_grpc.chat.convert.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool")
FINISH_REASONS = ("stop", "length", "stop_sequence", "tool_calls")
# tool_choice besides a function's name.
TOOL_CHOICES = ("auto", "none", "required")
# OpenAI's reasoning_effort values are minimal, low, medium, high; servers add their own (none, xhigh).
REASONING_EFFORT = re.compile(r"^[a-z]{1,16}$")


@dataclass
class ToolCall:
    """A function the model asked to call; `arguments` is JSON text as the model wrote it."""

    id: str
    name: str
    arguments: str


@dataclass
class Message:
    role: str
    content: str
    # An assistant message's tool calls (its content may then be empty).
    tool_calls: list[ToolCall] = field(default_factory=list)
    # A "tool" message: the id of the call whose result it holds.
    tool_call_id: str = ""


@dataclass
class SamplingParams:
    """Explicit per-request parameters; None means "the model's configured default"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    repeat_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    top_k: int | None = None
    # A JSON Schema (JSON text) the answer must follow; "" = free text.
    json_schema: str = ""
    # How hard a reasoning model thinks (OpenAI's reasoning_effort: low, medium, high...); "" =
    # the server's default. Passed on as is to servers that take it.
    reasoning_effort: str = ""
    # Tools the model may call: OpenAI function tools, each as JSON text, passed on unchanged.
    tools: list[str] = field(default_factory=list)
    # "" (= "auto" when there are tools), "auto", "none", "required", or one function's name.
    tool_choice: str = ""
    # Several calls in one answer; None = the server's default.
    parallel_tool_calls: bool | None = None


@dataclass
class Token:
    text: str
    index: int


@dataclass
class Reasoning:
    """A piece of a reasoning model's thinking, streamed before (or between) answer tokens. Kept
    apart end to end: never part of the answer text, the conversation memory, the cache or a vote."""

    text: str
    index: int


@dataclass
class ToolCallDelta:
    """A piece of tool call `index`, as the OpenAI API streams it: the first piece carries its id
    and name, the next ones fragments of its arguments to append."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class Finished:
    finish_reason: str  # one of FINISH_REASONS
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_ms: float = 0.0
    prompt_ms: float = 0.0
    generation_ms: float = 0.0
    tokens_per_second: float = 0.0
    total_ms: float = 0.0
    model_id: str = ""
    backend_model: str = ""
    # "" for a live answer; "exact" or "semantic" when the gateway replayed it from its cache.
    cache_hit: str = ""
    # Of completion_tokens, the thinking of a reasoning model (0 when none or not reported).
    reasoning_tokens: int = 0
    # From the start of the call to the first reasoning token (0 = no reasoning).
    time_to_first_reasoning_ms: float = 0.0


# What a generation yields: Reasoning, Token and ToolCallDelta items, then one Finished.
Generated = Token | Reasoning | ToolCallDelta | Finished
# (model_id, messages, params, timeout_s) -> stream of tokens then one Finished
GenerateFn = Callable[[str, list[Message], SamplingParams, float], AsyncIterator[Generated]]


@dataclass
class RouteDecision:
    """The router's choice for a message (RouterClient.route, Router.route)."""

    model_id: str
    route_name: str
    confidence: float
    fallback: bool
    reasoning: str
    # (route name, model id, probability) for every route, best first.
    scores: list[tuple[str, str, float]] = field(default_factory=list)


@dataclass
class ConsensusAnswer:
    """Several models' answers combined into one (ConsensusClient.decide)."""

    text: str
    chosen_model_id: str
    agreement: float
    reasoning: str
    scores: list[tuple[str, float]]
    prompt_tokens: int
    completion_tokens: int
