// The playground: reads GET /info, builds the form, streams POST /invocations ("stream": true) into one
// column per sequence, and shows timings, errors and the request as code. Every text from the model or
// the user is inserted as text (textContent / Text nodes), never parsed as HTML.

import { RequestForm } from "/static/form.js";
import { snippet } from "/static/snippets.js";
import { readEvents } from "/static/sse.js";

const KEY_STORE = "gpt2serve.apiKey"; // sessionStorage: this tab only, gone when it closes
const $ = (id) => document.getElementById(id);
let form = null;
let running = null; // {controller} while a generation streams
let tab = "curl";

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

async function call(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401 || response.status === 403) askForKey(response.status);
  return response;
}

function askForKey(status) {
  $("key-panel").hidden = false;
  $("key-message").textContent = status === 401
    ? "This server needs an API key: enter one to send it as “Authorization: Bearer …” (kept in this tab only)."
    : "The server refused this API key (403): enter another one.";
  $("api-key").focus();
}

async function loadInfo() {
  let info;
  try {
    const response = await call("/info");
    if (response.status === 401 || response.status === 403) {
      $("model").textContent = "an API key is needed to read the model's details";
      return; // loaded again once a key is entered
    }
    if (!response.ok) throw new Error(await errorText(response));
    info = await response.json();
  } catch (err) {
    $("model").textContent = `cannot read /info: ${err.message}`;
    setTimeout(loadInfo, 2000);
    return;
  }
  $("version").textContent = `gpt2serve ${info.version}`;
  if (!form) form = new RequestForm($("fields"), info.request, renderSnippet);
  renderSnippet();
  if (!info.ready) {
    $("model").textContent = info.status;
    setTimeout(loadInfo, 1000);
    return;
  }
  const m = info.model;
  $("model").textContent = `${m.name} · ${size(m.parameters)} parameters · ${m.dtype} · ${m.device} · ` +
    `context ${m.context_length} tokens`;
  $("model").title = `${m.layers} layers, ${m.heads} heads, width ${m.width}`;
  const notice = $("random-notice");
  notice.hidden = !m.random_weights;
  const flag = document.createElement("code");
  flag.textContent = "--model gpt2";
  notice.replaceChildren(`${m.name} has random weights: its text is gibberish. It is here to try the API ` +
    "and measure speed; serve a real checkpoint (", flag, " or a directory) for real text.");
}

function size(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`;
  if (n >= 1e6) return `${Math.round(n / 1e6)}M`;
  return `${(n / 1e3).toFixed(1)}k`;
}

async function errorText(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

function renderSnippet() {
  if (!form) return;
  const body = form.body();
  const args = { body, effective: form.effective(body), origin: location.origin, withKey: !!apiKey() };
  $("snippet").textContent = snippet(tab, args);
}

// -- output ---------------------------------------------------------------------------------------

class Columns {
  constructor(prompt, count) {
    this.prompt = prompt;
    this.cards = new Map();
    $("sequences").replaceChildren();
    for (let i = 0; i < count; i++) this.card(i);
  }

  card(index) {
    let card = this.cards.get(index);
    if (card) return card;
    const box = document.createElement("article");
    box.className = "sequence";
    box.dataset.index = String(index);
    const head = document.createElement("header");
    const title = document.createElement("span");
    title.textContent = `#${index + 1}`;
    const state = document.createElement("span");
    state.className = "finish";
    head.append(title, state);
    const text = document.createElement("div");
    text.className = "text";
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    const generated = document.createElement("span");
    generated.className = "generated";
    text.append(prompt, generated);
    box.append(head, text);
    const boxes = [...$("sequences").children];
    const after = boxes.find((b) => Number(b.dataset.index) > index);
    $("sequences").insertBefore(box, after || null);
    card = { box, state, prompt, generated, started: false };
    this.cards.set(index, card);
    return card;
  }

  /** One streamed piece: the first piece of a sequence starts with the prompt. */
  add({ index, text, finish_reason }) {
    const card = this.card(index);
    if (!card.started) {
      card.started = true;
      if (text.startsWith(this.prompt)) {
        card.prompt.textContent = this.prompt;
        text = text.slice(this.prompt.length);
      }
    }
    card.generated.append(text); // a string argument becomes a Text node
    if (finish_reason) this.finish(card, finish_reason);
  }

  finish(card, reason) {
    card.state.textContent = reason;
    card.box.classList.add("finished");
  }

  /** The done event's answer (a list of strings, each the prompt and its continuation) is the truth. */
  done(outputs) {
    if (!Array.isArray(outputs)) return;
    outputs.forEach((full, i) => {
      const card = this.card(i);
      const own = typeof full === "string" && full.startsWith(this.prompt);
      card.prompt.textContent = own ? this.prompt : "";
      card.generated.textContent = own ? full.slice(this.prompt.length) : String(full);
      card.box.classList.add("finished");
    });
  }

  /** Mark the sequences still running as `label` ("stopped", "failed"). */
  endAll(label) {
    for (const card of this.cards.values()) {
      if (!card.box.classList.contains("finished")) card.state.textContent = label;
    }
  }
}

// -- a generation ---------------------------------------------------------------------------------

async function generate() {
  if (running || !form) return;
  form.clearErrors();
  const body = form.body();
  const count = Number.isInteger(body.num_return_sequences) ? body.num_return_sequences
    : form.effective(body).num_return_sequences;
  const columns = new Columns(body.input, Number.isInteger(count) && count > 0 && count <= 16 ? count : 0);
  const controller = new AbortController();
  running = { controller };
  setRunning(true);
  const t0 = performance.now();
  const times = { first: null };
  $("stats").textContent = "generating…";
  try {
    const response = await call("/invocations", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({ ...body, stream: true }),
      signal: controller.signal,
    });
    if (!response.ok) {
      $("sequences").replaceChildren();
      await showEnvelope(response);
      $("stats").textContent = `refused (HTTP ${response.status})`;
      return;
    }
    await consume(response.body, columns, times, t0);
  } catch (err) {
    if (err.name === "AbortError") {
      columns.endAll("stopped");
      $("stats").textContent = `stopped after ${seconds(performance.now() - t0)}`;
    } else {
      form.showError({ message: `the request failed: ${err.message}` });
      $("stats").textContent = "failed";
    }
  } finally {
    running = null;
    setRunning(false);
  }
}

async function consume(stream, columns, times, t0) {
  for await (const { event, data } of readEvents(stream)) {
    if (event === "error") {
      columns.endAll("failed");
      form.showError(data.error || {});
      $("stats").textContent = "the generation failed";
      return;
    }
    if (event === "done") {
      columns.done(data.outputs);
      showStats(times.first - t0, performance.now() - t0, data.usage);
      return;
    }
    if (data && typeof data.index === "number") {
      if (times.first === null) times.first = performance.now();
      columns.add(data);
    }
  }
  $("stats").textContent = "the stream ended without its done event";
}

async function showEnvelope(response) {
  let error;
  try {
    error = (await response.json()).error;
  } catch {
    error = null;
  }
  form.showError(error || { message: `the server answered HTTP ${response.status}` });
}

function showStats(firstMs, totalMs, usage) {
  const parts = [`first token ${seconds(firstMs)}`];
  if (usage) {
    const rate = usage.completion_tokens / (totalMs / 1000);
    parts.push(`${usage.completion_tokens} tokens`, `${rate.toFixed(rate < 100 ? 1 : 0)} tokens/s`);
  }
  parts.push(`total ${seconds(totalMs)}`);
  $("stats").textContent = parts.join(" · ");
}

function seconds(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function setRunning(on) {
  $("generate").disabled = on;
  $("stop").disabled = !on;
  document.body.classList.toggle("running", on);
}

function stop() {
  if (running) running.controller.abort();
}

// -- wiring ---------------------------------------------------------------------------------------

function wire() {
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", stop);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      generate();
    } else if (e.key === "Escape" && running) {
      stop();
    }
  });
  $("key-toggle").addEventListener("click", () => { $("key-panel").hidden = !$("key-panel").hidden; });
  $("api-key").value = apiKey();
  $("key-save").addEventListener("click", () => {
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
    $("key-panel").hidden = true;
    loadInfo();
  });
  $("key-clear").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    $("api-key").value = "";
    renderSnippet();
  });
  for (const button of document.querySelectorAll("[data-tab]")) {
    button.addEventListener("click", () => {
      tab = button.dataset.tab;
      for (const b of document.querySelectorAll("[data-tab]")) b.setAttribute("aria-selected", String(b === button));
      renderSnippet();
    });
  }
  $("copy").addEventListener("click", copySnippet);
}

async function copySnippet() {
  const text = $("snippet").textContent;
  try {
    await navigator.clipboard.writeText(text);
    flash("copied");
  } catch {
    const range = document.createRange(); // no clipboard API (plain http on another host): select it
    range.selectNodeContents($("snippet"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    flash("selected: press Ctrl+C");
  }
}

function flash(text) {
  const button = $("copy");
  button.textContent = text;
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

wire();
loadInfo();
