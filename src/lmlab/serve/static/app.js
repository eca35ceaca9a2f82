// lmlab chat page: streams /v1/chat/completions over server-sent events with fetch + ReadableStream.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // {role, content} turns sent back to the server each time
let modelId = null;
let controller = null; // aborts the running request (Stop button)

const sliders = [
  ["temperature", (v) => Number(v).toFixed(2)],
  ["top-p", (v) => Number(v).toFixed(2)],
  ["top-k", (v) => (Number(v) === 0 ? "off" : v)],
  ["max-tokens", (v) => v],
];
for (const [id, show] of sliders) {
  const input = $(id);
  const out = $(id + "-value");
  const update = () => { out.textContent = show(input.value); };
  input.addEventListener("input", update);
  update();
}

$("api-key").value = localStorage.getItem("lmlab-api-key") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("lmlab-api-key", $("api-key").value));

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelId = body.data[0].id;
    $("model-name").textContent = modelId;
  } catch (e) {
    $("model-name").textContent = "unavailable (" + e.message + ")";
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const tag = document.createElement("span");
  tag.className = "role";
  tag.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(tag, body);
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

// Under an answer from `lmlab serve --rag`: its numbered sources, the cited ones marked.
function showSources(bubble, rag) {
  const list = document.createElement("ol");
  list.className = "sources";
  for (const s of rag.sources) {
    const item = document.createElement("li");
    item.value = s.n;
    item.className = rag.citations.includes(s.n) ? "cited" : "";
    const snippet = s.text.length > 160 ? s.text.slice(0, 159) + "…" : s.text;
    item.textContent = `${s.doc_id}: ${snippet}`;
    list.append(item);
  }
  const note = document.createElement("div");
  note.className = "sources-note";
  note.textContent = rag.abstained
    ? "abstained: nothing relevant in the index"
    : `sources (cited: ${rag.citations.length ? rag.citations.map((n) => "[" + n + "]").join(" ") : "none"}` +
      (rag.removed_citations ? `; ${rag.removed_citations} citation(s) to no source removed)` : ")");
  bubble.append(note, list);
}

// Yields each parsed `data:` payload of an SSE body as it arrives.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  if (!modelId) await loadModel();
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  const topK = Number($("top-k").value);
  const body = {
    model: modelId,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  if (topK > 0) body.top_k = topK; // an extension to OpenAI's API, accepted by lmlab serve
  const bubble = addMessage("assistant", "");
  const out = bubble.querySelector(".text");
  bubble.dataset.chunks = "0";
  $("send").disabled = true;
  $("stop").disabled = false;
  $("stats").textContent = "waiting for the first token…";
  controller = new AbortController();
  const started = performance.now();
  let firstAt = null;
  let pieces = 0;
  let tokens = null;
  try {
    // a conversation that outgrew the model's context: the oldest question and answer are left out of
    // the request until it fits, as `lmlab chat` does (they stay on the page); the newest question stays
    let r;
    let dropped = 0;
    for (;;) {
      r = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (r.ok) break;
      const err = await r.json().catch(() => ({}));
      if (err.error && err.error.code === "context_length_exceeded" && history.length > 2) {
        history.splice(0, 2);
        dropped += 2;
        body.messages = (system ? [{ role: "system", content: system }] : []).concat(history);
        continue;
      }
      throw new Error(err.error ? err.error.message : r.status + " " + r.statusText);
    }
    if (dropped) {
      const note = addMessage("note", `the ${dropped} oldest messages no longer fit the model's context: ` +
        "the model does not see them any more");
      $("messages").insertBefore(note, bubble);
    }
    for await (const chunk of sseEvents(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      if (chunk.lmlab_rag) showSources(bubble, chunk.lmlab_rag);
      const choice = chunk.choices && chunk.choices[0];
      const piece = choice && choice.delta && choice.delta.content;
      if (!piece) continue;
      if (firstAt === null) firstAt = performance.now();
      out.textContent += piece;
      pieces += 1;
      bubble.dataset.chunks = String(pieces);
      $("messages").scrollTop = $("messages").scrollHeight;
      const secs = (performance.now() - firstAt) / 1000;
      $("stats").textContent = `${pieces} pieces · ${secs > 0 ? (pieces / secs).toFixed(1) : "–"} tok/s`;
    }
    history.push({ role: "assistant", content: out.textContent });
    const n = tokens !== null ? tokens : pieces;
    const end = performance.now();
    const gen = firstAt !== null ? (end - firstAt) / 1000 : 0;
    const rate = gen > 0 ? ((n - 1) / gen).toFixed(1) : "–";
    const ttft = firstAt !== null ? ((firstAt - started) / 1000).toFixed(2) + " s" : "–";
    $("stats").textContent = `${n} tokens · ${rate} tok/s · first token after ${ttft}`;
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content: out.textContent });
      $("stats").textContent = "stopped";
    } else {
      bubble.className = "msg error";
      out.textContent = "error: " + e.message;
      history.pop(); // the failed turn is not part of the conversation
      $("stats").textContent = "";
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  history.length = 0;
  $("messages").textContent = "";
  $("stats").textContent = "";
});

loadModel();
