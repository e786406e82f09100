// The gpt2lab playground: streams completions from this server's /v1/completions (server-sent events),
// one panel per model, or a conversation through /v1/chat/completions (chat mode); each token is tinted
// by its probability with its top-5 alternatives on hover, tap or keyboard focus. Plain JS, nothing
// fetched from elsewhere, so it works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("form");
const tip = $("tip");
let running = []; // AbortControllers of the requests in flight

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// An error response as an Error: the API's message, and its code (e.g. "context_length_exceeded") as .code.
async function errorOf(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return Object.assign(new Error(body.error.message), { code: body.error.code });
  } catch (e) { /* not JSON: fall through */ }
  return new Error(`HTTP ${resp.status}`);
}

async function loadModels() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) {
    if (resp.status === 401) $("keybox").open = true;
    setStatus((await errorOf(resp)).message);
    return;
  }
  const models = (await resp.json()).data;
  for (const select of [$("model"), $("model2")]) {
    const kept = select.value;
    select.replaceChildren(...models.map((m) => {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = `${m.id} (context ${m.context_length})`;
      opt.dataset.context = m.context_length;
      return opt;
    }));
    if (kept && models.some((m) => m.id === kept)) select.value = kept;
  }
  if (models.length > 1 && !$("model2").dataset.touched) $("model2").selectedIndex = 1;
  setStatus("");
}

function setStatus(text) { $("status").textContent = text; }

// Probability -> background, on a log scale (a language model's tokens are mostly well under 50%): red at
// 0.1% and below, yellow near 3%, green at 100%.
const TINT_FLOOR = 1e-3;
function tint(p) {
  const t = Math.min(1, Math.max(0, 1 - Math.log10(Math.max(p, TINT_FLOOR)) / Math.log10(TINT_FLOOR)));
  const hue = Math.round(120 * t);
  return `hsl(${hue} ${hue > 90 ? 60 : 85}% 82%)`;
}

function pct(p) {
  if (p >= 0.995) return "100%";
  if (p >= 0.1) return (100 * p).toFixed(0) + "%";
  if (p >= 0.001) return (100 * p).toFixed(1) + "%";
  if (p >= 1e-6) return (100 * p).toPrecision(1) + "%";
  return "<0.0001%";
}

function shown(token) {
  // Whitespace made visible, so " the" and "the" and "\n" can be told apart in the alternatives.
  return token.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
}

function makePanel(model, seed) {
  const panel = document.createElement("section");
  panel.className = "panel";
  panel.setAttribute("aria-label", `Output of ${model}`);
  const h2 = document.createElement("h2");
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = model;
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.textContent = `seed ${seed}`;
  h2.append(name, stats);
  const text = document.createElement("div");
  text.className = "text";
  text.setAttribute("aria-live", "off");
  text.setAttribute("aria-label", `Text from ${model}; arrow keys move between tokens`);
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = $("prompt").value;
  text.append(prompt);
  panel.append(h2, text);
  // pos: characters (code points) of completion text received; last: the span text still flows into.
  return { panel, text, stats, model, seed, tokens: 0, pos: 0, last: null };
}

// One streamed chunk: its text, and the tokens whose text starts in it (`text_offset` says where, counted
// from the start of the choice's text). Text before the first of them continues the previous token.
function addChunk(view, text, lp) {
  const chars = Array.from(text); // offsets count code points, as Python's str does
  const start = view.pos;
  view.pos += chars.length;
  const n = lp ? lp.tokens.length : 0;
  const at = (i) => (i < n ? Math.min(chars.length, Math.max(0, lp.text_offset[i] - start)) : chars.length);
  const before = chars.slice(0, at(0)).join("");
  if (before) {
    if (view.last) {
      view.last.textContent += before;
      view.last.classList.toggle("nl", view.last.textContent.includes("\n"));
    } else {
      view.text.append(document.createTextNode(before));
    }
  }
  for (let i = 0; i < n; i++) {
    addToken(view, chars.slice(at(i), at(i + 1)).join(""), lp, i);
  }
  for (const span of view.text.querySelectorAll(".tok.pending")) {
    if (span.textContent) makeFocusable(view, span);
  }
}

function addToken(view, piece, lp, i) {
  const span = document.createElement("span");
  span.className = piece.includes("\n") ? "tok nl" : "tok"; // a newline token shows a mark, to be seen
  span.textContent = piece;
  const p = Math.exp(lp.token_logprobs[i]);
  span.style.background = tint(p);
  span.dataset.token = lp.tokens[i];
  span.dataset.p = p;
  span.dataset.top = JSON.stringify(lp.top_logprobs[i] || {});
  span.setAttribute("aria-label", `${shown(lp.tokens[i])}, probability ${pct(p)}`);
  // A token holding no whole character (the middle bytes of one) is shown but is no stop for the
  // keyboard; it becomes one if later text flows into it.
  if (piece) makeFocusable(view, span);
  else span.classList.add("pending");
  view.text.append(span);
  view.last = span;
  view.tokens += 1;
}

// Roving tab stop: one token per panel is in the tab order; arrow keys, Home and End move between them.
function makeFocusable(view, span) {
  span.classList.remove("pending");
  const first = !view.text.querySelector(".tok[tabindex]");
  span.tabIndex = first ? 0 : -1;
}

function moveFocus(from, to) {
  if (!to) return;
  from.tabIndex = -1;
  to.tabIndex = 0;
  to.focus();
}

function showTip(span) {
  if (!span.dataset.top) return;
  document.querySelectorAll(".tok.active").forEach((s) => s.classList.remove("active"));
  span.classList.add("active");
  const top = Object.entries(JSON.parse(span.dataset.top));
  const head = document.createElement("div");
  head.className = "head";
  const code = document.createElement("code");
  code.textContent = shown(span.dataset.token);
  head.append(code, ` chosen at ${pct(Number(span.dataset.p))}`);
  const table = document.createElement("table");
  for (const [token, logprob] of top) {
    const p = Math.exp(logprob);
    const tr = document.createElement("tr");
    if (token === span.dataset.token) tr.className = "chosen";
    const t = document.createElement("td");
    t.textContent = shown(token);
    const bar = document.createElement("td");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${Math.max(1, Math.round(100 * p))}%`;
    bar.append(fill);
    const pc = document.createElement("td");
    pc.className = "p";
    pc.textContent = pct(p);
    tr.append(t, bar, pc);
    table.append(tr);
  }
  tip.replaceChildren(head, table);
  tip.hidden = false;
  const r = span.getBoundingClientRect();
  const width = tip.offsetWidth;
  const left = Math.min(window.scrollX + r.left, window.scrollX + document.documentElement.clientWidth - width - 8);
  tip.style.left = `${Math.max(window.scrollX + 4, left)}px`;
  tip.style.top = `${window.scrollY + r.bottom + 6}px`;
  span.setAttribute("aria-describedby", "tip");
}

function hideTip() {
  tip.hidden = true;
  document.querySelectorAll(".tok.active").forEach((s) => {
    s.classList.remove("active");
    s.removeAttribute("aria-describedby");
  });
}

// Completion panels and chat replies hold tokens alike: one set of handlers for each container.
const outputs = $("outputs");
for (const box of [outputs, $("conversation")]) {
  box.addEventListener("mouseover", (e) => { if (e.target.classList.contains("tok")) showTip(e.target); });
  box.addEventListener("mouseout", (e) => {
    if (!e.target.classList.contains("tok")) return;
    const focused = document.activeElement; // a tapped or keyboard-focused token keeps its tip
    if (focused && focused.classList.contains("tok")) showTip(focused);
    else hideTip();
  });
  box.addEventListener("focusin", (e) => {
    const t = e.target;
    if (!t.classList.contains("tok")) return;
    t.parentElement.querySelectorAll('.tok[tabindex="0"]').forEach((s) => { if (s !== t) s.tabIndex = -1; });
    t.tabIndex = 0; // Tab comes back to the token last looked at
    showTip(t);
  });
  box.addEventListener("focusout", hideTip);
  box.addEventListener("click", (e) => { if (e.target.classList.contains("tok")) e.target.focus(); });
  box.addEventListener("keydown", (e) => {
    const t = e.target;
    if (!t.classList.contains("tok")) return;
    if (e.key === "Escape") { hideTip(); t.blur(); return; }
    const stops = Array.from(t.parentElement.querySelectorAll(".tok[tabindex]"));
    const i = stops.indexOf(t);
    const to = { ArrowRight: stops[i + 1], ArrowDown: stops[i + 1], ArrowLeft: stops[i - 1], ArrowUp: stops[i - 1],
                 Home: stops[0], End: stops[stops.length - 1] }[e.key];
    if (to) { e.preventDefault(); moveFocus(t, to); }
  });
}

// Stream one request into `view`; `take(view, choice)` adds a streamed choice's text and tokens. Returns
// false when the request failed (the error is shown in the view, its code kept as view.errorCode), true
// when it finished or was stopped.
async function run(view, path, body, take) {
  const ctl = new AbortController();
  running.push(ctl);
  const t0 = performance.now();
  let firstAt = null;
  try {
    const resp = await fetch(path, {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: ctl.signal,
    });
    if (!resp.ok) throw await errorOf(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          if (firstAt === null) firstAt = performance.now();
          take(view, choice);
          if (choice.finish_reason) view.finish = choice.finish_reason;
        }
        const secs = (performance.now() - t0) / 1000;
        view.stats.textContent = `seed ${view.seed} \u00b7 ${view.tokens} tokens \u00b7 ${(view.tokens / secs).toFixed(1)} tok/s`;
      }
    }
    const ttft = firstAt === null ? "" : ` \u00b7 first token ${((firstAt - t0) / 1000).toFixed(2)} s`;
    view.stats.textContent += `${ttft} \u00b7 ${view.finish || "stopped"}`;
    return true;
  } catch (err) {
    if (err.name === "AbortError") {
      view.stats.textContent += " \u00b7 stopped";
      return true;
    } else {
      const div = document.createElement("div");
      div.className = "error";
      div.setAttribute("role", "alert");
      div.textContent = err.message;
      view.panel.append(div);
      view.errorCode = err.code;
      if (/API key/i.test(err.message)) $("keybox").open = true;
      return false;
    }
  } finally {
    running = running.filter((c) => c !== ctl);
  }
}

function num(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

// The request's sampling fields, as the form sets them; an empty seed is drawn here, to be shown.
function sampling() {
  let seed = num("seed");
  if (seed === null) seed = Math.floor(Math.random() * 2 ** 31);
  return {
    temperature: num("temperature") ?? 1,
    top_k: num("top_k") || null,
    top_p: num("top_p") ?? 1,
    max_tokens: num("max_tokens") ?? 64,
    seed,
    stream: true,
  };
}

function busy(on, status) {
  for (const id of ["generate", "send", "clear"]) $(id).disabled = on;
  $("stop").disabled = !on;
  setStatus(status);
}

async function generate() {
  if (running.length) return;
  hideTip();
  const compare = $("compare").checked;
  const models = compare ? [$("model").value, $("model2").value] : [$("model").value];
  const body = { prompt: $("prompt").value, ...sampling(), logprobs: 5 }; // one seed for both panels
  const views = models.map((m) => makePanel(m, body.seed));
  outputs.className = compare ? "two" : "";
  outputs.replaceChildren(...views.map((v) => v.panel));
  busy(true, "generating\u2026");
  const take = (view, choice) => addChunk(view, choice.text, choice.logprobs);
  await Promise.all(views.map((v) => run(v, "/v1/completions", { ...body, model: v.model }, take)));
  busy(false, "done");
}

const chatMode = () => document.body.dataset.mode === "chat"; // chat.js sets it and handles that mode

form.addEventListener("submit", (e) => { e.preventDefault(); if (!chatMode()) generate(); });
form.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); if (!chatMode()) generate(); }
});
$("stop").addEventListener("click", () => running.forEach((c) => c.abort()));
$("compare").addEventListener("change", () => { $("model2-field").hidden = !$("compare").checked; });
$("model2").addEventListener("change", () => { $("model2").dataset.touched = "1"; });
$("apikey").addEventListener("change", loadModels);
loadModels();
