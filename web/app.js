// Imagine's web page: a client of the public API only (GET /models, /samplers, /loras; POST /jobs and its events);
// jobs.js submits and follows jobs; models.js adds the models panel.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "imagine.key";
const HISTORY_STORE = "imagine.history";
const HISTORY_LIMIT = 12; // localStorage holds a few MB: a dozen pictures of 512x512 fit
const SIZES = {
  sd1: [[512, 512], [512, 768], [768, 512]],
  sd2: [[512, 512], [512, 768], [768, 512]],
  "sd2-v": [[768, 768], [768, 1024], [1024, 768]],
  sdxl: [[1024, 1024], [832, 1216], [1216, 832], [896, 1152], [1152, 896]],
};
// The flow-matching families draw at SDXL's sizes, each a multiple of 16 as they need.
for (const family of ["z-image", "flux2-klein", "flux1-dev", "flux1-schnell"]) SIZES[family] = SIZES.sdxl;
const FIELDS = [
  "prompt", "neg", "model", "width", "height", "num_steps", "guidance", "sampler", "schedule", "n", "clip_skip",
];

let controller = null; // the running generation's AbortController
let lastSeed = null;
let current = null; // the shown result: {img, params, seed}
let initData = null; // base64 of the input picture, for img2img
let firstPreview = null; // {step, time} of the generation's first preview: the estimate leaves out loading

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY_STORE);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(path) {
  const response = await fetch(path, { headers: headers() });
  if (response.status === 401) {
    askForKey();
    throw new Error("this server needs an API key");
  }
  return response.json();
}

function askForKey() {
  $("key-form").hidden = false;
  $("key").focus();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadLists() {
  const [models, samplers, loras] = await Promise.all([api("/models"), api("/samplers"), api("/loras")]);
  fillModels(models, models.default);
  fill($("sampler"), samplers.samplers, samplers.default);
  fillSchedules(samplers);
  for (const lora of loras.loras) $("lora").append(new Option(lora.name, lora.name));
  updatePresets();
  await applyModelDefaults();
  showDemoNote();
  await loadUpscalers();
}

// The model menu from GET /models, `selected` chosen (the models panel refills it after a pull or a removal).
function fillModels(models, selected) {
  const names = models.models.map((m) => m.name);
  if (!names.includes(models.default)) names.unshift(models.default);
  fill($("model"), names, selected);
  $("model").dataset.families = JSON.stringify(
    Object.fromEntries(models.models.map((m) => [m.name, m.family || "sd1"])),
  );
}

// A model's own steps, guidance and samplers (Z-Image-Turbo draws in 8 steps without guidance, with Euler), from
// GET /samplers?model=.
async function applyModelDefaults() {
  const samplers = await api("/samplers?model=" + encodeURIComponent($("model").value));
  if (!samplers.samplers) return; // a model that cannot be read: generating says why
  $("num_steps").value = samplers.defaults.num_steps;
  $("guidance").value = samplers.defaults.guidance;
  fill($("sampler"), samplers.samplers, samplers.default);
  $("schedule").dataset.bySampler = JSON.stringify(samplers.schedules_by_sampler);
  updateSchedules();
}

function fill(select, values, selected) {
  select.replaceChildren(...values.map((v) => new Option(v, v, v === selected, v === selected)));
}

function updatePresets() {
  const families = JSON.parse($("model").dataset.families || "{}");
  const name = $("model").value;
  // The family's first size is the API's default for the model (demo is an SD 1.x model: 512x512).
  const sizes = SIZES[families[name]] || SIZES.sd1;
  fill($("preset"), sizes.map(([w, h]) => `${w}x${h}`), null);
  $("preset").prepend(new Option("custom", "", true, true));
  if (!initData) applyPreset(sizes[0].join("x"));
  showPresetOfSize();
}

function applyPreset(value) {
  if (!value) return;
  const [w, h] = value.split("x");
  $("width").value = w;
  $("height").value = h;
}

// The size menu names the preset the width and height make, and "custom" only for a size of no preset.
function showPresetOfSize() {
  const size = `${$("width").value}x${$("height").value}`;
  const preset = [...$("preset").options].find((option) => option.value === size);
  $("preset").value = preset ? size : "";
}

function showDemoNote() {
  $("demo-note").hidden = $("model").value !== "demo";
}

function requestBody() {
  const body = { stream: Number($("stream").value) || 1 };
  for (const field of FIELDS) {
    const value = $(field).value;
    if (value === "") continue;
    body[field] = $(field).type === "number" ? Number(value) : value;
  }
  if ($("random-seed").checked) $("seed").value = String(Math.floor(Math.random() * 2 ** 32));
  body.seed = $("seed").value.trim(); // digits, sent as they are: see exactJson
  if (initData) {
    body.img = initData;
    body.strength = Number($("strength").value);
    const mask = maskData();
    if (mask) body.mask = mask;
  }
  return body;
}

async function generate(pasted = false) {
  if (controller) return;
  if (!pasted && !$("prompt").value.trim()) {
    showError("write a prompt first");
    $("prompt").focus();
    return;
  }
  const body = pasted ? pastedBody() : requestBody();
  await runJob(body, (signal) => submitJob(body, signal));
}

function handleLine(line, body, started) {
  if (line.error) throw new Error(line.error);
  if (!line.done) {
    // A batch previews every picture at each step; the page shows the first forming.
    if (!line.index) $("picture").src = "data:image/png;base64," + line.img;
    setProgress(line.step, line.steps, started);
    return;
  }
  setProgress(line.steps, line.steps, started);
  lastSeed = seedAt(body, line, 0);
  $("reuse-seed").disabled = false;
  const params = { ...body };
  delete params.img;
  delete params.mask;
  params.inpaint = Boolean(body.mask);
  line.images.forEach((img, i) => addToHistory({ img, params: { ...params, seed: seedAt(body, line, i) } }));
  show({ img: line.img, params: { ...params, seed: lastSeed } });
  $("status").textContent = `done in ${line.seconds.toFixed(1)} s, seed ${lastSeed}`;
}

function setProgress(step, steps, started) {
  const now = performance.now();
  const elapsed = (now - started) / 1000;
  $("progress").max = steps || 1;
  $("progress").value = step;
  if (step === 0) firstPreview = null;
  else if (!firstPreview) firstPreview = { step, time: now };
  const stepsSince = firstPreview ? step - firstPreview.step : 0;
  const remaining = stepsSince > 0 ? ((now - firstPreview.time) / 1000 / stepsSince) * (steps - step) : NaN;
  const estimate = Number.isFinite(remaining) ? `, about ${remaining.toFixed(1)} s left` : "";
  $("progress-text").textContent = `step ${step} / ${steps}, ${elapsed.toFixed(1)} s${estimate}`;
}

function show(entry) {
  current = entry;
  $("picture").src = "data:image/png;base64," + entry.img;
  $("download").href = "data:image/png;base64," + entry.img;
  $("download").download = `imagine-${entry.params.seed}.png`;
  $("result-tools").hidden = false;
}

// History: this browser's results, newest first, never sent to the server.
function readHistory() {
  try {
    return JSON.parse(localStorage.getItem(HISTORY_STORE)) || [];
  } catch {
    return [];
  }
}

function addToHistory(entry) {
  const entries = [entry, ...readHistory()].slice(0, HISTORY_LIMIT);
  // When the browser's storage is full, the oldest pictures go first.
  while (entries.length) {
    try {
      localStorage.setItem(HISTORY_STORE, JSON.stringify(entries));
      break;
    } catch {
      entries.pop();
    }
  }
  renderHistory();
}

function renderHistory() {
  $("history").replaceChildren(...readHistory().map(historyItem));
}

function historyItem(entry) {
  const item = document.createElement("li");
  const thumb = document.createElement("img");
  thumb.src = "data:image/png;base64," + entry.img;
  thumb.alt = `${entry.params.prompt} (seed ${entry.params.seed})`;
  thumb.tabIndex = 0;
  thumb.addEventListener("click", () => show(entry));
  thumb.addEventListener("keydown", (e) => e.key === "Enter" && show(entry));
  const download = document.createElement("a");
  download.href = thumb.src;
  download.download = `imagine-${entry.params.seed}.png`;
  download.textContent = "download";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.textContent = "copy settings";
  copy.addEventListener("click", () => copySettings(entry.params));
  const upscaleButton = document.createElement("button");
  upscaleButton.type = "button";
  upscaleButton.textContent = "upscale";
  upscaleButton.addEventListener("click", () => upscale(entry));
  item.append(thumb, download, copy, upscaleButton);
  return item;
}

// Upscaling: a history picture made larger (POST /upscale) by an upscaler GET /upscalers lists, a model first where
// there is one; the larger picture joins the history.
async function loadUpscalers() {
  const usable = (await api("/upscalers")).upscalers.filter((u) => !u.error && u.name !== "None");
  fill($("upscaler"), usable.map((u) => u.name), (usable.find((u) => u.architecture) || usable[0]).name);
}

async function upscale(entry) {
  const upscaler = $("upscaler").value;
  const scale = Number($("upscale-scale").value);
  showError("");
  $("status").textContent = `upscaling ${scale}x with ${upscaler}`;
  try {
    const body = JSON.stringify({ img: entry.img, upscaler, scale });
    const response = await fetch("/upscale", { method: "POST", headers: headers(), body });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error);
    const larger = { img: answer.img, params: { ...entry.params, upscaled: `${upscaler} ${scale}x` } };
    addToHistory(larger);
    show(larger);
    $("status").textContent = `upscaled to ${answer.width}x${answer.height} in ${answer.seconds.toFixed(1)} s`;
  } catch (error) {
    $("status").textContent = "";
    showError(error.message);
  }
}

function copySettings(params) {
  for (const field of FIELDS) if (params[field] !== undefined) $(field).value = params[field];
  $("seed").value = params.seed;
  $("random-seed").checked = false;
  if (params.stream) $("stream").value = params.stream;
  showPresetOfSize();
  showDemoNote();
}

// Image to image and inpainting: the input picture, with a mask canvas of its size over it.
function setInit(dataUrl) {
  const img = $("init-img");
  img.onload = () => {
    const canvas = $("mask");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    $("width").value = Math.max(64, Math.floor(img.naturalWidth / 8) * 8);
    $("height").value = Math.max(64, Math.floor(img.naturalHeight / 8) * 8);
    showPresetOfSize();
  };
  img.src = dataUrl;
  initData = dataUrl.slice(dataUrl.indexOf(",") + 1);
  $("init-area").hidden = false;
  $("init-tools").hidden = false;
}

function removeInit() {
  initData = null;
  $("init-area").hidden = true;
  $("init-tools").hidden = true;
  $("init-file").value = "";
}

function readFile(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => setInit(reader.result);
  reader.readAsDataURL(file);
}

// The mask as the server wants it: white repaints, black keeps; null when nothing is painted.
function maskData() {
  const canvas = $("mask");
  const ctx = canvas.getContext("2d");
  const painted = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  if (!painted.some((v, i) => i % 4 === 3 && v > 0)) return null;
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const o = out.getContext("2d");
  o.fillStyle = "black";
  o.fillRect(0, 0, out.width, out.height);
  o.drawImage(canvas, 0, 0);
  const url = out.toDataURL("image/png");
  return url.slice(url.indexOf(",") + 1);
}

function setUpBrush() {
  const canvas = $("mask");
  let drawing = false;
  const point = (e) => {
    const box = canvas.getBoundingClientRect();
    return [((e.clientX - box.left) * canvas.width) / box.width, ((e.clientY - box.top) * canvas.height) / box.height];
  };
  const paint = (e) => {
    if (!drawing) return;
    const ctx = canvas.getContext("2d");
    const [x, y] = point(e);
    const scale = canvas.width / canvas.getBoundingClientRect().width;
    ctx.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
    ctx.fillStyle = "white";
    ctx.beginPath();
    ctx.arc(x, y, (Number($("brush").value) * scale) / 2, 0, 2 * Math.PI);
    ctx.fill();
  };
  canvas.addEventListener("pointerdown", (e) => {
    drawing = true;
    canvas.setPointerCapture(e.pointerId);
    paint(e);
  });
  canvas.addEventListener("pointermove", paint);
  canvas.addEventListener("pointerup", () => (drawing = false));
  canvas.addEventListener("pointercancel", () => (drawing = false));
}

function setUp() {
  $("form").addEventListener("submit", (e) => {
    e.preventDefault();
    generate();
  });
  $("form").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      generate();
    }
  });
  $("cancel").addEventListener("click", cancelJob);
  $("model").addEventListener("change", updatePresets);
  $("model").addEventListener("change", applyModelDefaults);
  $("sampler").addEventListener("change", updateSchedules);
  $("draw-parameters").addEventListener("click", () => generate(true));
  $("model").addEventListener("change", showDemoNote);
  $("preset").addEventListener("change", () => applyPreset($("preset").value));
  for (const side of ["width", "height"]) $(side).addEventListener("input", showPresetOfSize);
  $("reuse-seed").addEventListener("click", () => {
    $("seed").value = lastSeed;
    $("random-seed").checked = false;
  });
  $("lora").addEventListener("change", () => {
    if ($("lora").value) $("prompt").value += ` <lora:${$("lora").value}:0.8>`;
    $("lora").value = "";
  });
  $("strength").addEventListener("input", () => ($("strength-value").textContent = $("strength").value));
  $("init-file").addEventListener("change", () => readFile($("init-file").files[0]));
  $("clear-mask").addEventListener("click", () => {
    const canvas = $("mask");
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  });
  $("remove-init").addEventListener("click", removeInit);
  $("use-result").addEventListener("click", () => current && setInit("data:image/png;base64," + current.img));
  const drop = document.querySelector("fieldset");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("dropping");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("dropping"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("dropping");
    readFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = [...e.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (file) readFile(file);
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(KEY_STORE, $("key").value);
    $("key-form").hidden = true;
    start();
  });
  setUpBrush();
  renderHistory();
  start();
}

// Seeds go up to 2**64 - 1, beyond what a JavaScript number holds exactly (2**53): the page keeps the seed as the
// digits typed, writes them into the JSON as they are, and counts a batch's seeds with BigInt.
function exactJson(body) {
  if (!/^\d+$/.test(body.seed || "")) return JSON.stringify({ ...body, seed: undefined });
  return JSON.stringify({ ...body, seed: "\u0000seed" }).replace('"\\u0000seed"', body.seed);
}

function seedAt(body, line, index) {
  if (!/^\d+$/.test(body.seed || "")) return String(line.seeds[index]); // drawn by the server: below 2**32
  return (BigInt(body.seed) + BigInt(index)).toString();
}

// Schedule types: the select lists GET /samplers' schedules and offers only those the chosen sampler takes.
function fillSchedules(samplers) {
  const select = $("schedule");
  select.replaceChildren(...samplers.schedules.map((s) => new Option(s.label, s.name)));
  select.dataset.bySampler = JSON.stringify(samplers.schedules_by_sampler);
  updateSchedules();
}

function updateSchedules() {
  const allowed = JSON.parse($("schedule").dataset.bySampler || "{}")[$("sampler").value] || ["automatic"];
  for (const option of $("schedule").options) option.disabled = !allowed.includes(option.value);
  if (!allowed.includes($("schedule").value)) $("schedule").value = "automatic";
}

// Pasted generation data: the server reads it (the `parameters` field) and draws that picture.
function pastedBody() {
  return { stream: Number($("stream").value) || 1, parameters: $("parameters").value };
}

function start() {
  loadLists().then(
    () => {
      $("status").textContent = "ready";
      reattach();
    },
    (error) => showError(error.message),
  );
}

document.addEventListener("DOMContentLoaded", setUp);
