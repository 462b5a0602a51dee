// Capibara status page: polls GET /api/status every 2 s and draws it (tables, cards, SVG plots).
// No external code. When the mesh answers 401 it asks for an API key, kept in sessionStorage
// (this tab only); the chat page's key (localStorage) is used when there is one.
// What each figure is computed from: docs/operations.md, "Status page".

const $ = (id) => document.getElementById(id);
const SESSION_KEY = "capibara.statusKey";
const CHAT_PAGE_KEY = "capibara.apiKey";
const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
let timer = null;

function apiKey() {
  return sessionStorage.getItem(SESSION_KEY) || localStorage.getItem(CHAT_PAGE_KEY) || "";
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("data-")) node.dataset[name.slice(5).replace(/-(.)/g, (_, c) => c.toUpperCase())] = value;
    else node[name] = value;
  }
  node.append(...children);
  return node;
}

function svgNode(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

// A small plot, 100 x 30 units stretched to the card: bars for counts, lines for levels.
function sparkline(series, { bars = false, label = "" } = {}) {
  const svg = svgNode("svg", { class: "spark", viewBox: "0 0 100 30", preserveAspectRatio: "none", role: "img" });
  svg.append(svgNode("title", {}), svgNode("line", { class: "axis", x1: 0, y1: 29.5, x2: 100, y2: 29.5 }));
  svg.firstChild.textContent = label;
  const all = series.flat();
  const top = Math.max(1e-9, ...all);
  series.forEach((values, which) => {
    if (!values.length) return;
    const step = 100 / Math.max(values.length - (bars ? 0 : 1), 1);
    if (bars) {
      values.forEach((v, i) => {
        const h = (v / top) * 28;
        svg.append(svgNode("rect", { class: "bar", x: i * step + 0.5, y: 29 - h, width: Math.max(step - 1, 0.5), height: h }));
      });
    } else {
      const points = values.map((v, i) => `${(i * step).toFixed(2)},${(29 - (v / top) * 28).toFixed(2)}`);
      svg.append(svgNode("polyline", { class: which ? "line second" : "line", points: points.join(" ") }));
    }
  });
  return svg;
}

function plot(caption, svg) {
  return element("figure", { class: "plot" }, svg, element("figcaption", {}, caption));
}

function ago(since, now) {
  if (!since) return "not checked yet";
  const s = Math.max(0, Math.round(now - since));
  const text = s < 60 ? `${s} s` : s < 3600 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `for ${text} (since ${new Date(since * 1000).toLocaleTimeString()})`;
}

function pill(status) {
  const shown = { SERVING: "SERVING", DEGRADED: "DEGRADED", UNKNOWN: "UNKNOWN" }[status] || `down (${status})`;
  return element("span", { class: "pill", "data-status": status }, shown);
}

const number = (value, digits = 0) => Number(value || 0).toFixed(digits);

function renderServices(status) {
  $("services").tBodies[0].replaceChildren(
    ...(status.services || []).map((s) =>
      element(
        "tr",
        { "data-service": s.name, "data-status": s.status, title: s.detail || "" },
        element("td", {}, s.name),
        element("td", {}, pill(s.status)),
        element("td", { class: "muted" }, ago(s.since, status.generated_at)),
      ),
    ),
  );
}

function figure(name, value) {
  return [element("dt", {}, name), element("dd", {}, value)];
}

function modelCard(m, now) {
  const minutes = m.minutes || [];
  const load = m.load || [];
  const card = element(
    "article",
    { class: "card", "data-model": m.model_id, "data-status": m.status, "data-requests": String(m.requests || 0) },
    element("h3", {}, element("span", {}, m.model_id), pill(m.status)),
    element("p", { class: "muted" }, ago(m.since, now), m.detail ? ` · ${m.detail}` : ""),
    element(
      "dl",
      { class: "figures" },
      ...figure("Chats", number(m.requests)),
      ...figure("Errors", number(m.errors)),
      ...figure("Failovers away", number(m.failovers)),
      ...figure("Cache hits", number(m.cache_hits)),
      ...figure("First token p50", `${number(m.ttft_p50_ms)} ms`),
      ...figure("First token p95", `${number(m.ttft_p95_ms)} ms`),
      ...figure("Tokens/s", number(m.tokens_per_second, 1)),
      ...figure("Queued / generating", `${number(m.queue_depth)} / ${number(m.active_generations)}`),
    ),
    plot("Chats per minute", sparkline([minutes.map((p) => p.requests || 0)], { bars: true, label: "chats per minute" })),
    plot("First token p95 per minute (ms)", sparkline([minutes.map((p) => p.ttft_p95_ms || 0)], { label: "TTFT p95" })),
    plot(
      "Queued (brown) and generating (green), last minutes",
      sparkline([load.map((p) => p.queue_depth || 0), load.map((p) => p.active_generations || 0)], { label: "queue" }),
    ),
  );
  card.dataset.errors = String(m.errors || 0);
  if ((m.replicas || []).length) card.append(replicaTable(m, now));
  return card;
}

// A model whose servers the inference service balances (backend.balance: affinity): per server,
// chats in flight, conversations pinned to it, affinity hits and fallbacks; then the last choice.
function replicaTable(m, now) {
  const hits = m.replicas.reduce((sum, r) => sum + (r.affinity || 0), 0);
  const fallbacks = m.replicas.reduce((sum, r) => sum + (r.fallback || 0), 0);
  const last = m.last_replica;
  const head = ["Server", "In flight", "Pinned", "Hits", "Fallbacks", "New"].map((h, i) =>
    element("th", { class: i ? "number" : "" }, h),
  );
  const rows = m.replicas.map((r) =>
    element(
      "tr",
      { "data-replica": r.url, "data-up": String(Boolean(r.up)), title: r.up ? "" : "down" },
      element("td", {}, r.url.replace(/^https?:\/\//, ""), r.up ? "" : " (down)"),
      ...[r.in_flight, r.pinned, r.affinity, r.fallback, r.new_conversations].map((v) =>
        element("td", { class: "number" }, number(v)),
      ),
    ),
  );
  const lastText = last
    ? `Last: ${last.url.replace(/^https?:\/\//, "")} (${last.outcome}), ${Math.max(0, Math.round(now - last.at))} s ago`
    : "No chat yet";
  return element(
    "div",
    { class: "replicas" },
    element("table", {}, element("thead", {}, element("tr", {}, ...head)), element("tbody", {}, ...rows)),
    element("p", { class: "muted" }, `Affinity hits ${hits} · fallbacks ${fallbacks} · ${lastText}`),
  );
}

function renderRouting(status) {
  const routes = status.routes || [];
  const most = Math.max(1, ...routes.map((r) => r.requests || 0));
  $("routes").tBodies[0].replaceChildren(
    ...routes.map((r) => {
      const bar = element("div", { class: "route-bar" });
      bar.style.width = `${(100 * (r.requests || 0)) / most}%`;
      return element(
        "tr",
        { "data-route": r.route_name },
        element("td", {}, r.route_name, bar),
        element("td", { class: "number" }, number(r.requests)),
        element("td", { class: "number" }, number(r.mean_confidence, 2)),
        element("td", { class: "number" }, number(r.fallbacks)),
      );
    }),
  );
  const sources = Object.entries(status.routing_sources || {}).map(([k, v]) => `${k} ${v}`);
  $("sources").textContent = sources.length ? `Decided by: ${sources.join(" · ")}` : "No chats in the window yet.";
  const cache = status.cache || {};
  $("cache").textContent =
    `Response cache: ${number(cache.hits)} hits of ${number(cache.answered)} answered chats ` +
    `(${number((cache.hit_rate || 0) * 100, 1)} %)`;
  $("cache").dataset.hitRate = String(cache.hit_rate || 0);
}

function renderMemory(status) {
  $("memory").tBodies[0].replaceChildren(
    ...(status.processes || []).map((p) =>
      element(
        "tr",
        { "data-process": p.name },
        element("td", {}, p.name),
        element("td", { class: "number" }, String(p.pid)),
        element("td", { class: "number" }, `${number(p.rss_mib, 1)} MiB`),
        element("td", { class: "bar-cell" }, sparkline([(p.history || []).map((h) => h.rss_mib)], { label: "RSS" })),
      ),
    ),
  );
}

function renderKeys(status) {
  const keys = status.keys || [];
  $("no-keys").hidden = keys.length > 0;
  $("keys").tBodies[0].replaceChildren(
    ...keys.map((k) =>
      element(
        "tr",
        { "data-key": k.key },
        element("td", {}, k.key),
        element("td", {}, k.model),
        element("td", { class: "number" }, number(k.requests)),
        element("td", { class: "number" }, number(k.errors)),
        element("td", { class: "number" }, `${number(k.prompt_tokens)} / ${number(k.completion_tokens)}`),
      ),
    ),
  );
  const calls = status.key_calls || [];
  $("key-calls").hidden = calls.length === 0;
  $("key-calls").tBodies[0].replaceChildren(
    ...calls.map((c) =>
      element(
        "tr",
        { "data-key": c.key, "data-method": c.method },
        element("td", {}, c.key),
        element("td", {}, c.method),
        element("td", { class: "number" }, number(c.calls)),
        element("td", { class: "number" }, number(c.errors)),
      ),
    ),
  );
}

function render(status) {
  const verdict = $("verdict");
  verdict.replaceWith(Object.assign(pill(status.status), { id: "verdict", title: (status.down || []).join("\n") }));
  $("updated").textContent = `updated ${new Date(status.generated_at * 1000).toLocaleTimeString()}`;
  $("window").textContent = `(last ${Math.round((status.window_s || 0) / 60)} min)`;
  renderServices(status);
  $("models").replaceChildren(...(status.models || []).map((m) => modelCard(m, status.generated_at)));
  renderRouting(status);
  renderMemory(status);
  renderKeys(status);
  document.body.dataset.ready = "true";
  document.body.dataset.updated = String(status.generated_at);
}

function showError(text) {
  $("error").textContent = text || "";
  $("error").hidden = !text;
}

async function poll() {
  clearTimeout(timer);
  try {
    const key = apiKey();
    const response = await fetch("/api/status", { headers: key ? { authorization: `Bearer ${key}` } : {} });
    if (response.status === 401) {
      $("key-form").hidden = false;
      showError(apiKey() ? "The API key was not accepted." : "");
      return; // polling resumes once a key is given
    }
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try { message = (await response.json()).message || message; } catch { /* not JSON */ }
      throw new Error(message);
    }
    $("key-form").hidden = true;
    render(await response.json());
    showError("");
  } catch (error) {
    showError(`Status unavailable: ${error.message}. Retrying…`);
  }
  timer = setTimeout(poll, POLL_MS);
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(SESSION_KEY, $("api-key").value.trim());
  poll();
});

poll();
