// tinyomni chat page: talks to this server's OpenAI-compatible API with streaming (SSE over fetch).
// The conversation lives here (`history`) and is sent whole each turn, images and audio included,
// as OpenAI content parts: image_url with a data URL, input_audio with base64 and a format.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];      // OpenAI messages of the conversation so far
let attachments = [];    // pending {kind: "image", url, name} | {kind: "audio", data, format, url, name}
let controller = null;   // AbortController of the answer being streamed
let recorder = null;     // MediaRecorder while recording

// --- settings (kept in localStorage) --------------------------------------------------------------
for (const id of ["temperature", "max-tokens", "api-key", "system-prompt"]) {
  const saved = localStorage.getItem("tinyomni." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("tinyomni." + id, $(id).value));
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

async function loadModel() {
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    $("model-name").textContent = body.data[0].id;
  } catch (e) {
    $("model-name").textContent = "model unknown";
    setStatus("Could not list models: " + e.message);
  }
}

// --- attachments ----------------------------------------------------------------------------------
function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function audioFormat(type, name) {
  // The server sniffs the bytes anyway; the format names the container for OpenAI compatibility.
  const ext = (name || "").split(".").pop().toLowerCase();
  const known = ["wav", "mp3", "flac", "ogg", "oga", "opus", "webm", "weba", "m4a", "mp4", "aac"];
  if (known.includes(ext)) return ext;
  const sub = (type || "").split("/")[1] || "";
  const base = sub.split(";")[0].replace("x-", "").replace("mpeg", "mp3").replace("wave", "wav");
  return known.includes(base) ? base : "wav";
}

async function addFiles(files) {
  for (const file of files) {
    if (file.type.startsWith("image/")) {
      attachments.push({kind: "image", url: await readAsDataURL(file), name: file.name});
    } else if (file.type.startsWith("audio/") || /\.(wav|mp3|flac|ogg|oga|opus|webm|m4a)$/i.test(file.name)) {
      await addAudio(file, file.name);
    } else {
      setStatus(`${file.name}: not an image or audio file`);
    }
  }
  renderAttachments();
}

async function addAudio(blob, name) {
  const url = await readAsDataURL(blob);
  attachments.push({kind: "audio", data: url.slice(url.indexOf(",") + 1),
                    format: audioFormat(blob.type, name), url: URL.createObjectURL(blob), name});
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  attachments.forEach((item, i) => {
    const div = document.createElement("div");
    div.className = "attachment " + item.kind;
    if (item.kind === "image") {
      const img = document.createElement("img");
      img.src = item.url; img.alt = item.name || "image";
      div.append(img);
    } else {
      const audio = document.createElement("audio");
      audio.controls = true; audio.src = item.url;
      div.append(audio, item.name || "recording");
    }
    const remove = document.createElement("button");
    remove.type = "button"; remove.className = "remove"; remove.textContent = "×";
    remove.title = "Remove";
    remove.onclick = () => { attachments.splice(i, 1); renderAttachments(); };
    div.append(remove);
    box.append(div);
  });
}

$("image-input").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
$("audio-input").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });

// Drag and drop anywhere on the page.
let dragDepth = 0;
window.addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; $("drop-overlay").hidden = false; });
window.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("drop-overlay").hidden = true; } });
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault(); dragDepth = 0; $("drop-overlay").hidden = true;
  if (e.dataTransfer && e.dataTransfer.files.length) addFiles(e.dataTransfer.files);
});
// Pasting an image works too.
$("prompt").addEventListener("paste", (e) => {
  const files = [...(e.clipboardData ? e.clipboardData.files : [])];
  if (files.length) { e.preventDefault(); addFiles(files); }
});

// --- microphone -----------------------------------------------------------------------------------
$("record").addEventListener("click", async () => {
  if (recorder) { recorder.stop(); return; }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    setStatus("Recording needs a browser with MediaRecorder, on localhost or https.");
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({audio: true});
  } catch (e) {
    setStatus("Microphone unavailable: " + e.message);
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    const blob = new Blob(chunks, {type: recorder.mimeType || "audio/webm"});
    recorder = null;
    $("record").classList.remove("recording");
    // webm/ogg from the browser: the server decodes them with PyAV.
    await addAudio(blob, "recording." + audioFormat(blob.type, ""));
    renderAttachments();
    setStatus("");
  };
  recorder.start();
  $("record").classList.add("recording");
  setStatus("Recording… click the microphone again to stop.");
});

// --- messages -------------------------------------------------------------------------------------
function addBubble(role, text, media) {
  $("empty").hidden = true;
  const div = document.createElement("div");
  div.className = "message " + role;
  if (media && media.length) {
    const box = document.createElement("div");
    box.className = "media";
    for (const item of media) {
      if (item.kind === "image") {
        const img = document.createElement("img");
        img.src = item.url; img.alt = item.name || "image";
        box.append(img);
      } else {
        const audio = document.createElement("audio");
        audio.controls = true; audio.src = item.url;
        box.append(audio);
      }
    }
    div.append(box);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.append(span);
  $("messages").append(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function userContent(text, media) {
  const parts = [];
  for (const item of media) {
    if (item.kind === "image") parts.push({type: "image_url", image_url: {url: item.url}});
    else parts.push({type: "input_audio", input_audio: {data: item.data, format: item.format}});
  }
  if (text) parts.push({type: "text", text});
  // Plain text stays a string, as most clients send it.
  return parts.length === 1 && parts[0].type === "text" ? text : parts;
}

async function* sseEvents(response) {
  // Server-sent events over fetch: split on blank lines, yield each `data:` payload.
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield data;
    }
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = busy;
}

async function send() {
  const text = $("prompt").value.trim();
  if (controller || (!text && !attachments.length)) return;
  const media = attachments;
  attachments = [];
  renderAttachments();
  $("prompt").value = "";
  autosize();
  addBubble("user", text, media);
  history.push({role: "user", content: userContent(text, media)});

  const system = $("system-prompt").value.trim();
  const body = {
    messages: system ? [{role: "system", content: system}, ...history] : history,
    stream: true,
    stream_options: {include_usage: true},
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  const bubble = addBubble("assistant streaming", "");
  const span = bubble.querySelector(".text");
  controller = new AbortController();
  setBusy(true);
  setStatus("Thinking…");
  const started = performance.now();
  let firstToken = null, answer = "", usage = null, finish = null;
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
                                                   body: JSON.stringify(body), signal: controller.signal});
    if (!r.ok) {
      let message = r.status + " " + r.statusText;
      try { const e = await r.json(); if (e.error) message = e.error.message; } catch (_) { /* not JSON */ }
      if (r.status === 401) {  // the server wants a key: show where it goes
        $("settings").open = true;
        $("api-key").focus();
        message += " (enter the API key in Settings)";
      }
      throw new Error(message);
    }
    setStatus("");
    for await (const data of sseEvents(r)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        if (firstToken === null) firstToken = performance.now();
        answer += choice.delta.content;
        span.textContent = answer;
        bubble.scrollIntoView({block: "end"});
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    history.push({role: "assistant", content: answer});
    const meta = document.createElement("div");
    meta.className = "meta";
    const seconds = (performance.now() - (firstToken || started)) / 1000;
    if (usage) {
      meta.textContent = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} answer tokens` +
        (usage.completion_tokens > 1 && seconds > 0 ? ` · ${(usage.completion_tokens / seconds).toFixed(1)} tok/s` : "") +
        (finish === "length" ? " · stopped at max tokens" : "");
    }
    bubble.append(meta);
    bubble.dataset.done = "true";
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({role: "assistant", content: answer});  // keep what was said so far
      bubble.dataset.done = "true";
    } else {
      bubble.remove();
      history.pop();  // the failed turn is not part of the conversation
      addBubble("error", "Error: " + e.message);
    }
  } finally {
    bubble.classList.remove("streaming");
    controller = null;
    setBusy(false);
    setStatus("");
    if (!$("settings").open) $("prompt").focus();
  }
}

function reset() {
  if (controller) controller.abort();
  history.length = 0;
  attachments = [];
  renderAttachments();
  document.querySelectorAll("#messages .message").forEach((m) => m.remove());
  $("empty").hidden = false;
  setStatus("");
  $("prompt").focus();
}

function autosize() {
  const box = $("prompt");
  box.style.height = "auto";
  box.style.height = Math.min(box.scrollHeight + 2, 200) + "px";
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("prompt").addEventListener("input", autosize);
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("reset").addEventListener("click", reset);
$("api-key").addEventListener("change", loadModel);
loadModel();
$("prompt").focus();
