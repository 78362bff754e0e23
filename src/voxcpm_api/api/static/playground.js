// VoxCPM playground: plain JS, no build step. Talks to the API of the server that serves this page.
// Paths are relative, so the page also works behind a reverse proxy that mounts the API under a prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "voxcpm.apiKey";
const MAX_GET_URL = 6000;  // longer texts are streamed with POST (request lines are limited in size)

let apiKey = localStorage.getItem(KEY_STORE) || "";
let streamRoute = true;    // false once /synthesize/stream turns out not to exist (404 Not Found / 405)
let voicesRoute = false;   // true once GET /voices answered
let voices = [];           // GET /voices entries: name plus the voice's default settings
let playToken = 0;         // a new playback makes older ones stop feeding the player
let playerUrl = null;      // object URL owned by the player (MediaSource or blob)
let downloadUrl = null;    // object URL behind "Download this audio"
let polling = false;
let lastPollError = "";
const taskRows = new Map();

// ---- API helpers ---------------------------------------------------------------------------

function withKey(headers = {}) {
  return apiKey ? { ...headers, Authorization: `Bearer ${apiKey}` } : headers;
}

async function toError(res) {
  let detail = res.statusText || "request failed";
  try {
    const body = await res.json();
    if (typeof body.detail === "string") detail = body.detail;
    else if (Array.isArray(body.detail)) {  // FastAPI validation errors
      detail = body.detail.map((e) => `${(e.loc || []).filter((p) => p !== "body" && p !== "query").join(".")}: ${e.msg}`)
        .join("\n");
    }
  } catch (_) { /* not JSON */ }
  const err = new Error(res.status === 401 ? `${detail}. Enter the API key at the top of the page.` : detail);
  err.status = res.status;
  err.routeMissing = res.status === 405 || (res.status === 404 && detail === "Not Found");
  return err;
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: withKey(options.headers) });
  if (!res.ok) throw await toError(res);
  return res;
}

async function apiJson(path, body, method = "POST") {
  const res = await api(path, { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  return res.json();
}

function showError(message) {
  const box = $("error");
  if (!message) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = message;
  box.hidden = false;
}

function setStatus(text) { $("player-status").textContent = text; }

async function busy(button, work) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try { return await work(); } catch (e) { showError(e.message); return undefined; } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

// ---- server state: health, LoRAs, voices -------------------------------------------------------

async function loadHealth() {
  try {
    const h = await (await fetch("health")).json();
    const where = [h.model, h.device].filter(Boolean).join(" on ");
    $("health").textContent = h.status !== "healthy" ? `Server unhealthy: ${h.error || "see the server log"}`
      : h.model_loaded ? `Ready · ${where}` : "Model loading…";
    if (h.status === "healthy" && !h.model_loaded) setTimeout(loadHealth, 2000);
  } catch (e) {
    $("health").textContent = `Server unreachable: ${e.message}`;
  }
}

function fillSelect(select, names, emptyLabel) {
  const keep = select.value;
  select.replaceChildren(new Option(emptyLabel, ""), ...names.map((n) => new Option(n, n)));
  if (names.includes(keep)) select.value = keep;
}

async function loadLoras() {
  const body = await (await api("loras")).json();
  fillSelect($("lora"), body.loras, "(base model)");
}

async function loadVoices() {
  let body;
  try {
    body = await (await api("voices")).json();
  } catch (e) {
    if (e.routeMissing) { setVoicesAvailable(false); return; }
    throw e;
  }
  setVoicesAvailable(true);
  voices = body.voices || [];
  const names = voices.map((v) => v.name);
  fillSelect($("voice"), names, "(none)");
  $("voice-list").replaceChildren(...names.map((name) => {
    const li = document.createElement("li");
    const label = document.createElement("span");
    const v = voices.find((x) => x.name === name);
    label.textContent = v.duration_s ? `${name} (${v.duration_s.toFixed(1)} s)` : name;
    const del = document.createElement("button");
    del.type = "button";
    del.className = "small";
    del.textContent = "Delete";
    del.setAttribute("aria-label", `Delete voice ${name}`);
    del.addEventListener("click", () => busy(del, async () => {
      if (!window.confirm(`Delete the saved voice "${name}"?`)) return;
      await api(`voices/${encodeURIComponent(name)}`, { method: "DELETE" });
      await loadVoices();
    }));
    li.append(label, del);
    return li;
  }));
  if (!names.length) $("voice-list").replaceChildren(Object.assign(document.createElement("li"),
    { className: "muted", textContent: "No saved voices yet." }));
}

function setVoicesAvailable(available) {
  voicesRoute = available;
  $("voice-field").hidden = !available;
  $("voices").hidden = !available;
}

async function loadAll() {
  showError("");
  lastPollError = "";
  loadHealth();
  const results = await Promise.allSettled([loadLoras(), loadVoices(), refreshTasks()]);
  const failed = results.find((r) => r.status === "rejected");
  if (failed) showError(failed.reason.message);
}

// ---- synthesis -----------------------------------------------------------------------------

function params() {
  const p = {
    text: $("text").value,
    lora_name: $("lora").value || null,
    voice: voicesRoute ? $("voice").value || null : null,
    cfg_scale: Number($("cfg").value),
    steps: Number($("steps").value),
    seed: Number($("seed").value),
    response_format: $("format").value,
  };
  for (const k of Object.keys(p)) if (p[k] === null) delete p[k];
  return p;
}

function resetPlayer() {
  const audio = $("player");
  audio.pause();
  audio.removeAttribute("src");
  audio.load();
  if (playerUrl) URL.revokeObjectURL(playerUrl);
  playerUrl = null;
  $("player-download").hidden = true;
}

// mode ("stream-url", "mediasource", "blob", "file") tells how the audio got here (shown to tests and devtools).
function setPlayerSource(src, owned, mode) {
  const audio = $("player");
  audio.dataset.mode = mode;
  if (owned) playerUrl = src;
  audio.src = src;
  audio.play().catch(() => setStatus("Ready: press play to listen."));
}

function offerDownload(blob, filename) {
  if (downloadUrl) URL.revokeObjectURL(downloadUrl);
  downloadUrl = URL.createObjectURL(blob);
  const link = $("player-download");
  Object.assign(link, { href: downloadUrl, download: filename, hidden: false });
}

// Resolves once the player knows the audio's duration; rejects if the element cannot load it.
function metadataLoaded(url) {
  const audio = $("player");
  return new Promise((resolve, reject) => {
    const done = () => { audio.removeEventListener("loadedmetadata", ok); audio.removeEventListener("error", bad); };
    const ok = () => { done(); resolve(); };
    const bad = async () => {
      done();
      if (!url) { reject(new Error("the browser cannot play this audio; try another format or download it")); return; }
      // The element tells nothing about HTTP errors: ask once, and drop the body after the headers.
      const abort = new AbortController();
      try {
        const res = await fetch(url, { signal: abort.signal, headers: withKey() });
        if (!res.ok) { reject(await toError(res)); return; }
        abort.abort();
        reject(new Error(`the browser cannot play ${$("format").value} audio; pick another format or download it`));
      } catch (e) { reject(e); }
    };
    audio.addEventListener("loadedmetadata", ok);
    audio.addEventListener("error", bad);
  });
}

function appendChunk(buffer, chunk) {
  return new Promise((resolve, reject) => {
    buffer.addEventListener("updateend", resolve, { once: true });
    buffer.addEventListener("error", () => reject(new Error("the browser could not decode the stream")), { once: true });
    buffer.appendBuffer(chunk);
  });
}

// Plays a fetched audio response: progressively through MediaSource for MP3, else as a blob once complete.
async function playResponse(res, token, filename) {
  const type = (res.headers.get("Content-Type") || "application/octet-stream").split(";")[0].trim();
  const reader = res.body.getReader();
  const chunks = [];
  let received = 0;
  const read = async () => {  // the next chunk, or null at the end or once a newer playback started
    const { done, value } = await reader.read();
    if (done || token !== playToken) return null;
    chunks.push(value);
    received += value.length;
    setStatus(`Streaming… ${(received / 1024).toFixed(0)} kB received`);
    return value;
  };
  try {
    await feedPlayer(type, read, chunks, token);
  } finally {
    reader.cancel().catch(() => {});  // a no-op at the end; otherwise stops the download (and the generation)
  }
  if (token !== playToken) return;
  offerDownload(new Blob(chunks, { type }), filename);
  const seed = res.headers.get("X-Seed");
  setStatus(`Streamed ${(received / 1024).toFixed(0)} kB${seed ? ` (seed ${seed})` : ""}.`);
  const audio = $("player");
  if (audio.paused) audio.play().catch(() => {});
}

async function feedPlayer(type, read, chunks, token) {
  if (type === "audio/mpeg" && window.MediaSource && MediaSource.isTypeSupported("audio/mpeg")) {
    const source = new MediaSource();
    const opened = new Promise((resolve) => source.addEventListener("sourceopen", resolve, { once: true }));
    setPlayerSource(URL.createObjectURL(source), true, "mediasource");
    await opened;
    const buffer = source.addSourceBuffer("audio/mpeg");
    for (let chunk; (chunk = await read());) await appendChunk(buffer, chunk);
    if (source.readyState === "open") source.endOfStream();
  } else {
    while (await read());
    if (token !== playToken) return;
    const loaded = metadataLoaded(null);
    setPlayerSource(URL.createObjectURL(new Blob(chunks, { type })), true, "blob");
    await loaded;
  }
}

async function playStream(p, token) {
  const query = new URLSearchParams(Object.entries(p).map(([k, v]) => [k, String(v)]));
  const url = `synthesize/stream?${query}`;
  const filename = `voxcpm-stream.${p.response_format}`;
  if (!apiKey && url.length <= MAX_GET_URL) {  // the browser streams and buffers a plain URL by itself
    const loaded = metadataLoaded(url);
    setPlayerSource(url, false, "stream-url");
    await loaded;
    setStatus("Streaming from the server…");
    return;
  }
  const res = url.length <= MAX_GET_URL ? await api(url)
    : await api("synthesize/stream", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(p) });
  await playResponse(res, token, filename);
}

async function playFile(audioPath, token) {
  const name = audioPath.split("/").pop();
  const url = `download/${encodeURIComponent(name)}`;
  if (!apiKey) {
    const loaded = metadataLoaded(url);
    setPlayerSource(url, false, "file");
    await loaded;
  } else {
    const blob = await (await api(url)).blob();
    if (token !== playToken) return;
    const loaded = metadataLoaded(null);
    setPlayerSource(URL.createObjectURL(blob), true, "file");
    await loaded;
  }
  setStatus(`Playing ${name}.`);
}

async function synthesizeAndPlay() {
  const p = params();
  showError("");
  if (p.response_format === "pcm") {
    throw new Error("Raw PCM cannot be played in a browser: pick another format, or use \"Submit as task\" to download it.");
  }
  const token = ++playToken;
  resetPlayer();
  setStatus("Generating…");
  try {
    if (streamRoute) {
      try {
        await playStream(p, token);
        return;
      } catch (e) {
        if (!e.routeMissing) throw e;
        streamRoute = false;  // this server has no streaming route: use a synchronous task from now on
      }
    }
    setStatus("Generating the whole file (this server does not stream)…");
    const result = await apiJson("synthesize", { ...p, async_mode: false });
    refreshTasks();
    if (token === playToken) await playFile(result.audio_path, token);
  } catch (e) {
    if (token !== playToken) return;  // a newer playback took the player over: this one's errors are moot
    setStatus("Nothing to play.");
    throw e;
  }
}

async function submitTask() {
  showError("");
  const result = await apiJson("synthesize", { ...params(), async_mode: true });
  setStatus(`Task ${result.task_id} submitted (seed ${result.seed}, about ${result.estimated_time} s).`);
  await refreshTasks();
}

// ---- tasks ---------------------------------------------------------------------------------

async function saveFile(url, filename) {
  const blob = await (await api(url)).blob();
  const link = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob), download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function cell(tr) { return tr.appendChild(document.createElement("td")); }

function makeRow(task) {
  const tr = document.createElement("tr");
  tr.dataset.taskId = task.task_id;
  const id = document.createElement("code");
  id.textContent = task.task_id;
  cell(tr).append(id);
  const status = document.createElement("span");
  cell(tr).append(status);
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.setAttribute("aria-label", `Progress of task ${task.task_id}`);
  const pct = document.createElement("span");
  cell(tr).append(bar, " ", pct);
  const row = { tr, status, bar, pct, lora: cell(tr), seed: cell(tr), created: cell(tr), file: cell(tr), state: "" };
  row.created.textContent = new Date(task.created_at).toLocaleString();
  return row;
}

function updateRow(row, task) {
  row.status.textContent = task.status;
  row.status.className = `status-${task.status}`;
  row.status.title = task.error || task.message || "";
  row.bar.value = task.progress;
  row.pct.textContent = `${Math.round(task.progress * 100)}%`;
  row.lora.textContent = [task.lora_name || "—", task.voice && `voice ${task.voice}`].filter(Boolean).join(" · ");
  row.seed.textContent = String(task.seed);
  if (row.state === task.status) return;  // rebuild the actions only on change, so keyboard focus stays put
  row.state = task.status;
  const file = row.file;
  file.replaceChildren();
  if (task.status === "completed" && task.audio_path) {
    const name = task.audio_path.split("/").pop();
    const link = Object.assign(document.createElement("a"), { href: `download/${encodeURIComponent(name)}`,
      download: name, textContent: "Download" });
    link.setAttribute("aria-label", `Download ${name}`);
    link.addEventListener("click", (ev) => {
      if (!apiKey) return;  // a plain link works without a key
      ev.preventDefault();
      saveFile(link.getAttribute("href"), name).catch((e) => showError(e.message));
    });
    const play = Object.assign(document.createElement("button"), { type: "button", className: "small", textContent: "Play" });
    play.setAttribute("aria-label", `Play task ${task.task_id}`);
    play.addEventListener("click", () => busy(play, async () => {
      const token = ++playToken;
      resetPlayer();
      await playFile(task.audio_path, token);
    }));
    file.append(link, play);
  } else if (task.status === "pending" || task.status === "processing") {
    const cancel = Object.assign(document.createElement("button"), { type: "button", className: "small", textContent: "Cancel" });
    cancel.setAttribute("aria-label", `Cancel task ${task.task_id}`);
    cancel.addEventListener("click", () => busy(cancel, async () => {
      await api(`task/${encodeURIComponent(task.task_id)}`, { method: "DELETE" });
      await refreshTasks();
    }));
    file.append(cancel);
  } else if (task.error) {
    file.append(Object.assign(document.createElement("span"), { className: "muted", textContent: task.error.slice(0, 80),
      title: task.error }));
  }
}

function renderTasks(body) {
  $("tasks-summary").textContent = `· ${body.total} total, ${body.processing} of ${body.max_concurrent} slots busy`;
  const tbody = $("task-rows");
  const seen = new Set();
  body.tasks.forEach((task, i) => {
    let row = taskRows.get(task.task_id);
    if (!row) taskRows.set(task.task_id, (row = makeRow(task)));
    updateRow(row, task);
    if (tbody.children[i] !== row.tr) tbody.insertBefore(row.tr, tbody.children[i] || null);
    seen.add(task.task_id);
  });
  for (const [id, row] of taskRows) if (!seen.has(id)) { row.tr.remove(); taskRows.delete(id); }
  $("tasks-empty").hidden = body.tasks.length > 0;
}

async function refreshTasks() {
  if (polling) return;
  polling = true;
  try {
    renderTasks(await (await api("tasks?limit=25")).json());
    lastPollError = "";
  } catch (e) {
    if (e.message !== lastPollError) showError(e.message);  // once, not every second
    lastPollError = e.message;
  } finally {
    polling = false;
  }
}

// ---- wiring --------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = apiKey;
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    apiKey = $("api-key").value.trim();
    if (apiKey) localStorage.setItem(KEY_STORE, apiKey); else localStorage.removeItem(KEY_STORE);
    loadAll();
  });
  $("synth-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy($("play-btn"), synthesizeAndPlay);
  });
  $("task-btn").addEventListener("click", () => {
    if ($("synth-form").reportValidity()) busy($("task-btn"), submitTask);
  });
  $("voice-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy($("voice-btn"), async () => {
      const form = new FormData();
      const name = $("voice-name").value.trim();
      form.append("name", name);
      form.append("transcript", $("voice-transcript").value);
      form.append("audio", $("voice-audio").files[0]);
      await api("voices", { method: "POST", body: form });
      $("voice-form").reset();
      await loadVoices();
      $("voice").value = name;
      setStatus(`Voice "${name}" saved.`);
    });
  });
  $("voice").addEventListener("change", () => {  // show (and send) the chosen voice's own defaults
    const v = voices.find((x) => x.name === $("voice").value);
    if (!v) return;
    if (v.cfg_scale != null) $("cfg").value = v.cfg_scale;
    if (v.steps != null) $("steps").value = v.steps;
    if (v.lora_name && [...$("lora").options].some((o) => o.value === v.lora_name)) $("lora").value = v.lora_name;
  });
  $("player").addEventListener("ended", () => setStatus("Finished."));
  loadAll();
  setInterval(() => { if (!document.hidden) refreshTasks(); }, 1000);
});
