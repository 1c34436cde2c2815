// The page's jobs: it submits through POST /jobs and follows the job's events, keeping its id in JOB_STORE, so that
// a reload (or a connection that drops) picks the picture up where it was instead of losing it. A server with no
// event stream to spare (503) is polled instead (GET /jobs/<id>).
const JOB_STORE = "imagine.job";
const RECONNECTS = 5; // times in a row a broken event stream is picked up again before the page gives up
const POLL_MS = 1000; // how often a job is asked where it stands when the server has no event stream to spare
let jobId = null; // the followed job's id

async function runJob(body, submit) {
  showError("");
  controller = new AbortController();
  $("generate").disabled = true;
  $("cancel").disabled = false;
  const started = performance.now();
  setProgress(0, body.num_steps, started);
  $("status").textContent = "generating…";
  try {
    jobId = await submit(controller.signal);
    await followJob(jobId, body, started, controller.signal);
  } catch (error) {
    if (error.name === "AbortError") {
      $("status").textContent = "cancelled";
    } else {
      showError(error.message);
      $("status").textContent = "failed";
    }
  } finally {
    controller = null;
    jobId = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

async function submitJob(body, signal) {
  const response = await fetch("/jobs", { method: "POST", headers: headers(), body: exactJson(body), signal });
  const answer = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw responseError(response, answer);
  // What the page needs to show the result after a reload: the settings, not the input pictures.
  const kept = { ...body, img: undefined, mask: body.mask ? true : undefined };
  localStorage.setItem(JOB_STORE, JSON.stringify({ id: answer.id, body: kept }));
  return answer.id;
}

function responseError(response, answer) {
  if (response.status === 401) askForKey();
  return new Error(answer.error || `HTTP ${response.status}`);
}

function reattach() {
  let saved = null;
  try {
    saved = JSON.parse(localStorage.getItem(JOB_STORE));
  } catch {
    localStorage.removeItem(JOB_STORE);
  }
  if (!saved || !saved.id || controller) return;
  copySettings(saved.body); // the form shows the job's own settings, so that Generate after it draws them again
  runJob(saved.body, async () => saved.id);
}

async function followJob(id, body, started, signal) {
  const every = Number(body.stream) || 1;
  let lastId = null;
  for (let breaks = 0; breaks < RECONNECTS; breaks++) {
    const h = headers();
    if (lastId) h["Last-Event-ID"] = lastId;
    try {
      const response = await fetch(`/jobs/${id}/events?every=${every}`, { headers: h, signal });
      if (response.status === 503) return await pollJob(id, body, started, signal);
      if (!response.ok) {
        const answer = await response.json().catch(() => ({ error: response.statusText }));
        if (response.status === 404) localStorage.removeItem(JOB_STORE); // expired, or another server
        throw responseError(response, answer);
      }
      for await (const event of serverEvents(response)) {
        lastId = event.id;
        breaks = 0;
        if (handleJobEvent(event, body, started)) return;
      }
    } catch (error) {
      if (error.name !== "TypeError") throw error; // a TypeError is the network's: try again
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  throw new Error("lost the connection to the server; reload the page to pick the picture up again");
}

// The job as GET /jobs/<id> shows it, asked for every POLL_MS, handled as its events would be.
async function pollJob(id, body, started, signal) {
  let step = null;
  for (;;) {
    const response = await fetch(`/jobs/${id}?preview=1`, { headers: headers(), signal });
    const answer = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw responseError(response, answer);
    if (["done", "failed", "cancelled"].includes(answer.status)) {
      handleJobEvent({ event: answer.status, data: answer }, body, started);
      return;
    }
    if (answer.step !== step && answer.steps) {
      step = answer.step;
      const moved = { step, steps: answer.steps };
      if (answer.preview) handleJobEvent({ event: "preview", data: { ...moved, img: answer.preview } }, body, started);
      else handleJobEvent({ event: "progress", data: moved }, body, started);
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

// A text/event-stream answer as {id, event, data} objects, data parsed; comments and the retry field skipped.
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const event = { id: null, event: "message", data: "" };
      for (const line of buffered.slice(0, end).split("\n")) {
        const colon = line.indexOf(":");
        if (colon > 0 && line.slice(0, colon) in event) event[line.slice(0, colon)] = line.slice(colon + 1).trim();
      }
      buffered = buffered.slice(end + 2);
      if (event.data) yield { ...event, data: JSON.parse(event.data) };
    }
  }
}

// One event of the job; true once the job has ended.
function handleJobEvent({ event, data }, body, started) {
  if (event === "progress") setProgress(data.step, data.steps, started);
  if (event === "preview") handleLine({ ...data, index: 0, done: false }, body, started);
  if (!["done", "failed", "cancelled"].includes(event)) return false;
  localStorage.removeItem(JOB_STORE);
  if (event === "failed") throw new Error(data.error);
  if (event === "cancelled") $("status").textContent = "cancelled";
  else handleLine({ ...data, done: true }, body, started);
  return true;
}

function cancelJob() {
  if (!jobId) {
    if (controller) controller.abort(); // not submitted yet
    return;
  }
  fetch(`/jobs/${jobId}`, { method: "DELETE", headers: headers() }).catch(() => controller && controller.abort());
}
