// Browser checks of the web chat page, run by tests/test_web_page.py against a live mesh:
//   node web_chat.mjs <base url> <screenshot dir> <phase: main | reasoning | backend-down>
// Exits non-zero with a message on the first failed check.
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const [base, shots, phase] = process.argv.slice(2);
mkdirSync(shots, { recursive: true });
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
// A phone-sized screen: the page must work there.
const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 390, height: 844 } });
const page = await context.newPage();
page.setDefaultTimeout(90_000);
const shot = (name) => page.screenshot({ path: `${shots}/${phase}-${name}.png`, fullPage: true });

async function open() {
  await page.goto(`${base}/`);
  await page.waitForSelector("body[data-ready=true]");
}

async function sendWithKeyboard(text) {
  await page.focus("#message");
  await page.keyboard.type(text);
  await page.keyboard.press("Enter");
}

const lastAnswer = () => page.locator("li.turn.assistant").last();

// Stands in for a reasoning model (the test mesh's SmolLM2 thinks aloud in no separate channel): the
// page's fetch of /api/chat/stream gets an SSE stream, framed as Envoy's gRPC-JSON transcoder frames
// it, that this script writes event by event (send, end) while it looks at the page in between.
// Everything else goes to the mesh.
async function stubChatStream() {
  await page.addInitScript(() => {
    const meshFetch = window.fetch;
    window.fetch = async (input, init) => {
      if (!String(input).endsWith("/api/chat/stream")) return meshFetch(input, init);
      const encoder = new TextEncoder();
      const body = new ReadableStream({
        start(controller) {
          window.sse = {
            request: JSON.parse(init.body),
            send: (event) => controller.enqueue(encoder.encode(`data: ${JSON.stringify(event)}\n\n`)),
            end: () => { window.sse = null; controller.close(); },
          };
        },
      });
      return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
    };
  });
}

const stubbed = {
  async open() {
    await page.waitForFunction(() => window.sse);
    return page.evaluate(() => window.sse.request);
  },
  send: (...events) => page.evaluate((events) => events.forEach((event) => window.sse.send(event)), events),
  end: () => page.evaluate(() => window.sse.end()),
};

const routing = { routing: { model_id: "gpt-oss-20b", route_name: "math", confidence: 0.91, scores: [], fallback: false,
                             reasoning: "router: math", source: "router", failed_models: [] } };
const done = (completion, reasoning) => ({ done: {
  usage: { prompt_tokens: 31, completion_tokens: completion, total_tokens: 31 + completion, reasoning_tokens: reasoning },
  timings: { time_to_first_token_ms: 420, prompt_ms: 35, generation_ms: 700, tokens_per_second: 40, total_ms: 760,
             time_to_first_reasoning_ms: reasoning ? 60 : 0 },
  finish_reason: "FINISH_REASON_STOP", latency_ms: 812.4, model_id: "gpt-oss-20b", cache_hit: "" } });

try {
  if (phase === "main") {
    await open();
    assert.equal(await page.locator("#error").isHidden(), true, "no error on a healthy mesh");

    // 1. Tokens arrive before the answer is complete: record the answer's text at every change.
    await page.evaluate(() => {
      window.seen = [];
      new MutationObserver(() => {
        const turn = [...document.querySelectorAll("li.turn.assistant")].pop();
        if (turn) window.seen.push({ state: turn.dataset.state, length: turn.querySelector(".text").textContent.length });
      }).observe(document.getElementById("conversation"), { subtree: true, childList: true, characterData: true, attributes: true });
    });
    await sendWithKeyboard("Escribe un poema sobre el mar y los capibaras.");
    // No waiting for the streaming state itself: a short answer can stream faster than a poll.
    await shot("1-sent");
    await page.waitForSelector("li.turn.assistant[data-state=done]");
    assert.equal(await lastAnswer().locator("details").count(), 0, "an answer without reasoning has a reasoning fold");
    const finalLength = (await lastAnswer().locator(".text").textContent()).length;
    const partial = await page.evaluate(() => window.seen.filter((s) => s.state === "streaming" && s.length > 0));
    assert.ok(partial.some((s) => s.length < finalLength), `no partial answer was shown (final ${finalLength} chars)`);
    assert.ok(new Set(partial.map((s) => s.length)).size > 1, "the answer did not grow token by token");

    // 2. The route badge.
    const badge = lastAnswer().locator(".badge");
    assert.ok(await badge.getAttribute("data-route"), "badge has no route");
    assert.ok(["gpt-oss-20b", "phi", "mixtral"].includes(await badge.getAttribute("data-model")));
    const confidence = Number(await badge.getAttribute("data-confidence"));
    assert.ok(confidence > 0 && confidence <= 1, `confidence ${confidence}`);
    assert.match(await badge.textContent(), /·/);
    await shot("2-answer");

    // 3. A reload keeps the conversation.
    const id = await page.evaluate(() => localStorage.getItem("capibara.conversation"));
    await open();
    assert.equal(await page.evaluate(() => localStorage.getItem("capibara.conversation")), id);
    await page.waitForSelector("li.turn[data-state=stored]");
    const stored = await page.locator("li.turn[data-state=stored]").allTextContents();
    assert.equal(stored.length, 2, `stored turns after reload: ${stored}`);
    assert.match(stored[0], /poema sobre el mar/);
    await shot("3-reloaded");

    // 4. Play: the audio element gets a playable WAV.
    await sendWithKeyboard("Di hola.");
    await page.waitForSelector("li.turn.assistant[data-state=done] .play");
    await lastAnswer().locator(".play").click();
    await page.waitForSelector("li.turn.assistant audio[src^='blob:']");
    const wav = await page.evaluate(async () => {
      const audio = [...document.querySelectorAll("audio")].pop();
      const bytes = new Uint8Array(await (await fetch(audio.src)).arrayBuffer());
      const text = (from, to) => String.fromCharCode(...bytes.slice(from, to));
      const rate = new DataView(bytes.buffer).getUint32(24, true);
      if (audio.readyState < 1) await new Promise((resolve) => audio.addEventListener("loadedmetadata", resolve, { once: true }));
      return { riff: text(0, 4), wave: text(8, 12), rate, size: bytes.length, duration: audio.duration, error: audio.error };
    });
    assert.equal(wav.riff, "RIFF");
    assert.equal(wav.wave, "WAVE");
    assert.equal(wav.rate, 22050);
    assert.ok(wav.size > 10_000 && wav.duration > 0.2 && !wav.error, JSON.stringify(wav));
    await shot("4-audio");

    // 5. Consensus: each model's candidate and the agreement.
    await page.check("#consensus");
    await sendWithKeyboard("hola");
    await page.waitForSelector("li.turn.assistant[data-state=done] .badge[data-agreement]");
    const candidates = await lastAnswer().locator("li.candidate[data-state=finished]").allTextContents();
    assert.equal(candidates.length, 3, `candidates: ${candidates}`);
    for (const model of ["gpt-oss-20b", "phi", "mixtral"]) {
      assert.ok(candidates.some((c) => c.startsWith(`${model}: `)), `no candidate from ${model}`);
    }
    const agreement = Number(await lastAnswer().locator(".badge").getAttribute("data-agreement"));
    assert.ok(agreement > 0 && agreement <= 1, `agreement ${agreement}`);
    await shot("5-consensus");
    await page.uncheck("#consensus");

    // 6. Erase, with the keyboard: the conversation is gone, here and after a reload.
    await page.focus("#erase");
    await page.keyboard.press("Enter");
    await page.waitForFunction(() => document.querySelectorAll("li.turn").length === 0);
    await open();
    assert.equal(await page.locator("li.turn").count(), 0, "erased turns came back after a reload");
    await shot("6-erased");
  } else if (phase === "reasoning") {
    await stubChatStream();
    await open();
    await sendWithKeyboard("¿Cuánto es 17 × 23?");
    assert.equal((await stubbed.open()).message, "¿Cuánto es 17 × 23?");
    const reasoning = lastAnswer().locator("details.reasoning");
    const answer = lastAnswer().locator(".text");

    // 1. While the model thinks: a closed fold above an empty answer, saying so.
    await stubbed.send(routing, { reasoning: { text: "17 × 23 = 17 × 20 + 17 × 3", index: 0 } });
    await page.waitForFunction(() => document.querySelector("li.turn.assistant:last-child .reasoning-text")
      ?.textContent === "17 × 23 = 17 × 20 + 17 × 3");
    assert.match(await reasoning.locator("summary").textContent(), /Thinking/);
    assert.equal(await reasoning.evaluate((d) => d.open), false, "the reasoning is not folded away");
    assert.equal(await answer.textContent(), "", "reasoning reached the answer");
    await stubbed.send({ reasoning: { text: " = 340 + 51 = 391. <b>not markup</b>", index: 1 } });
    await page.waitForFunction(() => document.querySelector("li.turn.assistant:last-child .reasoning-text")
      ?.textContent.endsWith("<b>not markup</b>"));
    await shot("1-thinking");

    // 2. The answer streams below it (with more thinking in between), and stays only the answer.
    await stubbed.send({ token: { text: "17 × 23 = ", index: 0 } });
    await page.waitForFunction(() => document.querySelector("li.turn.assistant:last-child .text").textContent);
    assert.doesNotMatch(await reasoning.locator("summary").textContent(), /Thinking/, "still thinking while answering");
    await stubbed.send({ reasoning: { text: " Check: 391.", index: 2 } }, { token: { text: "391.", index: 1 } },
                       done(40, 24));
    await stubbed.end();
    await page.waitForSelector("li.turn.assistant[data-state=done]");
    assert.equal(await answer.textContent(), "17 × 23 = 391.");
    assert.equal(await reasoning.locator(".reasoning-text").textContent(),
                 "17 × 23 = 17 × 20 + 17 × 3 = 340 + 51 = 391. <b>not markup</b> Check: 391.");
    assert.equal(await reasoning.locator("b").count(), 0, "model text was parsed as HTML");
    assert.equal(await reasoning.locator("summary").textContent(), "Reasoning (24 tokens)");
    assert.equal(await reasoning.evaluate((d) => d.open), false, "the reasoning unfolded by itself");
    assert.equal(await reasoning.locator(".reasoning-text").isVisible(), false, "folded reasoning is visible");
    const order = await lastAnswer().evaluate((turn) => [...turn.children].map((c) => c.className));
    assert.deepEqual(order, ["badge", "reasoning", "text", "meta"], "the reasoning is not above the answer");
    assert.equal(await lastAnswer().locator(".badge").getAttribute("data-model"), "gpt-oss-20b");
    await shot("2-folded");

    // 3. It opens on demand (keyboard), and Play speaks the answer alone.
    await reasoning.locator("summary").focus();
    await page.keyboard.press("Enter");
    assert.equal(await reasoning.evaluate((d) => d.open), true);
    assert.equal(await reasoning.locator(".reasoning-text").isVisible(), true);
    await shot("3-unfolded");
    const spoken = page.waitForRequest("**/api/tts/speak");
    await lastAnswer().locator(".play").click();
    assert.equal((await spoken).postDataJSON().text, "17 × 23 = 391.");

    // 4. A model without reasoning: no fold at all, as before.
    await sendWithKeyboard("Di hola.");
    await stubbed.open();
    await stubbed.send(routing, { token: { text: "¡Hola!", index: 0 } }, done(3, 0));
    await stubbed.end();
    await page.waitForFunction(() => document.querySelectorAll("li.turn.assistant[data-state=done]").length === 2);
    assert.equal(await lastAnswer().locator("details").count(), 0, "a fold without reasoning");
    assert.equal(await answer.textContent(), "¡Hola!");
    await shot("4-no-reasoning");
  } else if (phase === "backend-down") {
    await open();
    await page.selectOption("#model", "phi");
    await sendWithKeyboard("hola");
    await page.waitForSelector("#error:not([hidden])");
    const error = await page.locator("#error").textContent();
    assert.match(error, /unavailable/i);
    assert.match(error, /phi/);
    assert.equal(await page.locator("li.turn.assistant[data-state=waiting], li.turn.assistant[data-state=streaming]").count(), 0,
                 "an answer is still spinning");
    assert.equal(await page.locator("#send").isEnabled(), true, "the send button stayed disabled");
    await shot("1-error");
  } else {
    throw new Error(`unknown phase ${phase}`);
  }
  console.log(`${phase}: all checks passed`);
} catch (error) {
  await shot("failure").catch(() => {});
  console.error(error.stack || String(error));
  process.exitCode = 1;
} finally {
  await browser.close();
}
