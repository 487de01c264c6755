// longroll dashboard: polls the JSON API once a second; every value reaches the page as text (no HTML
// from data). The token comes from the URL fragment (#token=..., never sent to the server) or the
// token field, is kept in sessionStorage, and is sent as a bearer token on pause/resume/stop.
"use strict";

const POLL_MS = 1000;
const TOKEN_KEY = "longroll-dashboard-token";

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function takeTokenFromFragment() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function showTokenState() {
  document.getElementById("token-state").textContent = token() ? "set" : "not set: read only";
}

function setupTokenForm() {
  const input = document.getElementById("token");
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    showTokenState();
  });
  input.addEventListener("change", () => {
    if (input.value.trim()) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    showTokenState();
  });
  showTokenState();
}

function message(text) {
  const m = document.getElementById("message");
  m.textContent = text || "";
  m.hidden = !text;
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

async function act(id, action) {
  const r = await fetch(`/api/streams/${encodeURIComponent(id)}/${action}`, {
    method: "POST",
    headers: { "Authorization": `Bearer ${token()}`, "Content-Type": "application/json" },
    body: JSON.stringify({ reason: "dashboard" }),
  });
  const body = await r.json().catch(() => ({}));
  if (r.status === 401) message("The token is missing or wrong: paste the one printed at start (DIR/dashboard.token).");
  else if (!r.ok) message(`${action} ${id}: ${body.detail || "HTTP " + r.status}`);
  else message("");
  return r.ok;
}

const ACTIONS = { pause: ["pending", "running"], resume: ["paused", "stopped", "failed"], stop: ["pending", "running", "paused"] };

function actionButtons(s) {
  return Object.keys(ACTIONS).map((a) => {
    const b = el("button", { type: "button", "data-action": a, "data-stream": s.id }, a[0].toUpperCase() + a.slice(1));
    b.disabled = !ACTIONS[a].includes(s.state);
    b.addEventListener("click", async () => {
      b.disabled = true;
      await act(s.id, a);
      await refresh();
    });
    return b;
  });
}

function bytes(n) {
  if (n == null) return "-";
  const u = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
const num = (v, d = 1) => (v == null ? "-" : Number(v).toFixed(d));
const age = (s) => (s == null ? "" : s < 90 ? `${Math.round(s)} s ago` : `${Math.round(s / 60)} min ago`);

function setBadge(node, state) {
  node.textContent = state;
  node.className = `badge state state-${state}`;
}

function setPreview(img, s) {
  if (s.preview_chunk == null || img.dataset.chunk === String(s.preview_chunk)) return;
  img.dataset.chunk = String(s.preview_chunk);
  img.src = `/api/streams/${encodeURIComponent(s.id)}/preview/${s.preview_chunk}`;
}

// ---- the streams table ------------------------------------------------------------------------
const rows = new Map();

function row(s) {
  let r = rows.get(s.id);
  if (!r) {
    const cells = {};
    const cell = (name, cls = "") => (cells[name] = el("td", { class: cls }));
    r = el("tr", { id: `row-${s.id}`, "data-stream": s.id });
    const img = el("img", { class: "preview", alt: `newest frame of ${s.id}` });
    r.append(el("td", {}, img), el("td", {}, el("a", { href: `/streams/${encodeURIComponent(s.id)}` }, s.id)));
    const badge = el("span", { class: "badge state" });
    r.append(el("td", {}, badge));
    for (const [n, c] of [["progress", ""], ["fps", "num"], ["step", "num"], ["retrieval", "num"], ["cache", "num"],
                          ["memory", "num"], ["checkpoint", ""], ["worker", "muted"], ["actions", ""]]) r.append(cell(n, c));
    r.refs = { img, badge, cells, lastState: null };
    rows.set(s.id, r);
    document.querySelector("#streams tbody").append(r);
  }
  const { img, badge, cells } = r.refs;
  setBadge(badge, s.state);
  setPreview(img, s);
  const target = s.target_chunks == null ? "\u221e" : s.target_chunks;
  const frac = s.target_chunks ? Math.min(1, s.next_chunk / s.target_chunks) : 0;
  cells.progress.replaceChildren(`${s.next_chunk} / ${target}`, el("div", { class: "bar" }, el("i", { style: "" })));
  cells.progress.querySelector("i").style.width = `${(frac * 100).toFixed(1)}%`;
  cells.fps.textContent = num(s.fps);
  cells.step.textContent = num(s.step_ms);
  cells.retrieval.textContent = num(s.retrieval_ms, 2);
  cells.cache.textContent = bytes(s.cache_bytes);
  cells.memory.textContent = s.memory_rows == null ? "-" : s.memory_rows;
  cells.checkpoint.textContent = s.last_checkpoint == null ? "-" : `${s.last_checkpoint} (${age(s.checkpoint_age_s)})`;
  cells.worker.textContent = s.worker_id || "-";
  if (r.refs.lastState !== s.state) {
    cells.actions.replaceChildren(...actionButtons(s));
    r.refs.lastState = s.state;
  }
}

async function refreshIndex() {
  const [run, streams] = await Promise.all([getJSON("/api/run"), getJSON("/api/streams")]);
  document.getElementById("run-dir").textContent = run.out_dir;
  setBadge(document.getElementById("run-state"), run.state);
  for (const [id, v] of [["t-streams", run.streams], ["t-running", run.running], ["t-paused", run.paused],
                         ["t-fps", num(run.fps)], ["t-chunks", run.chunks], ["t-workers", run.workers.length],
                         ["t-recoveries", run.recoveries]]) document.getElementById(id).textContent = v;
  if (run.error) message(`orchestrator: ${run.error}`);
  for (const s of streams) row(s);
}

// ---- one stream's page ------------------------------------------------------------------------
function plot(canvas, series, colors) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 26;
  ctx.clearRect(0, 0, w, h);
  const all = series.flat().filter((p) => p[1] != null);
  if (all.length < 2) return;
  const x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  const y1 = Math.max(1e-9, ...all.map((p) => p[1])) * 1.1;
  ctx.strokeStyle = "#2a3039"; ctx.fillStyle = "#8a93a0"; ctx.font = "11px sans-serif";
  for (const f of [0, 0.5, 1]) {
    const y = h - pad / 2 - f * (h - pad);
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w, y); ctx.stroke();
    ctx.fillText((y1 * f).toFixed(y1 < 10 ? 1 : 0), 0, y + 4);
  }
  series.forEach((pts, i) => {
    ctx.strokeStyle = colors[i]; ctx.lineWidth = 1.5; ctx.beginPath();
    let started = false;
    for (const [x, y] of pts) {
      if (y == null) continue;
      const px = pad + ((x - x0) / Math.max(1e-9, x1 - x0)) * (w - pad), py = h - pad / 2 - (y / y1) * (h - pad);
      if (started) ctx.lineTo(px, py); else { ctx.moveTo(px, py); started = true; }
    }
    ctx.stroke();
  });
}

let lastStreamState = null;

async function refreshStream() {
  const id = decodeURIComponent(location.pathname.split("/").pop());
  const s = await getJSON(`/api/streams/${encodeURIComponent(id)}`);
  document.title = `longroll ${s.id}`;
  document.getElementById("stream-id").textContent = s.id;
  setBadge(document.getElementById("stream-state"), s.state);
  const img = document.getElementById("preview");
  setPreview(img, s);
  if (s.preview_chunk != null) document.getElementById("preview-caption").textContent = `chunk ${s.preview_chunk}`;
  if (lastStreamState !== s.state) {
    document.getElementById("actions").replaceChildren(...actionButtons(s));
    lastStreamState = s.state;
  }
  const target = s.target_chunks == null ? "\u221e" : s.target_chunks;
  const facts = [["state", s.state], ["chunks", `${s.next_chunk} / ${target}`], ["frames", s.frames ?? "-"],
                 ["frames/s", num(s.fps)], ["step", `${num(s.step_ms)} ms`], ["retrieval", `${num(s.retrieval_ms, 2)} ms`],
                 ["cache", bytes(s.cache_bytes)], ["memory rows", s.memory_rows ?? "-"], ["worker", s.worker_id || "-"],
                 ["seed", s.seed], ["prompt", s.prompt || "-"],
                 ["checkpoint", s.last_checkpoint == null ? "-" : `${s.last_checkpoint} (${age(s.checkpoint_age_s)})`]];
  document.getElementById("facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const t0 = s.history.length ? s.history[0].time : 0;
  plot(document.getElementById("plot-fps"), [s.history.map((p) => [p.time - t0, p.fps])], ["#2fbf71"]);
  plot(document.getElementById("plot-latency"),
       [s.history.map((p) => [p.time - t0, p.step_ms]), s.history.map((p) => [p.time - t0, p.retrieval_ms])],
       ["#4aa3ff", "#e0a526"]);
  document.getElementById("checkpoints").replaceChildren(
    ...(s.checkpoints.length ? s.checkpoints.slice().reverse().map((c) => el("li", {}, `chunk ${c}`)) : [el("li", {}, "none yet")]));
  const log = document.getElementById("log");
  log.textContent = s.log.map((l) => {
    const { time, event, ...rest } = l;
    const extra = Object.entries(rest).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
    return `${new Date(time * 1000).toLocaleTimeString()} ${event} ${extra}`;
  }).join("\n");
}

// ---- main -------------------------------------------------------------------------------------
const PAGE = document.body.dataset.page;

async function refresh() {
  try {
    await (PAGE === "stream" ? refreshStream() : refreshIndex());
    if (document.getElementById("message").textContent.startsWith("cannot reach")) message("");
  } catch (e) {
    message(`cannot reach the run: ${e.message}`);
  }
}

takeTokenFromFragment();
setupTokenForm();
refresh();
setInterval(refresh, POLL_MS);
