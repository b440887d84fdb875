// The page of `headstart serve`: send images to /predict (one request each, so the server batches them
// together) and show each one's top classes as bars. It talks only to the server that sent it.
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = "";
let classes = [];

function headers() {
  return apiKey ? { Authorization: "Bearer " + apiKey } : {};
}

async function loadModel() {
  const info = $("model-info");
  try {
    const res = await fetch("/model", { headers: headers() });
    if (res.status === 401) {
      $("key-box").hidden = false;
      info.textContent = "this server needs an API key: enter it below, then add images";
      return;
    }
    const model = await res.json();
    if (!res.ok) throw new Error(model.error || res.statusText);
    classes = model.classes;
    $("model-name").textContent = model.name;
    $("top-k").max = String(classes.length);
    $("top-k").value = String(Math.min(3, classes.length));
    const val = model.metrics && model.metrics.val;
    const acc = val && typeof val.accuracy === "number"
      ? `validation accuracy ${(100 * val.accuracy).toFixed(1)}% on ${val.n} images`
      : "no validation metrics saved with this model";
    const backbone = model.backbone && model.backbone.name ? model.backbone.name : "?";
    info.textContent = `${classes.length} classes: ${classes.join(", ")} · ${acc} · ${backbone}, engine ${model.engine || "starting"}`;
  } catch (err) {
    info.textContent = "cannot read the model: " + err.message;
  }
}

function card(name, blob) {
  const node = $("card").content.firstElementChild.cloneNode(true);
  const img = node.querySelector("img");
  img.addEventListener("error", () => img.classList.add("broken"));
  img.src = URL.createObjectURL(blob);
  img.alt = name;
  node.querySelector(".name").textContent = name;
  node.querySelector(".label").textContent = "…";
  $("results").prepend(node);
  return node;
}

function showRow(node, row, ms) {
  node.querySelector(".time").textContent = `${Math.round(ms)} ms`;
  if (row.error) return showError(node, row.error);
  node.querySelector(".label").textContent = `${row.label} (${(100 * row.probability).toFixed(1)}%)`;
  const bars = node.querySelector(".bars");
  bars.replaceChildren();
  for (const t of row.top_k) {
    const li = document.createElement("li");
    li.className = "bar";
    const pct = (100 * t.probability).toFixed(1);
    li.setAttribute("aria-label", `${t.label} ${pct}%`);
    const label = document.createElement("span");
    label.textContent = t.label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${pct}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "pct";
    value.textContent = `${pct}%`;
    li.append(label, track, value);
    bars.append(li);
  }
}

function showError(node, message) {
  node.querySelector(".label").textContent = "not classified";
  const p = node.querySelector(".error");
  p.hidden = false;
  p.textContent = message;
}

async function classify(blob, name) {
  const node = card(name, blob);
  const form = new FormData();
  form.append("file", blob, name);
  const k = Math.max(1, parseInt($("top-k").value, 10) || 1);
  const t0 = performance.now();
  try {
    const res = await fetch(`/predict?top_k=${k}`, { method: "POST", body: form, headers: headers() });
    const body = await res.json();
    const ms = performance.now() - t0;
    if (res.status === 401) $("key-box").hidden = false;
    if (res.ok) showRow(node, body[0], ms);
    else if (body.rows && body.rows[0]) showRow(node, body.rows[0], ms);
    else showError(node, `${res.status}: ${body.error || res.statusText}`);
  } catch (err) {
    showError(node, "the server did not answer: " + err.message);
  }
}

function classifyAll(files) {
  // cards are added at the top: go backwards so a batch reads in the order it was chosen
  for (const f of Array.from(files).reverse()) {
    if (f.type && !f.type.startsWith("image/")) continue;
    classify(f, f.name || "image");
  }
}

function setUpPicker() {
  const input = $("files");
  const drop = $("drop");
  $("choose").addEventListener("click", () => input.click());
  input.addEventListener("change", () => { classifyAll(input.files); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    classifyAll(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => classifyAll(e.clipboardData ? e.clipboardData.files : []));
  $("clear").addEventListener("click", () => {
    for (const img of $("results").querySelectorAll("img")) URL.revokeObjectURL(img.src);
    $("results").replaceChildren();
  });
  $("api-key").addEventListener("change", (e) => { apiKey = e.target.value.trim(); loadModel(); });
}

function setUpCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) return;
  const start = $("camera-start");
  const video = $("video");
  let stream = null;
  start.hidden = false;
  const stop = () => {
    if (stream) stream.getTracks().forEach((t) => t.stop());
    stream = null;
    $("camera").hidden = true;
    start.focus();
  };
  start.addEventListener("click", async () => {
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: true });
    } catch (err) {
      $("model-info").textContent = "the camera is not available: " + err.message;
      return;
    }
    video.srcObject = stream;
    $("camera").hidden = false;
    $("camera-snap").focus();
  });
  $("camera-snap").addEventListener("click", () => {
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    canvas.toBlob((blob) => blob && classify(blob, `camera-${new Date().toISOString().slice(11, 19)}.jpg`),
                  "image/jpeg", 0.92);
  });
  $("camera-stop").addEventListener("click", stop);
}

setUpPicker();
setUpCamera();
loadModel();
