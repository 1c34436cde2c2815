// The page's models panel: the catalog (GET /catalog) with sizes and licences, a pull with its progress as it streams
// (POST /pull, NDJSON lines) and the removal of a pulled model (DELETE /models/<name>). It runs after app.js and uses
// its $, api, headers, responseError, showError and fillModels.
"use strict";

let busy = false; // a pull or a removal runs: one at a time from this page, the panel's buttons wait for it
const fileItems = new Map(); // the running pull's files -> their {progress, text} in the list

// The catalog and the model menu again (after a pull or a removal, or as the panel opens): `choice` chosen in the
// menu where given, else what was chosen while it is still listed.
async function refreshModels(choice) {
  const [catalog, models] = await Promise.all([api("/catalog"), api("/models")]);
  if (!catalog.models) throw new Error(catalog.error || "the server sent no catalog");
  // A pulled model by the catalog variant it was pulled as ("dreamshaper-8:fp16") -> the name it draws by.
  const pulled = new Map(models.models.filter((m) => m.pulled).map((m) => [m.pulled, m.name]));
  const variants = new Map(); // a base name -> its variants: the one the bare name takes is marked where there is a choice
  for (const model of catalog.models) variants.set(baseName(model), (variants.get(baseName(model)) || 0) + 1);
  const rows = catalog.models.map((model) => catalogRow(model, pulled.get(model.name), variants.get(baseName(model))));
  // One pulled from a URL is in no catalog row; it may be removed all the same.
  for (const model of models.models.filter((m) => m.pulled === null)) rows.push(urlRow(model));
  $("catalog").tBodies[0].replaceChildren(...rows);
  setButtons();

  const before = $("model").value;
  const names = models.models.map((m) => m.name);
  const chosen = choice || (names.includes(before) ? before : models.default);
  fillModels(models, chosen);
  // The change listeners set the model's sizes, steps and samplers, as if the user had chosen it.
  if (chosen !== before) $("model").dispatchEvent(new Event("change"));
}

function baseName(model) {
  return model.name.split(":")[0];
}

function catalogRow(model, pulledAs, variants) {
  const name = cell(model.name, "th");
  name.scope = "row";
  name.title = model.description;
  if (model.taken && variants > 1) {
    const taken = document.createElement("small");
    taken.textContent = `what "${baseName(model)}" takes here`;
    taken.title = model.taken;
    name.append(document.createElement("br"), taken);
  }
  const action = cell("");
  if (pulledAs) action.append(button("Delete", `Delete ${pulledAs}`, () => removeModel(pulledAs)));
  else if (!model.present) action.append(button("Pull", `Pull ${model.name}`, () => pullModel(model.name)));
  const here = model.present ? "yes" : "";
  return row(name, cell(model.family), sizeCell(model.size), cell(licence(model.license)), cell(here), action);
}

function urlRow(model) {
  const name = cell(model.name, "th");
  name.scope = "row";
  const action = cell("");
  action.append(button("Delete", `Delete ${model.name}`, () => removeModel(model.name)));
  const family = cell(model.family || "");
  return row(name, family, sizeCell(model.size), cell("pulled from a URL"), cell("yes"), action);
}

function sizeCell(size) {
  const td = cell(humanSize(size));
  td.className = "size";
  return td;
}

function licence(license) {
  let text = license.name;
  if (license.non_commercial) text += ", non-commercial";
  if (license.gated) text += "; gated: the server needs HF_TOKEN, and the licence accepted on the hub";
  return text;
}

function row(...cells) {
  const tr = document.createElement("tr");
  tr.append(...cells);
  return tr;
}

function cell(text, tag = "td") {
  const td = document.createElement(tag);
  td.textContent = text;
  return td;
}

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function setButtons() {
  for (const b of $("catalog").querySelectorAll("button")) b.disabled = busy;
}

// Sizes as the CLI gives them: GB (of 2**30 bytes) from one up, else MB.
function humanSize(size) {
  return size >= 2 ** 30 ? `${(size / 2 ** 30).toFixed(1)} GB` : `${(size / 2 ** 20).toFixed(1)} MB`;
}

function say(text) {
  if ($("models-status").textContent !== text) $("models-status").textContent = text; // read out once, not per line
}

async function pullModel(name) {
  if (busy) return;
  busy = true;
  setButtons();
  showError("");
  fileItems.clear();
  $("pull-files").replaceChildren();
  $("pull-files").hidden = false;
  say(`pulling ${name}…`);
  try {
    const body = JSON.stringify({ model: name });
    const response = await fetch("/pull", { method: "POST", headers: headers(), body });
    if (!response.ok) {
      const answer = await response.json().catch(() => ({ error: response.statusText }));
      throw responseError(response, answer);
    }
    let pulled = null;
    for await (const line of ndjsonLines(response)) {
      if (line.error) throw new Error(line.error);
      if (line.status === "success") pulled = line.model;
      else showPullLine(line);
    }
    if (!pulled) throw new Error("the pull ended before it said it succeeded; pull again to resume it");
    await refreshModels(pulled);
    say(`success: ${pulled} is in the model menu`);
  } catch (error) {
    // A TypeError is the network's: what came is kept beside the models folder, and the next pull goes on from it.
    const lost = "lost the connection to the server; pull again to resume";
    const message = error.name === "TypeError" ? lost : error.message;
    showError(message);
    say(`failed: ${message}`);
  } finally {
    busy = false;
    setButtons();
  }
}

// A response's NDJSON body as objects, one a line, as they come.
async function* ndjsonLines(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    const lines = buffered.split("\n");
    buffered = lines.pop();
    for (const line of lines) if (line.trim()) yield JSON.parse(line);
  }
  if (buffered.trim()) yield JSON.parse(buffered);
}

// One line of the pull: the first lists the files and what is to fetch (the panel pulls a variant by its full name: no
// reason to tell), the others tell one file's progress.
function showPullLine(line) {
  if (line.files) {
    say(`${line.status}: ${humanSize(line.total)} to fetch`);
    for (const file of line.files) {
      const item = fileItem(file.file);
      item.progress.max = 1;
      item.progress.value = file.present ? 1 : 0;
      item.text.textContent = `${file.file}: ${file.present ? "here already" : `0 of ${humanSize(file.size)}`}`;
    }
    return;
  }
  const item = fileItem(line.file);
  if (line.completed === undefined) {
    item.text.textContent = `${line.file}: ${line.status}`;
    return;
  }
  say(`${line.status} ${line.file}`);
  item.progress.max = line.total || 1;
  item.progress.value = line.completed;
  const checking = line.status === "downloading" ? "" : `${line.status}, `;
  item.text.textContent = `${line.file}: ${checking}${amount(line.completed, line.total)}`;
}

function fileItem(file) {
  if (!fileItems.has(file)) {
    const li = document.createElement("li");
    const text = document.createElement("span");
    const progress = document.createElement("progress");
    progress.setAttribute("aria-label", file);
    li.append(text, progress);
    $("pull-files").append(li);
    fileItems.set(file, { progress, text });
  }
  return fileItems.get(file);
}

// "1.2 of 8.0 GB": both in the total's unit.
function amount(completed, total) {
  const [unit, name] = total >= 2 ** 30 ? [2 ** 30, "GB"] : [2 ** 20, "MB"];
  return `${(completed / unit).toFixed(1)} of ${(total / unit).toFixed(1)} ${name}`;
}

async function removeModel(name) {
  const question = `Delete ${name}? Its files leave the server's models folder, but for those other models use.`;
  if (busy || !confirm(question)) return;
  busy = true;
  setButtons();
  showError("");
  try {
    const response = await fetch(`/models/${encodeURIComponent(name)}`, { method: "DELETE", headers: headers() });
    const answer = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw responseError(response, answer);
    let text = `removed ${answer.model}: ${answer.removed.join(", ") || "no files"}`;
    const kept = answer.kept.join(", ");
    if (kept) text += `; kept ${kept} (other models use them, or they were there before the pull)`;
    await refreshModels();
    $("pull-files").hidden = true;
    say(text);
  } catch (error) {
    showError(error.message);
    say(`failed: ${error.message}`);
  } finally {
    busy = false;
    setButtons();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("models-panel").addEventListener("toggle", () => {
    if ($("models-panel").open) refreshModels().catch((error) => showError(error.message));
  });
});
