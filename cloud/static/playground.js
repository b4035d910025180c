// pice playground. Plain JS, no dependencies. Model text is only ever set as textContent.
"use strict";

const KEY_STORE = "pice.apiKey";
const $ = (id) => document.getElementById(id);

// ---- small helpers ------------------------------------------------------------------------

/** An element with attributes; string children become text nodes (never parsed as HTML). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("data-")) node.setAttribute(k, String(v));
    else node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    node.append(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
}

const secs = (s) => `${s.toFixed(2)} s`;
const shortName = (spec) => {
  if (!spec) return "";
  const parts = String(spec).split("/").filter(Boolean);
  return parts.length ? parts[parts.length - 1] : String(spec);
};

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = localStorage.getItem(KEY_STORE);
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

/** The API's error body ({error: {message}}) as one line, or the HTTP status. */
async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}`;
}

function showNotice(text) {
  const n = $("notice");
  if (!text) { n.hidden = true; n.textContent = ""; return; }
  n.textContent = text;
  n.hidden = false;
}

function authHint(status) {
  return status === 401 ? " Enter this server's API key at the top right." : "";
}

/** Server-sent events from a fetch response: yields {event, data} as each one completes. */
async function* readSSE(resp, signal) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  const onAbort = () => reader.cancel().catch(() => {});
  if (signal) signal.addEventListener("abort", onAbort, { once: true });
  let buf = "";
  let name = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      for (;;) {
        const m = /\r\n|\r|\n/.exec(buf);
        if (!m) break;
        if (m[0] === "\r" && m.index === buf.length - 1) break; // maybe half of \r\n
        const line = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        if (line === "") {
          if (data.length) yield { event: name || "message", data: data.join("\n") };
          name = "";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "event") name = val;
          else if (field === "data") data.push(val);
        }
      }
    }
    if (data.length) yield { event: name || "message", data: data.join("\n") };
  } finally {
    if (signal) signal.removeEventListener("abort", onAbort);
  }
}

// ---- timeline -----------------------------------------------------------------------------

const timeline = {
  entries: [],
  reset() {
    this.entries = [];
    $("timeline").replaceChildren();
    $("elapsed").textContent = "";
  },
  add(kind, label, t) {
    const track = el("span", { class: "track" }, el("i"));
    const li = el("li", { "data-kind": kind },
      el("span", { class: "dot" }),
      el("span", { class: "what", title: label }, label, track),
      el("span", { class: "t" }, `+${secs(t)}`));
    this.entries.push({ t, bar: track.firstChild });
    $("timeline").append(li);
    const end = Math.max(...this.entries.map((e) => e.t), 0.001);
    for (const e of this.entries) e.bar.style.width = `${Math.max(2, (100 * e.t) / end)}%`;
    $("elapsed").textContent = secs(end);
  },
};

// ---- the progressive run ------------------------------------------------------------------

let current = null; // AbortController of the running question

function resetAnswer() {
  $("sections").replaceChildren();
  $("cloud-text").textContent = "";
  $("cloud-text").hidden = true;
  $("cloud-text").classList.remove("live");
  $("summary").replaceChildren();
  $("summary").hidden = true;
  $("reason").hidden = true;
  $("run-mode").hidden = true;
  $("empty").hidden = true;
  showNotice("");
  timeline.reset();
}

function sectionItem(index) {
  let li = $("sections").querySelector(`li[data-index="${index}"]`);
  if (li) return li;
  li = el("li", { class: "section", "data-index": index, "data-state": "pending" },
    el("span", { class: "num" }, String(index + 1)),
    el("div", { class: "body" },
      el("div", { class: "point" }),
      el("p", { class: "text", hidden: true }),
      el("div", { class: "waiting muted small" }, el("span", { class: "bar-skeleton" }), "expanding on an edge…"),
      el("div", { class: "meta", hidden: true })));
  // keep the list in point order whatever order items are created in
  const after = [...$("sections").children].find((c) => Number(c.dataset.index) > index);
  $("sections").insertBefore(li, after || null);
  return li;
}

function showPoint(index, text) {
  const li = sectionItem(index);
  const point = li.querySelector(".point");
  point.textContent = text;
  li.dataset.point = text;
}

function showSection(s, t) {
  const li = sectionItem(s.index);
  const title = li.dataset.point || "";
  const p = li.querySelector(".text");
  const text = String(s.text);
  if (title && text.startsWith(title)) { // bold the point's own words, keep the text whole
    p.replaceChildren(el("strong", {}, title), text.slice(title.length));
    li.querySelector(".point").hidden = true;
  } else {
    p.replaceChildren(text);
  }
  p.hidden = false;
  li.querySelector(".waiting").hidden = true;
  li.dataset.state = "done";
  const cloudWritten = s.score === null || s.score === undefined;
  if (cloudWritten) li.dataset.workerKind = "cloud";
  const meta = li.querySelector(".meta");
  meta.replaceChildren(...[
    el("span", { class: `chip ${cloudWritten ? "cloud" : "edge"}`, title: "worker that wrote it" }, s.worker),
    s.model ? el("span", { class: "chip", title: s.model }, shortName(s.model)) : null,
    el("span", { class: "chip adapter", title: "LoRA adapter" }, s.adapter ? s.adapter : "base model"),
    s.score !== null && s.score !== undefined
      ? el("span", { class: "chip", title: candidatesTitle(s) }, `score ${s.score.toFixed(2)}`
        + (s.candidates && s.candidates.length > 1 ? ` · best of ${s.candidates.length}` : ""))
      : null,
    el("span", { class: "chip", title: "mean per-token log-probability" }, `logprob ${Number(s.logprob).toFixed(2)}`),
    el("span", { class: "chip" }, `${s.tokens} tok`),
    s.repaired ? el("span", { class: "chip warn", title: s.repaired }, "rewritten by the cloud") : null,
    el("span", { class: "chip time" }, `+${secs(t)}`)].filter(Boolean));
  meta.hidden = false;
}

function candidatesTitle(s) {
  if (!s.candidates || !s.candidates.length) return "selection score";
  return s.candidates.map((c) => `candidate ${c.candidate} on ${c.worker}: ${Number(c.score).toFixed(3)}`).join("\n");
}

function showSummary(target, rows) {
  const dl = $(target);
  dl.replaceChildren(...rows.filter(Boolean).map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v))));
  dl.hidden = false;
}

function showDone(d, t) {
  const mode = $("run-mode");
  mode.textContent = d.mode;
  mode.className = d.mode === "cloud" ? "tag cloud" : "tag";
  mode.hidden = false;
  if (d.reason) { $("reason").textContent = `Why: ${d.reason}`; $("reason").hidden = false; }
  $("cloud-text").classList.remove("live");
  const tm = d.timings || {};
  const tk = d.tokens || {};
  const ad = d.adapter || null;
  showSummary("summary", [
    tm.ttft !== undefined && ["first text", secs(tm.ttft)],
    tm.sketch !== undefined && ["sketch", secs(tm.sketch)],
    tm.first_section !== undefined && ["first section", secs(tm.first_section)],
    tm.total !== undefined && ["server total", secs(tm.total)],
    ["in browser", secs(t)],
    ["tokens cloud / edge", `${tk.cloud ?? 0} / ${tk.edge ?? 0}`],
    d.ensemble > 1 && ["candidates", `${d.ensemble} per point`],
    ad && ad.name && ["adapter", `${ad.name} (${ad.selected_by || "request"})`],
  ]);
}

async function ask() {
  const question = $("question").value.trim();
  if (!question) { $("question").focus(); return; }
  if (current) current.abort();
  const ctl = new AbortController();
  current = ctl;
  resetAnswer();
  const t0 = performance.now();
  const now = () => (performance.now() - t0) / 1000;
  const body = { question, mode: $("mode").value, stream: true };
  if ($("adapter").value) body.adapter = $("adapter").value;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  $("run-status").textContent = "sending…";
  $("ask").disabled = true;
  $("compare").disabled = false;
  timeline.add("start", "request sent", 0);
  let sections = 0;
  let points = 0;
  try {
    const resp = await fetch("/v1/progressive", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: ctl.signal });
    if (!resp.ok) throw new Error(await errorText(resp) + authHint(resp.status));
    $("run-status").textContent = "sketching…";
    for await (const ev of readSSE(resp, ctl.signal)) {
      let d;
      try { d = JSON.parse(ev.data); } catch (_) { continue; } // pings and the like
      const t = now();
      if (ev.event === "point") {
        points += 1;
        showPoint(d.index, d.text);
        timeline.add("point", `point ${d.index + 1}: ${d.text}`, t);
      } else if (ev.event === "sketch") {
        d.points.forEach((p, i) => showPoint(i, p));
        timeline.add("sketch", `sketch complete (${d.points.length} points)`, t);
        $("run-status").textContent = `expanding ${d.points.length - sections} of ${d.points.length}…`;
      } else if (ev.event === "section") {
        sections += 1;
        showSection(d, t);
        timeline.add("section", `section ${d.index + 1} from ${d.worker}`, t);
        const total = $("sections").children.length;
        if (sections < total) $("run-status").textContent = `${sections} of ${total} sections`;
      } else if (ev.event === "delta") {
        const box = $("cloud-text");
        if (box.hidden) {
          box.hidden = false;
          box.classList.add("live");
          timeline.add("delta", "first cloud token", t);
        }
        box.append(d.text);
      } else if (ev.event === "done") {
        timeline.add("done", `done (${d.mode})`, t);
        if (d.mode === "cloud") $("sections").replaceChildren();
        showDone(d, t);
        $("run-status").textContent = d.mode === "progressive"
          ? `${sections} sections from ${points} points` : "answered in full by the cloud";
      } else if (ev.event === "error") {
        timeline.add("error", "error", t);
        throw new Error(d.error && d.error.message ? d.error.message : ev.data);
      }
    }
  } catch (err) {
    if (ctl.signal.aborted) return;
    $("run-status").textContent = "failed";
    for (const w of $("sections").querySelectorAll("li[data-state='pending'] .waiting")) {
      w.replaceChildren("not delivered");
    }
    showNotice(String(err.message || err));
  } finally {
    if (current === ctl) { current = null; $("ask").disabled = false; }
  }
}

// ---- full cloud, side by side -------------------------------------------------------------

let cloudRun = null;

async function compare() {
  const question = $("question").value.trim();
  if (!question) { $("question").focus(); return; }
  if (cloudRun) cloudRun.abort();
  const ctl = new AbortController();
  cloudRun = ctl;
  $("answers").classList.add("compare");
  $("cloud-panel").hidden = false;
  const out = $("full-cloud");
  out.textContent = "";
  out.classList.add("live");
  $("cloud-summary").hidden = true;
  $("cloud-status").textContent = "waiting for the first token…";
  const t0 = performance.now();
  const now = () => (performance.now() - t0) / 1000;
  let first = null;
  const body = { model: "pice", messages: [{ role: "user", content: question }], stream: true,
                 pice: { mode: "cloud" } };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: ctl.signal });
    if (!resp.ok) throw new Error(await errorText(resp) + authHint(resp.status));
    let report = null;
    let finish = null;
    for await (const ev of readSSE(resp, ctl.signal)) {
      if (ev.data === "[DONE]") break;
      let chunk;
      try { chunk = JSON.parse(ev.data); } catch (_) { continue; }
      if (chunk.error) throw new Error(chunk.error.message || ev.data);
      const choice = chunk.choices && chunk.choices[0];
      const text = choice && choice.delta && choice.delta.content;
      if (text) {
        if (first === null) { first = now(); $("cloud-status").textContent = "streaming…"; }
        out.append(text);
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (chunk.pice) report = chunk.pice;
    }
    const t = now();
    $("cloud-status").textContent = finish ? `finished: ${finish}` : "finished";
    const tm = (report && report.timings) || {};
    const tk = (report && report.tokens) || {};
    showSummary("cloud-summary", [
      first !== null && ["first token", secs(first)],
      tm.total !== undefined && ["server total", secs(tm.total)],
      ["in browser", secs(t)],
      ["tokens cloud", String(tk.cloud ?? "–")],
    ]);
  } catch (err) {
    if (ctl.signal.aborted) return;
    $("cloud-status").textContent = "failed";
    out.append(`\n[${String(err.message || err)}]`);
  } finally {
    out.classList.remove("live");
    if (cloudRun === ctl) cloudRun = null;
  }
}

// ---- server state: readiness, adapters, edges ---------------------------------------------

let adaptersLoaded = false;

async function pollReady() {
  const pill = $("server-status");
  let delay = 2000;
  try {
    const r = await fetch("/ready", { cache: "no-store" });
    const body = await r.json().catch(() => ({}));
    const state = r.ok ? "ready" : (body.status || "loading");
    pill.dataset.state = state;
    pill.textContent = state === "ready" ? "server ready"
      : state === "failed" ? "models failed to load" : "models loading…";
    pill.title = body.error || "";
    if (state === "ready") {
      delay = 10000;
      if (!adaptersLoaded) loadAdapters();
    }
  } catch (_) {
    pill.dataset.state = "down";
    pill.textContent = "server unreachable";
  }
  setTimeout(pollReady, delay);
}

async function loadAdapters() {
  try {
    const r = await fetch("/v1/adapters", { headers: headers(false), cache: "no-store" });
    if (!r.ok) {
      if (r.status === 401) $("key-note").textContent = "key needed";
      return;
    }
    const body = await r.json();
    const sel = $("adapter");
    for (const opt of [...sel.options]) if (opt.dataset.listed) opt.remove();
    for (const a of body.data || []) {
      const label = a.error ? `${a.id} (unusable)` : a.id;
      const opt = el("option", { value: a.id, "data-listed": "1", title: a.description || "" }, label);
      if (a.error) opt.disabled = true;
      sel.append(opt);
    }
    adaptersLoaded = true;
  } catch (_) { /* the next readiness poll retries */ }
}

function edgeItem(e) {
  const health = e.draining ? "draining" : e.suspect ? "suspect" : e.healthy ? "healthy" : "down";
  const load = e.slots ? Math.min(100, (100 * e.inflight) / e.slots) : 0;
  return el("li", { class: "edge-item", "data-health": health, "data-edge": e.edge_id },
    el("div", { class: "row" },
      el("span", { class: "light" }),
      el("span", { class: "id" }, e.edge_id),
      el("span", { class: `tag ${e.kind === "remote" ? "cloud" : ""}` }, e.kind),
      el("span", { class: "state muted" }, health)),
    el("div", { class: "models" },
      ...e.models.map((m) => el("span", { class: "chip", title: m }, shortName(m))),
      ...e.adapters.slice(0, 4).map((a) => el("span", { class: "chip adapter" }, a)),
      e.adapters.length > 4 ? el("span", { class: "chip" }, `+${e.adapters.length - 4} adapters`) : null),
    el("div", { class: "load" },
      el("span", {}, `${e.inflight}/${e.slots} busy`),
      el("span", { class: "meter" }, el("i", { style: `width:${load}%` }))),
    el("div", { class: "stats" },
      `${e.tokens_per_s > 0 ? e.tokens_per_s.toFixed(1) : "–"} tok/s · rtt ${(e.rtt_s * 1000).toFixed(0)} ms · fail ${(100 * e.failure_rate).toFixed(0)}%`
      + (e.deadlines_missed ? ` · ${e.deadlines_missed} late` : "")));
}

async function pollEdges() {
  const list = $("edges");
  const note = $("edges-note");
  try {
    if (document.visibilityState !== "hidden") {
      const r = await fetch("/v1/edges", { headers: headers(false), cache: "no-store" });
      if (r.ok) {
        const body = await r.json();
        list.replaceChildren(...body.data.map(edgeItem));
        if (!body.data.length) list.append(el("li", { class: "muted small" }, "no edges"));
        const healthy = body.data.filter((e) => e.healthy).length;
        note.textContent = `${healthy}/${body.data.length} healthy`
          + (body.remote_enabled ? " · remote on" : "");
      } else {
        note.textContent = r.status === 401 ? "key needed" : r.status === 503 ? "loading…" : `HTTP ${r.status}`;
      }
    }
  } catch (_) {
    note.textContent = "unreachable";
  }
  setTimeout(pollEdges, 2000);
}

// ---- wiring -------------------------------------------------------------------------------

function init() {
  const keyInput = $("api-key");
  keyInput.value = localStorage.getItem(KEY_STORE) || "";
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const v = keyInput.value.trim();
    if (v) localStorage.setItem(KEY_STORE, v); else localStorage.removeItem(KEY_STORE);
    $("key-note").textContent = v ? "saved in this browser" : "cleared";
    adaptersLoaded = false;
    loadAdapters();
  });
  $("ask-form").addEventListener("submit", (e) => { e.preventDefault(); ask(); });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); ask(); }
  });
  $("question").addEventListener("input", () => {
    $("compare").disabled = !$("question").value.trim();
  });
  $("compare").addEventListener("click", compare);
  pollReady();
  pollEdges();
}

document.addEventListener("DOMContentLoaded", init);
