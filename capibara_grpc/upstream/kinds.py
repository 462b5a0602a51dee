"""What each kind of model server understands beyond the OpenAI API, and which of its optional
endpoints the mesh may ask. The mesh never needs an endpoint a server may lack: a server without a
tokenizer gets an estimate, one without a reported window gets the configured or default one.

Sources of each format:
- llama-server: ggml-org/llama.cpp tools/server/README.md (POST /tokenize {content, add_special}
  -> {tokens}; GET /props -> default_generation_settings.n_ctx; GET /health; /v1/chat/completions
  takes top_k, repeat_penalty, cache_prompt and streams `reasoning_content` deltas).
- vLLM: vllm/entrypoints/openai/protocol.py (TokenizeCompletionRequest {model, prompt,
  add_special_tokens} -> TokenizeResponse {count, max_model_len, tokens}; ModelCard.max_model_len
  in GET /v1/models; ChatCompletionRequest's extra sampling params top_k, repetition_penalty) and
  api_server.py (GET /health; /tokenize at the root, not under /v1).
- Ollama: docs/openai.md and openai/openai.go (/v1/chat/completions, /v1/models; no tokenizer,
  no context window over /v1; reasoning arrives as `reasoning` deltas).
- A hosted OpenAI-compatible API: the OpenAI API reference (Chat Completions); only its fields.

Tools (function calling): every kind takes OpenAI's `tools` and the assistant/tool messages, and
streams `delta.tool_calls`. What differs is tool_choice:
- llama-server reads it as a string only (tools/server/server-common.cpp
  oaicompat_chat_params_parse: `json_value(body, "tool_choice", std::string("auto"))`, and
  common_chat_tool_choice_parse_oaicompat takes auto, none, required): an object naming a
  function is a type error that json_value swallows, so it silently becomes "auto".
- Ollama's /v1 (openai/openai.go ChatCompletionRequest) has no tool_choice nor
  parallel_tool_calls field: Go's decoder drops them.
- vLLM (ChatCompletionRequest) takes all of them; "auto" needs the server started with
  --enable-auto-tool-choice and a --tool-call-parser, named and "required" work without
  (guided decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Tokens of a text when the server cannot count them: about 3.5 characters a token, a little
# above the usual 4 for English so that an estimate errs towards leaving room in the window.
CHARS_PER_ESTIMATED_TOKEN = 3.5
DEFAULT_CONTEXT_WINDOW = 4096


@dataclass(frozen=True)
class ServerKind:
    name: str
    # SamplingParams attribute -> the request field this server reads it from, for the sampling
    # settings outside the OpenAI API (a server not listing one is never sent it).
    extra_sampling: dict[str, str] = field(default_factory=dict)
    # Extra fields of every chat request (llama-server: keep the prompt's KV cache across turns).
    extra_fields: dict[str, object] = field(default_factory=dict)
    # With stop strings, ask for llama-server's `verbose` final chunk, whose __verbose.stop_type
    # tells a stop string from end-of-sequence (OpenAI's finish_reason says "stop" for both). Only
    # then: that chunk repeats the whole prompt.
    verbose_for_stop: bool = False
    # Its tokenizer endpoint, at the server's root ("" = none: tokens are estimated).
    tokenize_path: str = ""
    # Where it reports its context window: "props" (llama-server), "models" (vLLM's
    # max_model_len), "" (nowhere: the configured or default window).
    context_window_source: str = ""
    # Health: GET <root>/health (a server that has it), else GET <base>/models with the key.
    has_health: bool = False
    # Takes tool_choice as OpenAI's {"type": "function", "function": {"name": ...}}; a server that
    # does not is sent only the named tool, with tool_choice "required".
    named_tool_choice: bool = True
    # Reads tool_choice at all; a server that does not is sent no tools for tool_choice "none".
    takes_tool_choice: bool = True

    def tokenize_body(self, model_name: str, text: str) -> dict:
        if self.name == "vllm":
            return {"model": model_name, "prompt": text, "add_special_tokens": False}
        return {"content": text, "add_special": False}

    @staticmethod
    def token_count(answer: dict) -> int:
        """vLLM answers with `count`, llama-server with the `tokens` alone."""
        return int(answer["count"]) if "count" in answer else len(answer.get("tokens") or [])


KINDS = {
    "llama_server": ServerKind(
        "llama_server",
        extra_sampling={"top_k": "top_k", "repeat_penalty": "repeat_penalty"},
        extra_fields={"cache_prompt": True},
        verbose_for_stop=True,
        tokenize_path="/tokenize",
        context_window_source="props",
        has_health=True,
        named_tool_choice=False,
    ),
    "vllm": ServerKind(
        "vllm",
        extra_sampling={"top_k": "top_k", "repeat_penalty": "repetition_penalty"},
        tokenize_path="/tokenize",
        context_window_source="models",
        has_health=True,
    ),
    "ollama": ServerKind("ollama", named_tool_choice=False, takes_tool_choice=False),
    "openai": ServerKind("openai"),
}


def estimated_tokens(text: str) -> int:
    return -(-len(text) * 2 // int(CHARS_PER_ESTIMATED_TOKEN * 2)) if text else 0
