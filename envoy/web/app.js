// Capibara web chat: streams answers from /api/chat/stream (SSE over fetch, since EventSource
// cannot POST), keeps the conversation id in localStorage, shows routing, a reasoning model's
// thinking (folded away above its answer), consensus candidates, speech and every error the mesh
// reports. No external code: it works offline.

const $ = (id) => document.getElementById(id);
const CONVERSATION_KEY = "capibara.conversation";
const API_KEY = "capibara.apiKey";
let models = [];

function conversationId() {
  let id = localStorage.getItem(CONVERSATION_KEY);
  if (!id) {
    id = crypto.randomUUID();
    localStorage.setItem(CONVERSATION_KEY, id);
  }
  return id;
}

function requestHeaders() {
  const headers = { "content-type": "application/json" };
  const key = localStorage.getItem(API_KEY);
  if (key) headers.authorization = `Bearer ${key}`;
  return headers;
}

async function api(method, path, body) {
  const response = await fetch(path, { method, headers: requestHeaders(), body: body && JSON.stringify(body) });
  if (!response.ok) throw await errorFrom(response);
  return response;
}

// The mesh's errors are JSON {code, message}; say what happened and what to do.
async function errorFrom(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body.message) message = body.message;
  } catch { /* not JSON: keep the status */ }
  const retry = response.headers.get("retry-after");
  const prefix = {
    401: "Not authorized (set the API key)",
    429: "Too many requests",
    503: "A backend is unavailable",
    504: "The answer took too long",
  }[response.status];
  return new Error([prefix, message, retry && `try again in ${retry} s`].filter(Boolean).join(": "));
}

function showError(text) {
  $("error").textContent = text || "";
  $("error").hidden = !text;
}

function addTurn(role, text = "") {
  const turn = document.createElement("li");
  turn.className = `turn ${role}`;
  turn.dataset.role = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  turn.append(body);
  $("conversation").append(turn);
  turn.scrollIntoView({ block: "end" });
  return turn;
}

function addBadge(turn, text, data) {
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.textContent = text;
  Object.assign(badge.dataset, data);
  turn.prepend(badge);
}

function addMeta(turn, text) {
  const meta = document.createElement("div");
  meta.className = "meta";
  const info = document.createElement("span");
  info.textContent = text;
  const play = document.createElement("button");
  play.type = "button";
  play.className = "play";
  play.textContent = "▶ Play";
  play.setAttribute("aria-label", "Speak this answer");
  play.addEventListener("click", () => speak(turn, play));
  meta.append(info, play);
  turn.append(meta);
}

// A reasoning model's thinking: a closed <details> above the answer text, never in it.
function addReasoning(turn) {
  const details = document.createElement("details");
  details.className = "reasoning";
  const summary = document.createElement("summary");
  const body = document.createElement("div");
  body.className = "reasoning-text";
  details.append(summary, body);
  turn.querySelector(".text").before(details);
  return details;
}

function setReasoningState(details, state, tokens) {
  details.dataset.state = state;
  details.querySelector("summary").textContent =
    state === "streaming" ? "Thinking…" : tokens ? `Reasoning (${tokens} tokens)` : "Reasoning";
}

async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data:")) yield JSON.parse(line.slice(5));
      }
    }
  }
}

async function chat(message) {
  const body = { message, conversation_id: conversationId() };
  if ($("model").value) body.model = $("model").value;
  const turn = addTurn("assistant");
  turn.dataset.state = "waiting";
  const text = turn.querySelector(".text");
  let reasoning = null;
  const toolCalls = {}; // index -> the line showing that call, its arguments growing
  try {
    const response = await api("POST", "/api/chat/stream", body);
    for await (const event of serverSentEvents(response)) {
      if (event.routing) {
        const r = event.routing;
        addBadge(turn, `${r.route_name} · ${r.model_id} · ${Math.round(r.confidence * 100)}%`,
                 { route: r.route_name, model: r.model_id, confidence: r.confidence });
        turn.dataset.state = "streaming";
      } else if (event.reasoning) {
        if (!reasoning) reasoning = addReasoning(turn);
        if (reasoning.dataset.state !== "streaming") setReasoningState(reasoning, "streaming");
        reasoning.querySelector(".reasoning-text").textContent += event.reasoning.text;
        turn.dataset.state = "streaming";
      } else if (event.token) {
        if (reasoning?.dataset.state === "streaming") setReasoningState(reasoning, "paused");
        text.textContent += event.token.text;
      } else if (event.tool_call) {
        const call = event.tool_call;
        const index = call.index ?? 0;
        if (!toolCalls[index]) {
          toolCalls[index] = document.createElement("div");
          toolCalls[index].className = "tool-call";
          toolCalls[index].dataset.name = call.name ?? "";
          toolCalls[index].dataset.arguments = "";
          toolCalls[index].style.fontSize = ".85em";
          turn.append(toolCalls[index]);
        }
        const line = toolCalls[index];
        line.dataset.arguments += call.arguments ?? "";
        line.textContent = `tool call: ${line.dataset.name}(${line.dataset.arguments})`;
        turn.dataset.state = "streaming";
      } else if (event.done) {
        turn.dataset.state = "done";
        const usage = event.done.usage;
        if (reasoning) setReasoningState(reasoning, "done", usage.reasoning_tokens);
        addMeta(turn, `${usage.completion_tokens} tokens · ${Math.round(event.done.latency_ms)} ms`);
      } else if (event.error) {
        throw new Error(`${event.error.code}: ${event.error.message}`);
      }
    }
    if (turn.dataset.state !== "done") throw new Error("the answer was cut off");
  } catch (error) {
    turn.dataset.state = "error";
    if (reasoning) setReasoningState(reasoning, "error");
    if (!text.textContent && !reasoning && !Object.keys(toolCalls).length) turn.remove();
    throw error;
  }
}

async function consensus(message) {
  const chosen = models.filter((m) => m.healthy).map((m) => m.model_id);
  const turn = addTurn("assistant");
  turn.dataset.state = "waiting";
  const list = document.createElement("ol");
  list.className = "candidates";
  list.setAttribute("aria-label", "Candidates");
  turn.append(list);
  const rows = {};
  const row = (model) => {
    if (!rows[model]) {
      rows[model] = list.appendChild(document.createElement("li"));
      rows[model].className = "candidate";
      rows[model].dataset.model = model;
    }
    return rows[model];
  };
  try {
    const response = await api("POST", "/api/consensus/stream",
                               { prompt: message, models: chosen, strategy: "STRATEGY_VOTE" });
    for await (const event of serverSentEvents(response)) {
      if (event.started) {
        row(event.started.model_id).textContent = `${event.started.model_id}: …`;
        turn.dataset.state = "streaming";
      } else if (event.finished) {
        const item = row(event.finished.model_id);
        item.dataset.state = "finished";
        item.textContent = `${event.finished.model_id}: ${event.finished.text}`;
      } else if (event.failed) {
        row(event.failed.model_id).textContent = `${event.failed.model_id}: failed (${event.failed.code}: ${event.failed.message})`;
      } else if (event.final) {
        const f = event.final;
        turn.querySelector(".text").textContent = f.text;
        addBadge(turn, `consensus · ${f.chosen_model_id} · agreement ${Math.round(f.agreement * 100)}%`,
                 { route: "consensus", model: f.chosen_model_id, agreement: f.agreement });
        turn.dataset.state = "done";
        addMeta(turn, f.reasoning);
      } else if (event.error) {
        throw new Error(`${event.error.code}: ${event.error.message}`);
      }
    }
    if (turn.dataset.state !== "done") throw new Error("the consensus was cut off");
  } catch (error) {
    turn.dataset.state = "error";
    throw error;
  }
}

async function speak(turn, button) {
  button.disabled = true;
  try {
    const text = turn.querySelector(".text").textContent;
    const response = await api("POST", "/api/tts/speak", { text });
    let audio = turn.querySelector("audio");
    if (!audio) {
      audio = document.createElement("audio");
      audio.controls = true;
      turn.append(audio);
    }
    audio.src = URL.createObjectURL(await response.blob());
    await audio.play().catch(() => { /* autoplay may be refused; the controls are there */ });
  } catch (error) {
    showError(error.message);
  } finally {
    button.disabled = false;
  }
}

async function send(event) {
  event.preventDefault();
  const message = $("message").value.trim();
  if (!message) return;
  showError("");
  $("send").disabled = true;
  $("message").value = "";
  addTurn("user", message);
  try {
    await ($("consensus").checked ? consensus(message) : chat(message));
  } catch (error) {
    showError(error.message);
  } finally {
    $("send").disabled = false;
    $("message").focus();
  }
}

async function loadHistory() {
  const response = await api("GET", `/api/conversations/${encodeURIComponent(conversationId())}`);
  for (const turn of (await response.json()).turns) {
    addTurn(turn.role === "ROLE_USER" ? "user" : "assistant", turn.content).dataset.state = "stored";
  }
}

async function loadModels() {
  const response = await api("GET", "/api/models");
  models = (await response.json()).models;
  for (const model of models) {
    const option = document.createElement("option");
    option.value = model.model_id;
    option.textContent = model.model_id + (model.healthy ? "" : " (down)");
    $("model").append(option);
  }
}

async function erase() {
  try {
    await api("DELETE", `/api/conversations/${encodeURIComponent(conversationId())}`);
    localStorage.removeItem(CONVERSATION_KEY);
    $("conversation").replaceChildren();
    showError("");
  } catch (error) {
    showError(error.message);
  }
}

$("composer").addEventListener("submit", send);
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("erase").addEventListener("click", erase);
$("api-key").value = localStorage.getItem(API_KEY) || "";
$("api-key").addEventListener("change", () => localStorage.setItem(API_KEY, $("api-key").value.trim()));
Promise.all([loadModels(), loadHistory()])
  .catch((error) => showError(error.message))
  .finally(() => document.body.dataset.ready = "true");
