// Browser checks of the status page (/status), run by tests/test_status_page.py against a live mesh
// whose API keys are on:
//   node status_page.mjs <base url> <screenshot> <phase> <api key> <json argument>
// phases:
//   overview: the page asks for the key, then shows every service and model (the JSON argument:
//             {services: [...], models: [...]}) as SERVING; prints {"requests": {model: n}}.
//   moved:    every model's chat count passes the one given ({model: n}); the memory table and
//             routing mix are filled; a screenshot is saved.
//   down-up:  the model given ({model: id}) shows as down, then as SERVING again.
// Exits non-zero with a message on the first failed check.
import assert from "node:assert/strict";
import { dirname } from "node:path";
import { mkdirSync } from "node:fs";
import { chromium } from "playwright-core";

const [base, screenshot, phase, key, argument] = process.argv.slice(2);
const expected = JSON.parse(argument || "{}");
mkdirSync(dirname(screenshot), { recursive: true });
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
// A phone-sized screen: the page must be readable there.
const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 390, height: 844 } });
const page = await context.newPage();
page.setDefaultTimeout(90_000);
const problems = [];
// The first poll's 401 (no key yet) is logged by Chromium itself; anything else is a fault.
page.on("console", (m) => m.type() === "error" && !/status of 401/.test(m.text()) && problems.push(m.text()));
page.on("pageerror", (error) => problems.push(String(error)));
const shot = (suffix) => page.screenshot({ path: screenshot.replace(/\.png$/, `${suffix}.png`), fullPage: true });

async function open() {
  await page.goto(`${base}/status`);
  await page.waitForSelector("#key-form:not([hidden])");
  assert.equal(await page.locator("body[data-ready=true]").count(), 0, "figures shown without a key");
  await page.fill("#api-key", key);
  await page.press("#api-key", "Enter");
  await page.waitForSelector("body[data-ready=true]");
  assert.equal(await page.locator("#key-form").isHidden(), true, "the key form stays after a good key");
}

const requests = () =>
  page.evaluate(() =>
    Object.fromEntries([...document.querySelectorAll(".card[data-model]")].map((c) => [c.dataset.model, Number(c.dataset.requests)])),
  );

try {
  await open();
  if (phase === "overview") {
    for (const service of expected.services) {
      await page.waitForSelector(`#services tr[data-service="${service}"][data-status=SERVING]`);
    }
    for (const model of expected.models) {
      await page.waitForSelector(`.card[data-model="${model}"][data-status=SERVING]`);
    }
    const shownServices = await page.locator("#services tr[data-service]").count();
    assert.equal(shownServices, expected.services.length, "services shown");
    assert.equal(await page.locator(".card[data-model]").count(), expected.models.length, "models shown");
    assert.equal(await page.locator("#verdict").getAttribute("data-status"), "SERVING");
    console.log(JSON.stringify({ requests: await requests() }));
  } else if (phase === "moved") {
    await page.waitForFunction(
      (before) =>
        Object.entries(before).every(([model, n]) => {
          const card = document.querySelector(`.card[data-model="${model}"]`);
          return card && Number(card.dataset.requests) > n;
        }),
      expected,
    );
    // The plots carry the new minute: a chats-per-minute bar above zero.
    const bars = await page.locator(".card svg.spark rect.bar").evaluateAll((rects) => rects.filter((r) => Number(r.getAttribute("height")) > 0).length);
    assert.ok(bars > 0, "no chats-per-minute bar drawn");
    await page.waitForSelector("#routes tr[data-route]");
    await page.waitForSelector("#memory tr[data-process]");
    const tokensPerSecond = await page.locator(".card dl.figures dd").allTextContents();
    assert.ok(tokensPerSecond.length > 0);
    await page.screenshot({ path: screenshot, fullPage: true });
    console.log(JSON.stringify({ requests: await requests() }));
  } else if (phase === "down-up") {
    const card = `.card[data-model="${expected.model}"]`;
    await page.waitForSelector(`${card}[data-status=SERVING]`);
    console.log("watching");
    await page.waitForSelector(`${card}:not([data-status=SERVING])`);
    assert.match(await page.locator(`${card} .pill`).textContent(), /down/);
    await shot("-model-down");
    await page.waitForSelector(`${card}[data-status=SERVING]`, { timeout: 180_000 });
    await shot("-model-back");
  } else {
    throw new Error(`unknown phase ${phase}`);
  }
  assert.deepEqual(problems, [], "errors in the page's console");
} catch (error) {
  await shot("-failed").catch(() => {});
  console.error(error.stack || String(error));
  process.exitCode = 1;
} finally {
  await browser.close();
}
