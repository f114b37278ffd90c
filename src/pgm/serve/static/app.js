// The page of `pgm serve`: requests go to POST /stream, whose server-sent events are read from the
// fetch response (so that a request has a JSON body, and aborting the fetch cancels its work).
"use strict";

const $ = (id) => document.getElementById(id);
window.pgmLog = [];  // one entry per event shown: what a browser test checks was on the page

async function streamRequest(body, onEvent, signal) {
  const response = await fetch("/stream", {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body), signal,
  });
  if (!response.ok) {
    const refused = await response.json().catch(() => ({error: `the server answered ${response.status}`}));
    throw new Error(refused.error);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) throw new Error("the server closed the stream before the end");
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const kind = /^event: (.*)$/m.exec(frame)[1];
      const data = JSON.parse(/^data: (.*)$/m.exec(frame)[1]);
      if (kind === "error") throw new Error(data.error);
      onEvent(kind, data);
      if (kind === "done") return data;
    }
  }
}

function formValues(form) {
  // The form's filled-in fields as the pipeline's arguments (blank: the default).
  const body = {};
  for (const field of form.querySelectorAll("input[name], select[name]")) {
    if (field.value === "") continue;
    body[field.name] = field.type === "number" ? Number(field.value) : field.value;
  }
  return body;
}

function textRequest(form, promptField) {
  const body = formValues(form);
  const text = promptField.value;
  if (/\{\{|\}\}/.test(text)) body.infill = text;
  else if (text.trim() !== "") body.prompt = text;
  return body;
}

function showError(element, error) {
  element.hidden = !error;
  element.textContent = error ? error.message || String(error) : "";
}

function speed(message) {
  const rate = message.elapsed > 0 ? message.generated / message.elapsed : 0;
  return `${message.elapsed.toFixed(2)} s · ${message.generated} tokens · ${rate.toFixed(0)} tokens/s`;
}

// One request's samples as token slots: given tokens, holes, and each step's new tokens highlighted.
class TextView {
  constructor(output, status, panel) {
    this.output = output; this.status = status; this.panel = panel;
  }
  start(message) {
    this.output.replaceChildren();
    this.rows = [];
    const length = message.length;
    message.positions.forEach((positions, row) => {
      const sample = document.createElement("div");
      sample.className = "sample";
      const slots = [];
      for (let p = 1; p < length; p++) {  // position 0 is the BOS
        const slot = document.createElement("span");
        slot.className = "tok hole";
        slot.textContent = "·";
        sample.append(slot);
        slots[p] = slot;
      }
      positions.forEach((p, j) => {
        if (p === 0) return;
        slots[p].className = "tok given";
        slots[p].textContent = message.pieces[row][j];
      });
      this.output.append(sample);
      this.rows.push({sample, slots});
    });
    this.fresh = [];
    this.status.textContent = `step 0 / ${message.steps}`;
    this.log(message, "start");
  }
  step(message) {
    for (const slot of this.fresh) slot.classList.remove("new");
    this.fresh = [];
    message.positions.forEach((positions, row) => positions.forEach((p, j) => {
      const slot = this.rows[row].slots[p];
      slot.className = "tok new";
      slot.textContent = message.pieces[row][j];
      this.fresh.push(slot);
    }));
    this.status.textContent = `step ${message.step + 1} / ${message.steps} · ${speed(message)}`;
    this.log(message, "step");
  }
  done(message) {
    for (const slot of this.fresh) slot.classList.remove("new");
    message.texts.forEach((text, row) => {
      this.rows[row].sample.dataset.text = text;
      this.rows[row].sample.classList.add("done");
    });
    this.status.textContent = `done: ${message.steps} steps · ${speed(message)}`;
    this.log(message, "done");
  }
  log(message, kind) {
    const filled = this.rows.map(({slots}) => slots.filter((s) => s && !s.classList.contains("hole")).length);
    window.pgmLog.push({panel: this.panel, kind, step: message.step, filled, texts: message.texts || null,
                        rate: message.tokens_per_second ?? null, at: performance.now()});
  }
  handle(kind, message) { this[kind](message); }
}

// A form with Go and Stop buttons; `run(signal)` does the work, Stop or a new request aborts it.
function wire(name, run) {
  const form = $(`${name}-form`), go = $(`${name}-go`), stop = $(`${name}-stop`), error = $(`${name}-error`);
  let controller = null;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (controller) controller.abort();
    controller = new AbortController();
    const mine = controller;
    showError(error, null);
    window.pgmLog.push({panel: name, kind: "submit", at: performance.now()});
    go.disabled = true; stop.disabled = false;
    try {
      await run(mine.signal);
    } catch (failure) {
      if (failure.name !== "AbortError") showError(error, failure);
    } finally {
      if (controller === mine) { controller = null; go.disabled = false; stop.disabled = true; }
    }
  });
  stop.addEventListener("click", () => { if (controller) controller.abort(); });
}

function fillSelect(select, values, labels) {
  select.replaceChildren(...values.map((value, i) => new Option(labels ? labels[i] : value, value)));
}

// A PGM's encoder cache: re-encode the clean set every N steps, or never (blank: exact, no cache).
const CACHE_CHOICES = [["", "none (exact)"], ["1", "refresh every step"], ["2", "refresh every 2"],
                       ["4", "refresh every 4"], ["8", "refresh every 8"], ["16", "refresh every 16"],
                       ["never", "never refresh"]];

function cacheSetting(select) {
  // The cache_refresh argument of a cache select: {} for none, a number of steps, or "never".
  const value = select.value;
  return value === "" ? {} : {cache_refresh: value === "never" ? value : Number(value)};
}

function cacheFor(select, run) {
  // Only a PGM has an encoder cache: the select shows and counts for PGM runs only.
  const pgm = run?.kind === "pgm";
  select.closest("label").hidden = !pgm;
  if (!pgm) select.value = "";
}

async function setUp() {
  const {runs} = await (await fetch("/runs")).json();
  const text = runs.filter((r) => r.modality === "text"), image = runs.filter((r) => r.modality === "image");
  $("runs-summary").textContent = runs.map((r) => `${r.name} (${r.kind}, ${(r.parameters / 1e6).toFixed(2)}M, ` +
                                                  `${r.device} ${r.precision})`).join(" · ");
  const byName = Object.fromEntries(runs.map((r) => [r.name, r]));
  for (const select of document.querySelectorAll(".text-runs")) fillSelect(select, text.map((r) => r.name));
  for (const select of document.querySelectorAll(".image-runs")) fillSelect(select, image.map((r) => r.name));
  for (const select of document.querySelectorAll(".cache-refresh")) {
    fillSelect(select, CACHE_CHOICES.map(([value]) => value), CACHE_CHOICES.map(([, label]) => label));
  }

  // Tabs: only those with runs to show.
  const available = {write: text.length > 0, race: text.length > 1, images: image.length > 0};
  const tabs = [...document.querySelectorAll("#tabs .tab")];
  const show = (panel) => {
    for (const tab of tabs) tab.classList.toggle("active", tab.dataset.panel === panel);
    for (const section of document.querySelectorAll(".panel")) section.hidden = section.id !== panel;
    history.replaceState(null, "", `#${panel}`);
  };
  for (const tab of tabs) {
    tab.hidden = !available[tab.dataset.panel];
    tab.addEventListener("click", () => show(tab.dataset.panel));
  }
  const wanted = location.hash.slice(1);
  show(available[wanted] ? wanted : Object.keys(available).find((panel) => available[panel]));

  // Write: one run.
  const writeRun = () => {
    fillSelect(document.querySelector("#write-form .orders"), byName[$("write-run").value]?.orders || []);
    cacheFor($("write-cache"), byName[$("write-run").value]);
  };
  $("write-run").addEventListener("change", writeRun);
  writeRun();
  const writer = new TextView($("write-output"), $("write-status"), "write");
  wire("write", (signal) => streamRequest({...textRequest($("write-form"), $("write-prompt")),
                                           ...cacheSetting($("write-cache"))},
                                          (kind, message) => writer.handle(kind, message), signal));

  // Race: the same request on two runs at once, a PGM on the left and a masked model on the right by default.
  if (text.length > 1) {
    const pgm = text.find((r) => r.kind === "pgm") || text[0];
    $("race-a").value = pgm.name;
    $("race-b").value = (text.find((r) => r.name !== pgm.name && r.kind === "mdlm") ||
                         text.find((r) => r.name !== pgm.name)).name;
  }
  for (const side of ["a", "b"]) {
    const lane = () => cacheFor($(`race-${side}-cache`), byName[$(`race-${side}`).value]);
    $(`race-${side}`).addEventListener("change", lane);
    lane();
  }
  wire("race", async (signal) => {
    const body = textRequest($("race-form"), $("race-prompt"));
    const lanes = ["a", "b"].map((side) => {
      const name = $(`race-${side}`).value, cache = cacheSetting($(`race-${side}-cache`));
      const label = name + ("cache_refresh" in cache ? ` with its cache (refresh: ${cache.cache_refresh})` : "");
      $(`race-${side}-name`).textContent = `${label} (${byName[name].kind})`;
      const view = new TextView($(`race-${side}-output`), $(`race-${side}-status`), `race-${side}`);
      return {name, cache, label, view};
    });
    $("race-result").textContent = "";
    const finished = [];
    const results = await Promise.all(lanes.map(({name, cache, label, view}) =>
      streamRequest({...body, ...cache, run: name}, (kind, message) => view.handle(kind, message), signal)
        .then((message) => { finished.push(label); return {...message, label}; })));
    const [left, right] = results;
    const ratio = left.tokens_per_second / right.tokens_per_second;
    const [fast, slow] = ratio >= 1 ? [left, right] : [right, left];
    $("race-result").textContent = `${finished[0]} finished first · ${fast.label} generated ` +
      `${(fast.tokens_per_second / slow.tokens_per_second).toFixed(2)}x the tokens/s of ${slow.label} ` +
      `(${left.tokens_per_second.toFixed(0)} vs ${right.tokens_per_second.toFixed(0)} tokens/s)`;
    $("race-result").dataset.ratio = ratio.toFixed(4);
  });

  // Images: classes, guidance, sampler; or complete a validation image.
  let chosen = null;
  const imageRun = () => byName[$("images-run").value];
  const imagesSetUp = () => {
    const run = imageRun();
    if (!run) return;
    fillSelect($("images-classes"), ["none", ...run.classes.map((_, i) => String(i))], ["none (unconditional)", ...run.classes]);
    fillSelect(document.querySelector("#images-form .image-samplers"), run.samplers);
    fillSelect($("images-region"), run.regions);
    chosen = null;
    $("images-validation").replaceChildren(...run.validation.map((item) => {
      const thumb = new Image();
      thumb.src = item.url; thumb.title = `${run.classes[item.label]} (validation image ${item.index})`;
      thumb.dataset.index = item.index;
      thumb.addEventListener("click", () => {
        for (const other of $("images-validation").children) other.classList.remove("chosen");
        thumb.classList.add("chosen");
        chosen = item;
      });
      return thumb;
    }));
  };
  const modeSetUp = () => {
    const inpaint = $("images-mode").value === "inpaint";
    for (const element of document.querySelectorAll(".inpaint-only")) element.hidden = !inpaint;
    for (const element of document.querySelectorAll(".generate-only")) element.hidden = inpaint;
    $("images-go").textContent = inpaint ? "Complete" : "Generate";
  };
  $("images-run").addEventListener("change", imagesSetUp);
  $("images-mode").addEventListener("change", modeSetUp);
  imagesSetUp(); modeSetUp();
  wire("images", async (signal) => {
    const run = imageRun();
    const body = {...formValues($("images-form")), run: run.name};
    if ($("images-mode").value === "inpaint") {
      if (!chosen) throw new Error("pick a validation image to complete");
      const blob = await (await fetch(chosen.url)).blob();
      const url = await new Promise((resolve) => { const r = new FileReader(); r.onload = () => resolve(r.result); r.readAsDataURL(blob); });
      Object.assign(body, {known: $("images-region").value, images: [url], classes: [String(chosen.label)]});
    } else {
      const classes = [...$("images-classes").selectedOptions].map((option) => option.value);
      if (classes.length) body.classes = classes;
    }
    const output = $("images-output"), status = $("images-status");
    let pictures = [];
    const draw = (message) => {
      if (!message.images) return;
      if (pictures.length !== message.images.length) {
        pictures = message.images.map(() => new Image());
        output.replaceChildren(...pictures);
      }
      message.images.forEach((url, i) => { pictures[i].src = url; });
    };
    await streamRequest(body, (kind, message) => {
      draw(message);
      status.textContent = kind === "done" ? `done: ${message.steps} steps · ${speed(message)}`
                                           : kind === "start" ? `step 0 / ${message.steps}`
                                           : `step ${message.step + 1} / ${message.steps} · ${speed(message)}`;
      window.pgmLog.push({panel: "images", kind, step: message.step, images: message.images ? message.images.length : 0});
    }, signal);
  });
}

setUp().catch((failure) => {
  document.querySelector("main").prepend(Object.assign(document.createElement("p"),
    {className: "error", textContent: `cannot reach the server: ${failure.message}`}));
});
