// The server's web page: plain JavaScript against the same HTTP API every client uses (no build step).
"use strict";
const $ = (id) => document.getElementById(id);
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"];

function headers() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function say(id, text, isError) {
  $(id).textContent = text;
  $(id).classList.toggle("error", Boolean(isError));
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

async function connect() {
  try {
    const { tasks } = await call("/v1/tasks");
    const select = $("task");
    select.replaceChildren(...tasks.map((t) => new Option(t.name, t.name)));
    select.disabled = tasks.length === 0;
    say("status", tasks.length ? `${tasks.length} task(s) available.` : "This key may call no task.");
  } catch (error) {
    say("status", error.message, true);
    return;
  }
  await loadAdapters();
}

async function loadAdapters() {
  try {
    const { adapters } = await call("/v1/adapters");
    const rows = adapters.map((a) => {
      const tr = document.createElement("tr");
      for (const [value, cls] of [[a.name], [a.adapter_version || "-"], [a.strategy || "-"], [a.status, a.status],
                                  [a.message || ""]]) {
        const td = document.createElement("td");
        td.textContent = value;
        if (cls) td.className = cls;
        tr.appendChild(td);
      }
      return tr;
    });
    $("adapters").tBodies[0].replaceChildren(...rows);
    $("admin").hidden = false;
  } catch (error) {
    $("admin").hidden = true; // not an admin key: the section stays hidden
  }
}

function draw(image, result) {
  const canvas = $("canvas");
  const scale = Math.min(2, 640 / image.width);  // small images drawn larger, large ones fit the page
  canvas.width = Math.round(image.width * scale);
  canvas.height = Math.round(image.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  ctx.lineWidth = 2;
  ctx.font = "13px system-ui, sans-serif";
  const list = $("detections");
  list.replaceChildren();
  result.detections.forEach((d, i) => {
    const color = COLORS[(d.category_id - 1) % COLORS.length];
    const [x, y, w, h] = d.bbox.map((v) => v * scale);
    const label = `${d.category} ${d.score.toFixed(2)}`;
    ctx.strokeStyle = color;
    ctx.strokeRect(x, y, w, h);
    const width = ctx.measureText(label).width + 6;
    ctx.fillStyle = color;
    ctx.fillRect(x, Math.max(0, y - 16), width, 16);
    ctx.fillStyle = "#fff";
    ctx.fillText(label, x + 3, Math.max(12, y - 4));
    const item = document.createElement("li");
    item.textContent = `${label} at [${d.bbox.map((v) => v.toFixed(0)).join(", ")}]`;
    list.appendChild(item);
  });
  canvas.dataset.boxes = String(result.detections.length);
}

async function detect(file) {
  const task = $("task").value;
  if (!task) { say("status", "Connect and pick a task first.", true); return; }
  const image = await createImageBitmap(file).catch(() => null);
  const form = new FormData();
  form.append("image", file);
  form.append("threshold", $("threshold").value || "0.3");
  say("status", `Detecting ${task}…`);
  try {
    const result = await call(`/v1/tasks/${encodeURIComponent(task)}/detect`, { method: "POST", body: form });
    $("json").textContent = JSON.stringify(result, null, 2);
    if (image) draw(image, result);
    say("status", `${result.detections.length} detection(s) by ${task} (adapter ${result.adapter_version}).`);
  } catch (error) {
    $("json").textContent = JSON.stringify({ error: error.message, status: error.status }, null, 2);
    say("status", error.message, true);
  }
}

async function upload(event) {
  event.preventDefault();
  const name = $("upload-name").value.trim();
  const file = $("upload-file").files[0];
  if (!file) return;
  try {
    const info = await call(`/v1/adapters/${encodeURIComponent(name)}`, {
      method: "PUT", body: await file.arrayBuffer(), headers: { "Content-Type": "application/octet-stream" } });
    say("upload-status", `${info.replaced ? "Replaced" : "Added"} ${info.name}, version ${info.adapter_version}.`);
  } catch (error) {
    say("upload-status", error.message, true);
  }
  await loadAdapters();
  await connect();
}

$("connect").addEventListener("click", connect);
$("key").addEventListener("keydown", (e) => { if (e.key === "Enter") connect(); });
$("file").addEventListener("change", () => { if ($("file").files[0]) detect($("file").files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) detect(e.dataTransfer.files[0]);
});
$("upload-form").addEventListener("submit", upload);
