// The imgcls web page: plain DOM code, no framework, no build step, no network but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");

function headers() {
  const key = keyInput.value || sessionStorage.getItem("imgcls-key") || "";
  return key ? { Authorization: "Bearer " + key } : {};
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function errorText(resp) {
  try { return (await resp.json()).detail || resp.statusText; } catch (e) { return resp.statusText; }
}

async function loadModel() {
  const health = await (await fetch("/health")).json();
  $("key-box").hidden = !health.auth;
  const resp = await fetch("/model", { headers: headers() });
  if (!resp.ok) {
    $("model-name").textContent = "enter the API key to use the model";
    return;
  }
  const card = await resp.json();
  $("model-name").textContent = `${card.architecture} · ${card.num_classes} classes · ${card.serving.backend}`;
}

function renderBars(top) {
  const list = $("bars");
  list.replaceChildren();
  for (const t of top) {
    const li = document.createElement("li");
    const pct = (100 * t.probability).toFixed(1);
    const label = document.createElement("div");
    label.className = "bar-label";
    const name = document.createElement("span");
    name.className = "class-name";
    name.textContent = t.class;  // textContent: class names are never parsed as HTML
    const value = document.createElement("span");
    value.textContent = pct + "%";
    label.append(name, value);
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = pct + "%";
    bar.append(fill);
    li.append(label, bar);
    list.append(li);
  }
}

// "unknown" (with the top class - a multi-label model: its label set - as a guess) and the
// conformal prediction set, when the model has them
function renderTrust(pred) {
  const score = pred.ood_score === undefined ? "" : ` (OOD score ${pred.ood_score.toFixed(3)})`;
  const guess = pred.labels === undefined ? `"${pred.guess}"`
    : (pred.labels.length ? pred.labels.map((l) => `"${l.label}"`).join(", ") : "no label");
  $("guess").hidden = !pred.unknown;
  $("guess").textContent = pred.unknown
    ? `Unlike the images this model was trained on${score}: best guess ${guess}.` : "";
  $("pset").hidden = !Array.isArray(pred.set);
  $("pset").textContent = Array.isArray(pred.set)
    ? `Prediction set: {${pred.set.join(", ")}}` + (pred.set.length === 0 ? " (no class is plausible)" : "") : "";
}

async function classify(file) {
  showError("");
  if (!file) return;
  $("preview").src = URL.createObjectURL(file);
  const form = () => { const f = new FormData(); f.append("file", file); return f; };
  const t0 = performance.now();
  const resp = await fetch("/predict?top_k=5", { method: "POST", body: form(), headers: headers() });
  if (!resp.ok) {
    $("result").hidden = true;
    showError(`${resp.status}: ${await errorText(resp)}`);
    return;
  }
  const pred = await resp.json();
  // a multi-label model answers the set of labels above their thresholds
  $("label").textContent = pred.labels === undefined || pred.unknown ? pred.label
    : (pred.labels.length ? pred.labels.map((l) => `${l.label} (${(100 * l.p).toFixed(1)}%)`).join(", ")
      : "no label above its threshold");
  renderTrust(pred);
  renderBars(pred.top);
  $("timing").textContent = `${(performance.now() - t0).toFixed(0)} ms round trip · ${pred.backend}`;
  $("result").hidden = false;
  $("overlay").removeAttribute("src");
  $("overlay-caption").textContent = "Grad-CAM: computing…";
  const ex = await fetch("/explain", { method: "POST", body: form(), headers: headers() });
  if (ex.ok) {
    $("overlay").src = URL.createObjectURL(await ex.blob());
    // the class name comes percent-encoded when it is not plain ASCII (HTTP headers are latin-1)
    const target = decodeURIComponent(ex.headers.get("X-Imgcls-Target") || "");
    $("overlay-caption").textContent = `Grad-CAM for "${target}": where the model looked`;
  } else {
    $("overlay-caption").textContent = `Grad-CAM failed: ${await errorText(ex)}`;
  }
}

const drop = $("drop");
$("file").addEventListener("change", (e) => classify(e.target.files[0]));
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.add("over");
}));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.remove("over");
}));
drop.addEventListener("drop", (e) => classify(e.dataTransfer.files[0]));
keyInput.addEventListener("change", () => { sessionStorage.setItem("imgcls-key", keyInput.value); loadModel(); });
loadModel().catch((e) => showError("cannot reach the server: " + e));
