// herd's chat page: plain browser JavaScript over the server's own OpenAI API (no build step, no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], images: [], controller: null };

$("api-key").value = sessionStorage.getItem("herd-api-key") || "";

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

async function loadModel() {
  state.model = null;
  const resp = await fetch("/v1/models", { headers: headers() });
  if (resp.status === 401) {
    $("key-row").hidden = false;
    $("model").textContent = "(API key needed)";
    showError("This server was started with --api-key: enter the key on the left.");
    return;
  }
  if (!resp.ok) {
    showError("GET /v1/models answered " + resp.status);
    return;
  }
  const model = (await resp.json()).data[0].id;
  const info = await fetch("/get_model_info", { headers: headers() });
  if (info.ok) $("image-label").hidden = !(await info.json()).has_image_understanding;
  state.model = model;
  $("model").textContent = model;
  hideError();
}

function addBubble(role, text, images) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  for (const url of images || []) {
    const img = document.createElement("img");
    img.src = url;
    div.appendChild(img);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function renderAssistant(bubble, text, calls) {
  bubble.querySelector(".text").textContent = text;
  bubble.querySelectorAll(".tool-call").forEach((el) => el.remove());
  for (const call of Object.values(calls)) {
    const el = document.createElement("div");
    el.className = "tool-call";
    el.textContent = "call " + call.name + "(" + call.arguments + ")";
    bubble.appendChild(el);
  }
  $("messages").scrollTop = $("messages").scrollHeight;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  const body = {
    model: state.model,
    messages: messages.concat(state.history),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  const tools = $("tools").value.trim();
  if (tools) body.tools = JSON.parse(tools); // a SyntaxError is shown to the user
  return body;
}

// Server-sent events from a fetch body: yields each `data:` payload but [DONE].
async function* events(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data:") && line.slice(5).trim() !== "[DONE]") yield JSON.parse(line.slice(5));
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if ((!text && !state.images.length) || state.controller) return;
  if (!state.model) await loadModel();
  if (!state.model) return;
  const images = state.images;
  const content = images.length
    ? images.map((url) => ({ type: "image_url", image_url: { url } })).concat([{ type: "text", text }])
    : text;
  let body;
  try {
    state.history.push({ role: "user", content });
    body = requestBody();
  } catch (e) {
    state.history.pop();
    showError("Tools: " + e.message);
    return;
  }
  hideError();
  addBubble("user", text, images);
  $("input").value = "";
  state.images = [];
  $("attachments").replaceChildren();
  const bubble = addBubble("assistant", "");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const start = performance.now();
  let first = null;
  let reply = "";
  let deltas = 0;
  let usage = null;
  const calls = {};
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => null);
      throw new Error((err && err.error && err.error.message) || resp.status + " " + resp.statusText);
    }
    for await (const chunk of events(resp)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.content || delta.tool_calls) {
          if (first === null) first = performance.now();
          deltas += 1;
        }
        if (delta.content) reply += delta.content;
        for (const tc of delta.tool_calls || []) {
          const call = (calls[tc.index] ??= { id: tc.id, name: "", arguments: "" });
          if (tc.function && tc.function.name) call.name += tc.function.name;
          if (tc.function && tc.function.arguments) call.arguments += tc.function.arguments;
        }
        renderAssistant(bubble, reply, calls);
      }
    }
    bubble.dataset.done = "1";
  } catch (e) {
    if (e.name === "AbortError") {
      bubble.classList.add("stopped");
      bubble.dataset.done = "1";
    } else {
      showError(e.message);
      bubble.remove();
      state.history.pop();
      return;
    }
  } finally {
    state.controller = null;
    setBusy(false);
    showStats(start, first, performance.now(), usage ? usage.completion_tokens : deltas);
  }
  const message = { role: "assistant", content: reply };
  const toolCalls = Object.values(calls);
  if (toolCalls.length) {
    message.tool_calls = toolCalls.map((c) => ({ id: c.id, type: "function", function: { name: c.name, arguments: c.arguments } }));
  }
  state.history.push(message);
}

function showStats(start, first, end, tokens) {
  if (first === null) {
    $("stats").textContent = "";
    return;
  }
  const ttft = (first - start) / 1000;
  const rate = tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : 0;
  $("stats").textContent = "TTFT " + ttft.toFixed(2) + " s · " + rate.toFixed(1) + " tokens/s · " + tokens + " tokens";
}

$("composer").addEventListener("submit", send);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  state.history = [];
  $("messages").replaceChildren();
  $("stats").textContent = "";
});
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("herd-api-key", $("api-key").value.trim());
  loadModel();
});
$("image").addEventListener("change", () => {
  for (const file of $("image").files) {
    const reader = new FileReader();
    reader.onload = () => {
      state.images.push(reader.result);
      const img = document.createElement("img");
      img.src = reader.result;
      $("attachments").appendChild(img);
    };
    reader.readAsDataURL(file);
  }
  $("image").value = "";
});

loadModel();
