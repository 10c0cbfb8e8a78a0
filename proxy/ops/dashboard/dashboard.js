// Signalbox wall screen. Reads GET /admin/live (Server-Sent Events) with fetch() and a streaming body reader,
// because EventSource cannot send the Authorization header and the token must never go into a URL. Renders
// each `snapshot` event; pause, resume and clear call the admin API with the same token. Plain JS, no
// library: the page is small and must load with nothing from outside (see proxy/ops/wall.py).
"use strict";

const LIVE = "/admin/live";
const TOKEN_KEY = "signalbox.adminToken";
const STALE_AFTER_S = 12; // the server sends a heartbeat at least every 5 s
const BACKOFF_S = [1, 2, 4, 8, 10];

const ARM_S = 4; // a clear needs a second click within this many seconds
const state = {
  token: sessionStorage.getItem(TOKEN_KEY), controller: null, lastAt: 0, tries: 0, snapshot: null, armed: new Map(),
};

// --- small DOM helpers -------------------------------------------------------------------------------------

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("data-")) node.dataset[camel(name.slice(5))] = String(value);
    else node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function camel(name) { return name.replace(/-([a-z])/g, (_, c) => c.toUpperCase()); }

// Tables are patched, not rebuilt: a cell whose markup did not change stays the same node, so a button is not
// replaced under the pointer between press and release by the next snapshot.
function fill(tbody, rows, empty, columns) {
  if (!rows.length) rows = [el("tr", { class: "empty", "data-key": "empty" }, el("td", { colspan: columns }, empty))];
  const old = Array.from(tbody.rows);
  rows.forEach((row, i) => {
    const have = old[i];
    if (!have) return tbody.append(row);
    if (have.outerHTML === row.outerHTML) return;
    if (have.dataset.key !== row.dataset.key || have.cells.length !== row.cells.length) return have.replaceWith(row);
    for (const name of have.getAttributeNames()) if (!row.hasAttribute(name)) have.removeAttribute(name);
    for (const name of row.getAttributeNames()) have.setAttribute(name, row.getAttribute(name));
    const cells = Array.from(row.cells);
    Array.from(have.cells).forEach((cell, j) => { if (cell.outerHTML !== cells[j].outerHTML) cell.replaceWith(cells[j]); });
  });
  old.slice(rows.length).forEach((row) => row.remove());
}

function ms(value) {
  if (value === null || value === undefined) return "–";
  if (value >= 10000) return (value / 1000).toFixed(0) + " s";
  if (value >= 1000) return (value / 1000).toFixed(1) + " s";
  return Math.round(value) + " ms";
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 10 ? value.toFixed(1) + " s" : Math.round(value) + " s";
}

function pct(ratio) { return ratio === null || ratio === undefined ? "–" : (ratio * 100).toFixed(ratio < 0.1 ? 1 : 0) + "%"; }

function count(value) {
  if (value >= 1e6) return (value / 1e6).toFixed(1) + "M";
  if (value >= 1e4) return (value / 1e3).toFixed(0) + "k";
  return String(Math.round(value));
}

function level(ratio) { return ratio === null || ratio === undefined ? "none" : ratio >= 0.9 ? "high" : ratio >= 0.6 ? "mid" : "low"; }

function bar(ratio, label) {
  const fillNode = el("span", { class: "fill", "data-level": level(ratio) });
  fillNode.style.width = Math.min(100, Math.max(0, (ratio || 0) * 100)).toFixed(1) + "%";
  return el("span", { class: "bar" }, el("span", { class: "track" }, fillNode), el("span", { class: "label" }, label));
}

function toast(text, bad) {
  const node = $("toast");
  node.textContent = text;
  node.dataset.bad = bad ? "1" : "0";
  node.dataset.shown = "1";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { node.dataset.shown = "0"; }, 4000);
}

// --- the token ---------------------------------------------------------------------------------------------

function headers() { return state.token ? { Authorization: "Bearer " + state.token } : {}; }

function refused() {
  const had = Boolean(state.token);
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  askToken(had ? "That token was refused." : "");
}

function askToken(why) {
  stop();
  $("board").hidden = true;
  $("login").hidden = false;
  $("login-why").textContent = why || "";
  setConn("login", "token needed");
  $("token").focus();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("token").value.trim();
  if (!value) return;
  state.token = value;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  connect();
});

$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  askToken("Token forgotten.");
});

// --- the live stream ---------------------------------------------------------------------------------------

function setConn(kind, text) {
  const node = $("conn");
  node.dataset.state = kind;
  node.textContent = text;
}

function stop() {
  if (state.controller) state.controller.abort();
  state.controller = null;
}

async function connect() {
  stop();
  const controller = new AbortController();
  state.controller = controller;
  $("login").hidden = true;
  setConn("connecting", "connecting…");
  let response;
  try {
    response = await fetch(LIVE, { headers: headers(), cache: "no-store", signal: controller.signal });
  } catch (error) {
    if (!controller.signal.aborted) retry("cannot reach the admin API");
    return;
  }
  if (response.status === 401) return refused();
  if (response.status === 403) return askToken("The admin API is locked: set SIGNALBOX_ADMIN_TOKEN on the proxy.");
  if (!response.ok || !response.body) return retry("the admin API answered " + response.status);
  $("forget").hidden = !state.token;
  state.tries = 0;
  try {
    await read(response.body, controller);
  } catch (error) {
    if (controller.signal.aborted) return;
  }
  if (!controller.signal.aborted) retry("the live stream ended");
}

function retry(why) {
  const wait = BACKOFF_S[Math.min(state.tries, BACKOFF_S.length - 1)];
  state.tries += 1;
  setConn("down", why + "; retrying in " + wait + " s");
  setTimeout(() => { if (!$("login").hidden) return; connect(); }, wait * 1000);
}

// Server-Sent Events framing: events end with a blank line; `event:` names it, `data:` lines carry it.
async function read(body, controller) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  while (!controller.signal.aborted) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      dispatch(block);
    }
  }
}

function dispatch(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  const payload = data.length ? JSON.parse(data.join("\n")) : {};
  if (event === "snapshot") {
    state.lastAt = payload.at;
    state.snapshot = payload;
    render(payload);
  } else if (event === "heartbeat") {
    state.lastAt = payload.at;
  }
  setConn("live", "live");
}

setInterval(() => {
  if (!state.lastAt || $("conn").dataset.state === "down") return;
  const age = Date.now() / 1000 - state.lastAt;
  if (age > STALE_AFTER_S) setConn("stale", "no update for " + Math.round(age) + " s");
}, 1000);

// --- actions -----------------------------------------------------------------------------------------------

async function act(queue, action) {
  const path = "/admin/queues/" + encodeURIComponent(queue) + (action === "clear" ? "" : "/" + action);
  let response;
  try {
    response = await fetch(path, { method: action === "clear" ? "DELETE" : "POST", headers: headers() });
  } catch (error) {
    return toast("cannot reach the admin API", true);
  }
  if (response.status === 401) return refused();
  const body = await response.json().catch(() => ({}));
  if (!response.ok) return toast((body.error && body.error.message) || action + " failed: " + response.status, true);
  if (action === "clear") toast("cleared " + body.cleared + " from " + queue);
  else toast(queue + (body.paused ? " paused" : " resumed"));
}

// One listener for every queue button (the rows are patched under it).
$("queues").addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const queue = button.closest("tr").dataset.queue;
  const action = button.dataset.action;
  if (action !== "clear") return act(queue, action);
  if (state.armed.get(queue) > Date.now()) {
    state.armed.delete(queue);
    act(queue, "clear");
  } else {
    state.armed.set(queue, Date.now() + ARM_S * 1000);
    setTimeout(() => { state.armed.delete(queue); if (state.snapshot) renderQueues(state.snapshot.queues); }, ARM_S * 1000);
  }
  if (state.snapshot) renderQueues(state.snapshot.queues);
});

// --- rendering ---------------------------------------------------------------------------------------------

function render(s) {
  $("board").hidden = false;
  const health = $("health");
  health.dataset.state = s.status;
  health.textContent = s.status;
  const policy = s.policy || {};
  $("policy").textContent = "policy " + (policy.version !== undefined ? "v" + policy.version + " " : "") + (policy.digest || "");
  $("inflight").textContent = s.in_flight + " in flight";
  $("problems").replaceChildren(...s.checks.map((c) => el("span", { class: "chip", "data-state": c.state, title: c.why || "" }, c.name)));
  renderQueues(s.queues);
  renderLimits(s.limits);
  renderUpstreams(s.upstreams);
  renderTraffic(s.traffic);
  renderRefusals(s.refusals);
}

function renderQueues(queues) {
  const rows = [];
  for (const q of queues) {
    const slots = q.slots === null ? "∞" : q.slots;
    const armed = state.armed.get(q.name) > Date.now();
    const buttons = q.slots === null ? [] : [
      el("button", { type: "button", "data-action": q.paused ? "resume" : "pause" }, q.paused ? "Resume" : "Pause"),
    ];
    buttons.push(el("button", { type: "button", class: "danger", "data-action": "clear", "data-armed": armed ? "1" : "0" },
      armed ? "Confirm clear" : "Clear"));
    rows.push(el("tr", { class: "queue", "data-key": "q:" + q.name, "data-queue": q.name, "data-paused": q.paused ? "1" : "0" },
      el("td", { "data-field": "name" }, el("strong", {}, q.name), " ",
        el("span", { class: "badge small", "data-state": q.paused ? "paused" : "running", "data-field": "state" }, q.paused ? "paused" : "running")),
      el("td", { "data-field": "active" }, bar(q.utilisation, q.active + " / " + slots)),
      el("td", { class: "num big", "data-field": "waiting" }, q.waiting),
      el("td", { class: "num", "data-field": "wait-p50" }, ms(q.wait_p50_ms)),
      el("td", { class: "num", "data-field": "wait-p95" }, ms(q.wait_p95_ms)),
      el("td", { class: "num", "data-field": "oldest" }, ms(q.oldest_wait_ms)),
      el("td", { class: "num" }, ""),
      el("td", { class: "muted" }, q.finished + " done · " + q.rejected + " refused"),
      el("td", { class: "actions" }, ...buttons),
    ));
    for (const c of q.classes) {
      const tenants = c.tenants.map((t) => t.tenant + " " + t.waiting).join(" · ");
      rows.push(el("tr", { class: "class", "data-key": "c:" + q.name + "/" + c.class, "data-queue": q.name, "data-class": c.class },
        el("td", { class: "indent" }, "↳ " + c.class),
        el("td", {}, ""),
        el("td", { class: "num", "data-field": "waiting" }, c.waiting),
        el("td", {}, ""), el("td", {}, ""), el("td", {}, ""),
        el("td", { class: "num", "data-field": "eta" }, c.waiting ? seconds(c.eta_s) : "–"),
        el("td", { "data-field": "tenants" }, tenants || "–"),
        el("td", {}, ""),
      ));
    }
  }
  fill($("queues").tBodies[0], rows, "no queues in this policy", 9);
}

const WINDOW_NAMES = { second: "/s", minute: "/min", hour: "/h", day: "/day" };

function meterCell(meters) {
  if (!meters.length) return el("td", { class: "muted" }, "–");
  return el("td", {}, ...meters.map((m) => {
    const unit = m.name === "concurrent" ? "" : " " + (WINDOW_NAMES[m.name.split("_per_")[1]] || m.name);
    return bar(m.ratio, count(m.used) + " / " + count(m.limit) + unit);
  }));
}

function renderLimits(limits) {
  const rows = limits.map((l) => {
    const requests = l.meters.filter((m) => m.name.startsWith("requests_"));
    const tokens = l.meters.filter((m) => m.name.startsWith("tokens_"));
    const concurrent = l.meters.filter((m) => m.name === "concurrent");
    return el("tr", { "data-key": l.key, "data-level": level(l.peak) },
      el("td", { title: l.key }, el("span", { class: "kind" }, l.kind.replace("_", " ")), " ",
        l.key.replace(/(^|\/)(tenant|route|upstream):/g, "$1")),
      meterCell(requests), meterCell(tokens), meterCell(concurrent));
  });
  fill($("limits").tBodies[0], rows, "no limit has counted a request yet", 4);
}

function renderUpstreams(deployments) {
  const rows = deployments.map((d) => el("tr", { "data-key": d.deployment },
    el("td", {}, d.deployment),
    el("td", {}, el("span", { class: "badge small", "data-state": d.circuit.split(" ")[0] }, d.circuit),
      d.reopens_in_s !== null ? " " + seconds(d.reopens_in_s) : ""),
    el("td", { class: "num" }, d.consecutive_failures),
    el("td", { class: "num" }, d.outstanding),
    el("td", { class: "num" }, d.pacing_hold_s === null ? "–" : seconds(d.pacing_hold_s)),
  ));
  fill($("upstreams").tBodies[0], rows, "no deployment yet", 5);
}

function renderTraffic(traffic) {
  $("window").textContent = traffic.since_start ? "since start" : "last " + Math.round(traffic.window_s) + " s";
  const rows = traffic.routes.map((r) => {
    const o = r.outcomes;
    return el("tr", { "data-key": "r:" + (r.route || "") },
      el("td", {}, r.route || "(no route)"),
      el("td", { class: "num" }, r.per_s.toFixed(r.per_s < 10 ? 2 : 0)),
      el("td", { class: "num" }, r.requests),
      el("td", { class: "num", "data-level": level(r.error_rate * 5) }, pct(r.error_rate)),
      el("td", { class: "num" }, pct(r.rejection_rate)),
      el("td", { class: "num" }, o.cancelled || 0),
      el("td", { class: "num" }, ms(r.ttft_ms.p50)),
      el("td", { class: "num" }, ms(r.ttft_ms.p95)),
    );
  });
  fill($("traffic").tBodies[0], rows, "no requests yet", 8);
}

function renderRefusals(refusals) {
  $("refused-total").textContent = refusals.total + " since start";
  const rows = refusals.recent.slice(0, 12).map((r) => el("tr", { "data-key": r.at + r.request_id },
    el("td", {}, new Date(r.at * 1000).toLocaleTimeString([], { hour12: false })),
    el("td", {}, r.tenant || "–"),
    el("td", {}, r.route || "–"),
    el("td", {}, el("span", { class: "reason" }, r.reason)),
    el("td", { class: "num" }, r.status),
    el("td", { class: "mono" }, r.request_id),
  ));
  fill($("refusals").tBodies[0], rows, "none", 6);
}

connect();
