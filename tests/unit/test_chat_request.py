"""The chat core's one validation (capibara_grpc/chat/request.py): every limit of its table, the
words a refused field gets, and defaults filled once."""

from __future__ import annotations

from pathlib import Path

import pytest

from capibara_grpc.chat.request import (
    LIMITS,
    MAX_STOP,
    limits_markdown,
    resolve,
    validate_messages,
    validate_params,
)
from capibara_grpc.chat.types import Message, SamplingParams
from capibara_grpc.config.schema import SamplingDefaults
from capibara_grpc.errors import InvalidField


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_each_number_is_taken_at_its_bounds_and_refused_past_them_naming_it(name):
    bound = LIMITS[name]
    inside = [bound.high] + ([] if bound.low_open else [bound.low])
    for value in inside:
        validate_params(SamplingParams(**{name: int(value) if bound.integer else value}))
    for value in (bound.low - 1 if not bound.low_open else bound.low, bound.high + 1):
        with pytest.raises(InvalidField) as refused:
            validate_params(SamplingParams(**{name: value}))
        assert refused.value.field == name
        assert refused.value.message == f"{name}: must be {bound.describe()}, got {value}"


def test_the_words_of_a_refused_max_tokens():
    with pytest.raises(InvalidField) as refused:
        validate_params(SamplingParams(max_tokens=10000))
    assert refused.value.message == "max_tokens: must be between 1 and 8192, got 10000"


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(stop=["a"] * (MAX_STOP + 1)), "stop"),
        (SamplingParams(stop=["a", ""]), "stop[1]"),
        (SamplingParams(json_schema="{nope"), "json_schema"),
        (SamplingParams(json_schema="[1]"), "json_schema"),
        (SamplingParams(reasoning_effort="very hard!"), "reasoning_effort"),
        (SamplingParams(temperature=float("nan")), "temperature"),
    ],
)
def test_other_fields_are_refused_naming_them(params, field):
    with pytest.raises(InvalidField) as refused:
        validate_params(params)
    assert refused.value.field == field and refused.value.message.startswith(f"{field}: ")


@pytest.mark.parametrize(
    "messages, field",
    [
        ([], "messages"),
        ([Message("system", "be brief")], "messages"),
        ([Message("user", "  ")], "messages"),
        ([Message("user", "hola"), Message("robot", "x")], "messages[1].role"),
    ],
)
def test_a_conversation_needs_known_roles_and_a_user_message(messages, field):
    with pytest.raises(InvalidField) as refused:
        validate_messages(messages)
    assert refused.value.field == field


def test_resolve_fills_only_what_the_request_leaves_unset():
    defaults = SamplingDefaults(max_tokens=200, temperature=0.7, top_p=0.9, repeat_penalty=1.1, top_k=40)
    resolved = resolve(SamplingParams(max_tokens=5, temperature=0.0, stop=["\n"]), defaults)
    assert (resolved.max_tokens, resolved.temperature, resolved.top_p, resolved.repeat_penalty, resolved.top_k) == (
        5,
        0.0,
        0.9,
        1.1,
        40,
    )
    assert resolved.stop == ["\n"] and resolved.seed is None
    # Resolved twice is resolved once: the cache key does not depend on who filled the defaults.
    assert resolve(resolved, defaults) == resolved


def test_the_api_docs_show_the_table_the_code_checks():
    api = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    assert limits_markdown() in api, "docs/api.md: paste capibara_grpc.chat.request.limits_markdown()"


def test_a_whole_number_too_large_for_a_float_is_refused_not_a_crash():
    with pytest.raises(InvalidField) as refused:
        validate_params(SamplingParams(max_tokens=10**400, temperature=10**400))
    assert refused.value.field == "max_tokens" and "must be between 1 and 8192" in refused.value.message
    with pytest.raises(InvalidField) as refused:
        validate_params(SamplingParams(temperature=10**400))
    assert refused.value.field == "temperature"


def test_a_json_schema_has_a_size_limit():
    with pytest.raises(InvalidField) as refused:
        validate_params(SamplingParams(json_schema='{"description": "' + "x" * 70000 + '"}'))
    assert refused.value.field == "json_schema" and "over the limit" in refused.value.message


def test_with_tools_offered_the_default_repeat_penalty_is_left_to_the_server():
    defaults = SamplingDefaults(repeat_penalty=1.1)
    tool = '{"type": "function", "function": {"name": "get_weather"}}'
    assert resolve(SamplingParams(tools=[tool]), defaults).repeat_penalty is None
    assert resolve(SamplingParams(tools=[tool], repeat_penalty=1.3), defaults).repeat_penalty == 1.3
    assert resolve(SamplingParams(tools=[tool], tool_choice="none"), defaults).repeat_penalty == 1.1
    assert resolve(SamplingParams(), defaults).repeat_penalty == 1.1
