// The fluxforge page: plain JavaScript over the server's public API (/v1/capabilities, /v1/jobs and its
// events, images and cancel). No build step, nothing fetched from elsewhere.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = {
  caps: null,
  key: sessionStorage.getItem("fluxforge-key"),
  refs: [], // {name, url (data URL)}
  init: null, // data URL of the init image
  job: null, // the job this page follows
  painting: false,
};

// ---------------------------------------------------------------------------------------------------
// The API, with the key (asked for on a 401, kept for the session)

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers.Authorization = "Bearer " + state.key;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401 && (await askKey())) return api(path, options);
  return response;
}

function askKey() {
  const dialog = $("#key-dialog");
  $("#key").value = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const key = $("#key").value.trim();
      if (key) {
        state.key = key;
        sessionStorage.setItem("fluxforge-key", key);
      }
      resolve(Boolean(key));
    }, { once: true });
  });
}

async function* events(response) {
  // Server-sent events read with fetch, since EventSource cannot send the Authorization header.
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const record = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of record.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      if (data.length) yield { name, data: JSON.parse(data.join("\n")) };
    }
  }
}

async function imageUrl(url) {
  const response = await api(url);
  return URL.createObjectURL(await response.blob());
}

// ---------------------------------------------------------------------------------------------------
// Capabilities: defaults, limits, which controls apply to this model

async function loadCapabilities() {
  for (;;) {
    const response = await api("/v1/capabilities");
    if (response.ok) {
      state.caps = await response.json();
      break;
    }
    $("#model").textContent = response.status === 503 ? "the model is loading…" : "the server is not answering";
    await new Promise((r) => setTimeout(r, 1000));
  }
  const caps = state.caps;
  const d = caps.defaults;
  $("#model").textContent = `${caps.model} · ${d.width}x${d.height} · ${d.steps} steps by default`;
  $("#width").value = d.width;
  $("#height").value = d.height;
  $("#steps").value = d.steps;
  $("#steps").max = caps.limits.max_steps;
  $("#count").max = caps.limits.max_n;
  $("#guidance-field").hidden = !caps.guidance;
  if (caps.guidance) $("#guidance").value = d.guidance;
  $("#negative-field").hidden = !caps.negative_prompt;
  renderLoras(caps.loras || []);
  $("#seed").value = randomSeed();
  showMode();
}

// The server's LoRAs (fluxforge serve --lora NAME=FILE): a checkbox and a scale each, none on by default.
function renderLoras(loras) {
  const list = $("#lora-list");
  list.replaceChildren();
  $("#lora-field").hidden = loras.length === 0;
  for (const lora of loras) {
    const row = document.createElement("div");
    row.className = "lora";
    const use = document.createElement("input");
    use.type = "checkbox";
    use.id = `lora-${lora.name}`;
    use.dataset.name = lora.name;
    const label = document.createElement("label");
    label.htmlFor = use.id;
    label.textContent = `${lora.name} (${lora.kind}, ${lora.layout})`;
    const scale = document.createElement("input");
    scale.type = "number";
    scale.step = "0.1";
    scale.value = "1";
    scale.setAttribute("aria-label", `${lora.name} scale`);
    scale.className = "lora-scale";
    row.append(use, label, scale);
    list.append(row);
  }
}

function chosenLoras() {
  return [...document.querySelectorAll("#lora-list .lora")]
    .filter((row) => row.querySelector("input[type=checkbox]").checked)
    .map((row) => ({
      name: row.querySelector("input[type=checkbox]").dataset.name,
      scale: Number(row.querySelector(".lora-scale").value),
    }));
}

function randomSeed() {
  return Math.floor(Math.random() * 2 ** 31);
}

// ---------------------------------------------------------------------------------------------------
// Modes

const HINTS = {
  "text-to-image": "The picture comes from the prompt alone.",
  references: "Reference images condition the picture; none of them is noised, so there is no strength.",
  img2img: "The init image is noised by the strength and denoised again; references may be added.",
  inpaint: "Paint the area to repaint on the init image; the rest is kept. References may be added.",
};

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function setMode(value) {
  document.querySelector(`input[name=mode][value="${value}"]`).checked = true;
  showMode();
}

function showMode() {
  const m = mode();
  $("#mode-hint").textContent = HINTS[m];
  const usesInit = m === "img2img" || m === "inpaint";
  $("#init-section").hidden = !usesInit;
  $("#init-title").textContent = m === "inpaint" ? "Image to repaint" : "Init image";
  $("#brush-tools").hidden = m !== "inpaint";
  $("#mask").hidden = m !== "inpaint";
  $("#ref-section").hidden = m === "text-to-image";
  $("#ref-section h2").firstChild.textContent = m === "references" ? "References " : "Extra references (optional) ";
  $("#own-size-label").hidden = m === "text-to-image";
  const strength = $("#strength");
  if (m === "inpaint" && strength.dataset.mode !== "inpaint") strength.value = 1;
  if (m === "img2img" && strength.dataset.mode !== "img2img") strength.value = 0.6;
  strength.dataset.mode = m;
  $("#strength-value").textContent = Number(strength.value).toFixed(2);
  sizeFields();
  renderRefs();
}

function sizeFields() {
  const own = mode() !== "text-to-image" && $("#own-size").checked;
  $("#width").disabled = own;
  $("#height").disabled = own;
}

// ---------------------------------------------------------------------------------------------------
// Images: references, init image, mask

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addRefs(files) {
  const limit = state.caps ? state.caps.limits.max_references : 10;
  for (const file of files) {
    if (state.refs.length >= limit) {
      showError({ param: "references", message: `at most ${limit} references on this server` });
      break;
    }
    state.refs.push({ name: file.name || "image", url: await readFile(file) });
  }
  renderRefs();
}

function renderRefs() {
  const list = $("#ref-list");
  list.replaceChildren();
  const limit = state.caps ? state.caps.limits.max_references : 10;
  $("#ref-count").textContent = `(${state.refs.length} of at most ${limit})`;
  state.refs.forEach((ref, i) => {
    const item = document.createElement("li");
    const img = document.createElement("img");
    img.src = ref.url;
    img.alt = `reference ${i + 1}: ${ref.name}`;
    item.append(img);
    for (const [label, text, action] of [
      [`Move reference ${i + 1} earlier`, "◀", () => moveRef(i, -1)],
      [`Remove reference ${i + 1}`, "✕", () => { state.refs.splice(i, 1); renderRefs(); }],
      [`Move reference ${i + 1} later`, "▶", () => moveRef(i, 1)],
    ]) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = text;
      button.title = label;
      button.setAttribute("aria-label", label);
      button.addEventListener("click", action);
      item.append(button);
    }
    list.append(item);
  });
}

function moveRef(i, delta) {
  const j = i + delta;
  if (j < 0 || j >= state.refs.length) return;
  [state.refs[i], state.refs[j]] = [state.refs[j], state.refs[i]];
  renderRefs();
}

const mask = { canvas: document.createElement("canvas") }; // black = keep, white = repaint (what is sent)

async function setInit(url) {
  state.init = url;
  const img = $("#init-preview");
  await new Promise((resolve) => { img.onload = resolve; img.src = url; });
  $("#canvas-wrap").hidden = false;
  const shown = $("#mask");
  for (const canvas of [shown, mask.canvas]) {
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
  }
  clearMask();
}

function clearMask() {
  const ctx = mask.canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, mask.canvas.width, mask.canvas.height);
  const shown = $("#mask");
  shown.getContext("2d").clearRect(0, 0, shown.width, shown.height);
}

function paint(event) {
  const shown = $("#mask");
  const rect = shown.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * shown.width;
  const y = ((event.clientY - rect.top) / rect.height) * shown.height;
  const radius = (Number($("#brush").value) / 2) * (shown.width / rect.width);
  const erase = $("#eraser").checked;
  for (const [canvas, color] of [[mask.canvas, erase ? "#000" : "#fff"], [shown, "rgba(255, 40, 40, 1)"]]) {
    const ctx = canvas.getContext("2d");
    ctx.globalCompositeOperation = canvas === shown && erase ? "destination-out" : "source-over";
    ctx.fillStyle = color;
    ctx.beginPath();
    ctx.arc(x, y, radius, 0, 2 * Math.PI);
    ctx.fill();
  }
}

function dropZone(zone, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    onFiles([...e.dataTransfer.files].filter((f) => f.type.startsWith("image/")));
  });
}

// ---------------------------------------------------------------------------------------------------
// Errors beside the control they name

function clearErrors() {
  document.querySelectorAll(".error").forEach((e) => { e.textContent = ""; });
  document.querySelectorAll(".invalid").forEach((e) => e.classList.remove("invalid"));
}

const CONTROLS = {
  prompt: "#prompt", steps: "#steps", guidance: "#guidance", negative_prompt: "#negative", seed: "#seed",
  num_images: "#count", strength: "#strength", init_image: "#init", mask: "#mask", "width/height": "#width",
};

function showError(error) {
  let param = error.param || "";
  const item = /^references\[(\d+)\]$/.exec(param);
  if (item) param = "references";
  if (param === "width" || param === "height") param = "width/height";
  let slot = document.querySelector(`.error[data-for="${CSS.escape(param)}"]`);
  if (!slot || slot.closest("[hidden]")) slot = $("#general-error");
  slot.textContent = error.message;
  if (item) $("#ref-list").children[Number(item[1])]?.classList.add("invalid");
  const control = CONTROLS[param] && $(CONTROLS[param]);
  if (control) {
    control.classList.add("invalid");
    control.setAttribute("aria-describedby", "");
    if (!control.closest("[hidden]") && control.focus) control.focus();
  }
}

// ---------------------------------------------------------------------------------------------------
// A job: submit, follow its events, show its results

function requestBody() {
  const m = mode();
  const body = {
    prompt: $("#prompt").value,
    steps: Number($("#steps").value) || undefined,
    num_images: Number($("#count").value) || 1,
  };
  if (!$("#seed-lock").checked) $("#seed").value = randomSeed();
  body.seed = Number($("#seed").value);
  if (!$("#guidance-field").hidden && $("#guidance").value !== "") body.guidance = Number($("#guidance").value);
  if (!$("#negative-field").hidden && $("#negative").value.trim()) body.negative_prompt = $("#negative").value;
  if (m === "text-to-image" || !$("#own-size").checked) {
    body.width = Number($("#width").value) || undefined;
    body.height = Number($("#height").value) || undefined;
  }
  if (m !== "text-to-image" && state.refs.length) body.references = state.refs.map((r) => r.url);
  if (m === "img2img" || m === "inpaint") {
    if (state.init) body.init_image = state.init;
    body.strength = Number($("#strength").value);
  }
  if (m === "inpaint" && state.init) body.mask = mask.canvas.toDataURL("image/png");
  const loras = chosenLoras();
  if (loras.length) body.loras = loras;
  return body;
}

async function generate() {
  clearErrors();
  const m = mode();
  if (m === "references" && !state.refs.length) {
    return showError({ param: "references", message: "add at least one reference image" });
  }
  if ((m === "img2img" || m === "inpaint") && !state.init) {
    return showError({ param: "init_image", message: "choose the init image first" });
  }
  $("#generate").disabled = true;
  try {
    const response = await api("/v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
    });
    const data = await response.json();
    if (!response.ok) {
      showError(data.error);
      return;
    }
    await follow(data);
  } catch (error) {
    showError({ message: String(error) });
  } finally {
    $("#generate").disabled = false;
  }
}

function describe(job) {
  if (job.status === "queued") {
    return job.queue_position === 0 ? "Queued: runs next" : `Queued: ${job.queue_position} ahead`;
  }
  if (job.status === "running") return `Running: step ${job.progress.step} of ${job.progress.total}`;
  return job.status === "succeeded" ? "Done" : `${job.status[0].toUpperCase()}${job.status.slice(1)}`;
}

async function follow(job) {
  state.job = job;
  const status = $("#status");
  const bar = $("#progress");
  const preview = $("#preview");
  status.textContent = describe(job);
  bar.hidden = false;
  bar.value = 0;
  preview.hidden = true;
  $("#results").replaceChildren();
  $("#cancel").hidden = false;
  try {
    const response = await api(job.urls.events);
    for await (const { name, data } of events(response)) {
      if (state.job?.id !== job.id) return; // another job took over this panel
      if (name === "state") {
        status.textContent = describe(data.job);
      } else if (name === "queued") {
        status.textContent = describe({ status: "queued", queue_position: data.queue_position });
      } else if (name === "started") {
        status.textContent = "Running";
      } else if (name === "progress") {
        bar.max = data.total;
        bar.value = data.step;
        status.textContent = `Running: step ${data.step} of ${data.total}`;
      } else if (name === "preview") {
        preview.src = "data:image/jpeg;base64," + data.image;
        preview.hidden = false;
      } else if (name === "completed" || name === "failed" || name === "canceled") {
        break;
      }
    }
  } finally {
    $("#cancel").hidden = true;
  }
  const final = await (await api(job.urls.self)).json();
  status.textContent = describe(final);
  if (final.error && final.status === "failed") showError({ message: final.error.message, param: final.error.param });
  if (final.status === "succeeded") {
    bar.value = bar.max;
    preview.hidden = true;
  }
  await showResults(final);
  await loadHistory();
}

async function showResults(job) {
  const results = $("#results");
  results.replaceChildren();
  if (!job.result) return;
  const r = job.request;
  for (const [i, image] of job.result.images.entries()) {
    const url = await imageUrl(image.url);
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = `result ${i + 1} of “${r.prompt}”, seed ${image.seed}`;
    const caption = document.createElement("figcaption");
    caption.textContent = `seed ${image.seed} · ${image.width}x${image.height} · ${job.result.info.steps} steps · ` +
      `${job.mode}${job.result.info.guidance != null ? " · guidance " + job.result.info.guidance : ""}` +
      `${r.strength != null ? " · strength " + r.strength : ""}`;
    const buttons = document.createElement("div");
    buttons.className = "buttons";
    const download = document.createElement("a");
    download.href = url;
    download.download = `fluxforge-${image.seed}.png`;
    download.textContent = "Download";
    const asRef = button("Use as reference", async () => {
      state.refs.push({ name: `seed ${image.seed}`, url: await blobToDataUrl(url) });
      if (mode() === "text-to-image") setMode("references");
      else renderRefs();
    });
    const asInit = button("Use as init image", async () => {
      await setInit(await blobToDataUrl(url));
      if (mode() !== "inpaint") setMode("img2img");
    });
    buttons.append(download, asRef, asInit);
    figure.append(img, caption, buttons);
    results.append(figure);
  }
}

function button(text, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.addEventListener("click", action);
  return b;
}

async function blobToDataUrl(url) {
  return readFile(await (await fetch(url)).blob());
}

async function loadHistory() {
  const response = await api("/v1/jobs?limit=12");
  if (!response.ok) return;
  const jobs = (await response.json()).data;
  const list = $("#history");
  list.replaceChildren();
  for (const job of jobs) {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    const label = document.createElement("span");
    label.className = `status-${job.status}`;
    label.textContent = job.status;
    const prompt = document.createElement("div");
    prompt.textContent = `${job.mode}: ${job.request.prompt ?? ""}`;
    open.append(label, prompt);
    if (job.result) {
      for (const image of job.result.images.slice(0, 4)) {
        const img = document.createElement("img");
        img.alt = `seed ${image.seed}`;
        img.src = await imageUrl(image.url);
        open.append(img);
      }
    }
    open.addEventListener("click", async () => {
      state.job = null;
      $("#status").textContent = describe(job);
      $("#progress").hidden = true;
      $("#preview").hidden = true;
      await showResults(job);
    });
    item.append(open);
    list.append(item);
  }
}

// ---------------------------------------------------------------------------------------------------

function wire() {
  document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", showMode));
  $("#own-size").addEventListener("change", sizeFields);
  $("#strength").addEventListener("input", () => {
    $("#strength-value").textContent = Number($("#strength").value).toFixed(2);
  });
  $("#refs").addEventListener("change", async (e) => { await addRefs([...e.target.files]); e.target.value = ""; });
  dropZone($("#ref-drop"), addRefs);
  $("#init").addEventListener("change", async (e) => {
    if (e.target.files[0]) await setInit(await readFile(e.target.files[0]));
  });
  dropZone($("#init-drop"), async (files) => { if (files[0]) await setInit(await readFile(files[0])); });
  const shown = $("#mask");
  shown.addEventListener("pointerdown", (e) => { state.painting = true; shown.setPointerCapture(e.pointerId); paint(e); });
  shown.addEventListener("pointermove", (e) => { if (state.painting) paint(e); });
  shown.addEventListener("pointerup", () => { state.painting = false; });
  $("#clear-mask").addEventListener("click", clearMask);
  $("#form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
      e.preventDefault();
      if (!$("#generate").disabled) generate();
    }
  });
  $("#cancel").addEventListener("click", async () => {
    if (state.job) await api(state.job.urls.cancel, { method: "POST" });
  });
}

wire();
loadCapabilities().then(loadHistory);
