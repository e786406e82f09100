// The playground's chat mode: a conversation with a chat model through /v1/chat/completions, each reply
// streamed into a view like a completion panel's (app.js: run, addChunk, the tint and the tips), so its
// tokens carry the same probability tint and alternatives. Loaded after app.js, whose functions it uses.
"use strict";

// The conversation so far: {role, content} as /v1/chat/completions takes them, each with its turn on the
// page (el) and whether it was dropped, for it no longer fits in the model's context with the reply.
let chatHistory = [];

function addTurn(role, who, content) {
  const turn = document.createElement("div");
  turn.className = `turn ${role}`;
  const head = document.createElement("div");
  head.className = "who";
  const name = document.createElement("span");
  name.textContent = who;
  head.append(name);
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = content;
  turn.append(head, text);
  $("conversation").append(turn);
  return { turn, head, text };
}

function makeReply(model, seed) {
  const { turn, head, text } = addTurn("assistant", model, "");
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.textContent = `seed ${seed}`;
  head.append(stats);
  text.setAttribute("aria-label", `Reply from ${model}; arrow keys move between tokens`);
  // As makePanel's view, plus the reply's text and where the UTF-8 decoding of its tokens stands.
  return { panel: turn, text, stats, model, seed, tokens: 0, pos: 0, last: null, reply: "", utf8: { chars: 0, pending: 0 } };
}

// Where a token's text starts, in characters of the reply, from the token bytes chat's logprobs carry (the
// server's text.py counts the same way): a character belongs to the token holding its first byte.
function textOffset(utf8, bytes) {
  const start = utf8.chars + (utf8.pending > 0 ? 1 : 0);
  for (const b of bytes) {
    if (utf8.pending > 0 && (b & 0xc0) === 0x80) {
      utf8.pending -= 1;
      if (utf8.pending === 0) utf8.chars += 1;
      continue;
    }
    if (utf8.pending > 0) utf8.chars += 1; // an unfinished character, shown as U+FFFD
    utf8.pending = b >= 0xf0 ? 3 : b >= 0xe0 ? 2 : b >= 0xc0 ? 1 : 0;
    if (utf8.pending === 0) utf8.chars += 1;
  }
  return start;
}

// A chat chunk's choice in the completions' form addChunk takes: chat's logprobs.content becomes tokens,
// token_logprobs, top_logprobs and text_offset.
function takeChat(view, choice) {
  const text = choice.delta.content || "";
  const content = choice.logprobs ? choice.logprobs.content : [];
  view.reply += text;
  if (!text && !content.length) return;
  const lp = {
    tokens: content.map((t) => t.token),
    token_logprobs: content.map((t) => t.logprob),
    top_logprobs: content.map((t) => Object.fromEntries(t.top_logprobs.map((a) => [a.token, a.logprob]))),
    text_offset: content.map((t) => textOffset(view.utf8, t.bytes)),
  };
  addChunk(view, text, lp);
}

// Leave the oldest turn still sent (a user message and the reply to it) out of the conversation, as
// `gpt2lab chat` does when the context is full; its turns stay on the page, dimmed. False: none is left.
function dropOldestTurn() {
  const kept = chatHistory.filter((m) => !m.dropped);
  if (!kept.length) return false;
  const next = kept.findIndex((m, i) => i > 0 && m.role === "user");
  for (const m of next < 0 ? kept : kept.slice(0, next)) {
    m.dropped = true;
    m.el.classList.add("dropped");
    m.el.title = "no longer fits in the model's context: left out of the conversation";
  }
  return true;
}

async function send() {
  const content = $("message").value;
  if (running.length || !content.trim()) return;
  hideTip();
  const system = $("system").value.trim() ? [{ role: "system", content: $("system").value }] : [];
  const body = { model: $("model").value, ...sampling(), logprobs: true, top_logprobs: 5 };
  const asked = addTurn("user", "You", content);
  $("message").value = "";
  busy(true, "replying\u2026");
  for (;;) {
    const sent = chatHistory.filter((m) => !m.dropped).map(({ role, content }) => ({ role, content }));
    body.messages = [...system, ...sent, { role: "user", content }];
    const view = makeReply(body.model, body.seed);
    if (await run(view, "/v1/chat/completions", body, takeChat)) {
      chatHistory.push({ role: "user", content, el: asked.turn }, { role: "assistant", content: view.reply, el: view.panel });
      break;
    }
    if (view.errorCode === "context_length_exceeded" && dropOldestTurn()) {
      view.panel.remove(); // the same message again, without the oldest turn
      continue;
    }
    // Left out of the conversation; the message is back in the box to try again.
    asked.turn.classList.add("failed");
    view.panel.classList.add("failed");
    $("message").value = content;
    break;
  }
  busy(false, "done");
}

function clearChat() {
  if (running.length) return;
  hideTip();
  chatHistory = [];
  $("conversation").replaceChildren();
  setStatus("");
  $("message").focus();
}

function setMode() {
  document.body.dataset.mode = $("mode-chat").checked ? "chat" : "completion";
  hideTip();
}

form.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && chatMode()) send();
});
$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
$("send").addEventListener("click", send);
$("clear").addEventListener("click", clearChat);
$("mode-completion").addEventListener("change", setMode);
$("mode-chat").addEventListener("change", setMode);
setMode();
