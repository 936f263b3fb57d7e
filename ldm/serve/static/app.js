// ldm-serve's page: plain JavaScript over the same /sdapi/v1 API any client uses; nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "txt2img", lastSeed: null, initDataURL: null, erasing: false, busy: false };

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const r = await fetch("/sdapi/v1/" + path, opts);
  const data = await r.json().catch(() => null);
  if (!r.ok) throw new Error((data && data.detail) || r.status + " " + r.statusText);
  return data;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// ---------------------------------------------------------------------------------------------- settings lists

async function loadLists() {
  const [samplers, models, options] = await Promise.all([api("samplers"), api("sd-models"), api("options")]);
  for (const s of samplers) $("sampler").add(new Option(s.name, s.name, s.name === "Euler a", s.name === "Euler a"));
  for (const m of models) {
    $("model").add(new Option(m.title, m.title));
    $("refiner").add(new Option(m.title, m.title));
  }
  $("model").value = options.sd_model_checkpoint;
}

$("model").addEventListener("change", async () => {
  setStatus("loading " + $("model").value + " ...");
  try {
    await api("options", { sd_model_checkpoint: $("model").value });
    setStatus("model: " + $("model").value);
  } catch (e) { setStatus(e.message, true); }
});

// ------------------------------------------------------------------------------------------------------ tabs

function setMode(mode) {
  state.mode = mode;
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.mode === mode);
  $("img2img-panel").hidden = mode !== "img2img";
}
for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => setMode(t.dataset.mode));

// ------------------------------------------------------------------------------ init image and the mask canvas

function setInitImage(dataURL) {
  const img = new Image();
  img.onload = () => {
    for (const c of [$("init-canvas"), $("mask-canvas")]) {
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
      c.style.height = (256 * img.naturalHeight / img.naturalWidth) + "px";
    }
    $("canvas-stack").style.height = $("init-canvas").style.height;
    $("init-canvas").getContext("2d").drawImage(img, 0, 0);
    state.initDataURL = dataURL;
  };
  img.src = dataURL;
}

$("init-file").addEventListener("change", () => {
  const file = $("init-file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => setInitImage(reader.result);
  reader.readAsDataURL(file);
});

const mask = $("mask-canvas");
let last = null;  // the previous point of the stroke being painted, in canvas pixels

// a round-capped segment from the previous point, so a fast stroke leaves no gaps between pointer events
function paint(e) {
  const rect = mask.getBoundingClientRect();
  const p = { x: (e.clientX - rect.left) * mask.width / rect.width, y: (e.clientY - rect.top) * mask.height / rect.height };
  const ctx = mask.getContext("2d");
  ctx.globalCompositeOperation = state.erasing ? "destination-out" : "source-over";
  ctx.strokeStyle = "rgb(255, 0, 0)";
  ctx.lineWidth = Math.max(Number($("brush").value) * mask.width / rect.width, 1);
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo((last || p).x, (last || p).y);
  ctx.lineTo(p.x + (last ? 0 : 0.01), p.y);
  ctx.stroke();
  last = p;
}
mask.addEventListener("pointerdown", (e) => { last = null; mask.setPointerCapture(e.pointerId); paint(e); });
mask.addEventListener("pointermove", (e) => { if (last) paint(e); });
mask.addEventListener("pointerup", () => { last = null; });
$("eraser").addEventListener("click", () => {
  state.erasing = !state.erasing;
  $("eraser").setAttribute("aria-pressed", String(state.erasing));
});
$("clear-mask").addEventListener("click", () => mask.getContext("2d").clearRect(0, 0, mask.width, mask.height));

// the painted strokes as the API's mask: white = repaint, black = keep; null when nothing is painted
function maskDataURL() {
  const src = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height);
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  const ctx = out.getContext("2d");
  const img = ctx.createImageData(mask.width, mask.height);
  let any = false;
  for (let i = 0; i < src.data.length; i += 4) {
    const v = src.data[i + 3] >= 128 ? 255 : 0;
    any = any || v > 0;
    img.data[i] = img.data[i + 1] = img.data[i + 2] = v;
    img.data[i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return any ? out.toDataURL("image/png") : null;
}

// ------------------------------------------------------------------------------------------------- generating

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function request() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    steps: number("steps"), cfg_scale: number("cfg"), seed: number("seed") ?? -1, n_iter: number("n_iter") ?? 1,
  };
  if (number("width") !== null) body.width = number("width");
  if (number("height") !== null) body.height = number("height");
  if ($("refiner").value) {
    body.refiner_checkpoint = $("refiner").value;
    body.refiner_switch_at = number("refiner_switch");
  }
  if (state.mode === "img2img") {
    if (!state.initDataURL) throw new Error("choose an init image first (or send one from the gallery)");
    body.init_images = [state.initDataURL];
    body.denoising_strength = number("strength");
    const m = maskDataURL();
    if (m) body.mask = m;
  }
  return body;
}

async function pollProgress() {
  while (state.busy) {
    try {
      const p = await api("progress");
      $("progress").value = p.progress;
      if (p.textinfo) setStatus("generating: " + p.textinfo);
    } catch (e) { /* the result request reports errors */ }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

async function generate() {
  if (state.busy) return;
  let body;
  try { body = request(); } catch (e) { setStatus(e.message, true); return; }
  state.busy = true;
  $("generate").disabled = true;
  $("progress").value = 0;
  setStatus("queued ...");
  pollProgress();
  try {
    const out = await api(state.mode, body);
    const info = JSON.parse(out.info);
    out.images.forEach((b64, i) => addToGallery("data:image/png;base64," + b64, info.infotexts[i], info.all_seeds[i]));
    if (out.images.length) state.lastSeed = info.all_seeds[out.images.length - 1];
    $("progress").value = 1;
    setStatus(info.interrupted ? "interrupted" : "done: " + out.images.length + " image(s), seed " + info.seed);
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    state.busy = false;
    $("generate").disabled = false;
  }
}

function addToGallery(src, parameters, seed) {
  const fig = document.createElement("figure");
  fig.className = "result";
  const img = new Image();
  img.src = src;
  img.alt = parameters;
  img.className = "result-image";
  const cap = document.createElement("figcaption");
  const pre = document.createElement("pre");
  pre.className = "parameters";
  pre.textContent = parameters;
  const download = document.createElement("a");
  download.href = src;
  download.download = seed + ".png";
  download.textContent = "Download";
  download.className = "download";
  const send = document.createElement("button");
  send.type = "button";
  send.textContent = "Send to img2img";
  send.className = "send-to-img2img";
  send.addEventListener("click", () => { setInitImage(src); setMode("img2img"); });
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.textContent = "Reuse seed";
  reuse.className = "reuse";
  reuse.addEventListener("click", () => { $("seed").value = seed; });
  cap.append(pre, download, " ", send, " ", reuse);
  fig.append(img, cap);
  $("gallery").prepend(fig);
}

$("generate").addEventListener("click", generate);
$("interrupt").addEventListener("click", () => api("interrupt", {}).catch((e) => setStatus(e.message, true)));
$("reuse-seed").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });

window.ldm = { maskDataURL, setInitImage };  // for the browser tests
loadLists().then(() => setStatus("ready"), (e) => setStatus(e.message, true));
