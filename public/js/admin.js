// Admin dashboard: polls GET /api/admin/status. The admin token (auth.admin_token) lives in sessionStorage.
import { api, banner, formatDuration, formatNumber, h, mountHeader } from "./common.js";
import { onLangChange, t } from "./i18n.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "minicpmo.adminToken";
const REFRESH_MS = 3000;

let status = null;
let paused = false;
let timer = null;

function headers() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { "X-Admin-Token": token } : {};
}

function table(el, columns, rows, emptyKey) {
  el.innerHTML = "";
  if (!rows.length) {
    // No column headers for an empty table: on a narrow screen they would push the note out of view.
    el.append(h("tbody", {}, h("tr", {}, h("td", { class: "empty" }, t(emptyKey)))));
    return;
  }
  const head = h("tr", {}, columns.map(([key]) => h("th", { scope: "col" }, t(key))));
  const body = h("tbody");
  for (const row of rows) {
    body.append(h("tr", {}, columns.map(([, cell, cls]) => h("td", { class: cls || null }, cell(row)))));
  }
  el.append(h("thead", {}, head), body);
}

const badge = (kind, text) => h("span", { class: `badge ${kind}` }, h("span", { class: "dot" }), text);
const ms = (v) => (v === null || v === undefined ? "–" : `${formatNumber(v, 0)} ms`);
const shortId = (id) => h("code", { title: id }, id.slice(0, 8));

/** A button that ends a call (or drops a queued caller): DELETE on the call's URL with the admin token. */
function endButton(id, key) {
  const button = h("button", { type: "button", class: "danger-text end", "data-session": id }, t(key));
  button.onclick = async () => {
    button.disabled = true;
    try {
      await api(`/api/sessions/${encodeURIComponent(id)}`, { method: "DELETE", headers: headers() });
    } catch (err) {
      $("messages").replaceChildren(banner("error", t("admin.endFailed"), `${err.message} (${err.code})`));
    }
    refresh();
  };
  return button;
}

function render() {
  if (!status) return;
  const s = status;
  const active = s.sessions.filter((x) => x.phase === "active").length;
  const cards = [
    ["admin.uptime", formatDuration(s.uptime_s)],
    ["admin.capacity", `${active} / ${s.capacity}`],
    ["admin.queued", String(s.queue.length)],
    ["admin.units", formatNumber(s.units_done)],
    ["admin.model", t(s.embedded_model ? "admin.modelEmbedded" : "admin.modelReal")],
    ["admin.version", s.version],
  ];
  $("summary").innerHTML = "";
  for (const [key, value] of cards) {
    const cls = key === "admin.model" ? "value text" : "value";
    $("summary").append(h("div", { class: "stat" }, h("div", { class: "label" }, t(key)), h("div", { class: cls }, value)));
  }
  table(
    $("workers"),
    [
      ["admin.col.worker", (w) => String(w.worker_id)],
      ["admin.col.device", (w) => h("code", {}, w.device)],
      [
        "admin.col.state",
        (w) =>
          !w.up ? badge("bad", t("admin.down")) : w.warming_up ? badge("warn", t("admin.warming")) : badge("ok", t("admin.up")),
      ],
      ["admin.col.sessions", (w) => `${w.sessions} / ${w.capacity}`, "num"],
      ["admin.col.capacityFrom", (w) => w.capacity_source],
      ["admin.col.memory", (w) => (w.rss_mb === null ? "–" : `${formatNumber(w.rss_mb, 0)} MB`), "num"],
      ["admin.col.pid", (w) => (w.pid === null ? "–" : String(w.pid)), "num"],
      ["admin.col.restarts", (w) => String(w.restarts), "num"],
      ["admin.col.dropped", (w) => String(w.dropped_units), "num"],
      ["admin.col.modes", (w) => w.modes.join(", ")],
    ],
    s.workers,
    "admin.noWorkers",
  );
  table(
    $("sessions"),
    [
      ["admin.col.session", (x) => shortId(x.session_id)],
      ["admin.col.mode", (x) => x.mode],
      ["admin.col.phase", (x) => badge(x.phase === "active" ? "ok" : "warn", t(`admin.phase.${x.phase}`))],
      ["admin.col.talk", (x) => (x.phase === "active" ? t(`state.${x.state}`) : t(`admin.phase.${x.phase}`))],
      ["admin.col.worker", (x) => (x.worker_id === null ? "–" : String(x.worker_id)), "num"],
      ["admin.col.duration", (x) => formatDuration(x.age_s), "num"],
      ["admin.col.p50", (x) => ms(x.unit_latency_p50_ms), "num"],
      ["admin.col.p95", (x) => ms(x.unit_latency_p95_ms), "num"],
      ["admin.col.lag", (x) => `${ms(x.send_lateness_p95_ms)} · ${formatNumber(x.speech_buffered_s, 2)} s`, "num"],
      ["admin.col.actions", (x) => endButton(x.session_id, x.phase === "queued" ? "admin.drop" : "admin.end")],
    ],
    s.sessions,
    "admin.noSessions",
  );
  table(
    $("queue"),
    [
      ["admin.col.position", (q) => `#${q.position}`, "num"],
      ["admin.col.session", (q) => shortId(q.session_id)],
      ["admin.col.mode", (q) => q.mode],
      ["admin.col.waited", (q) => formatDuration(q.waited_s), "num"],
      ["admin.col.eta", (q) => formatDuration(q.eta_s), "num"],
      ["admin.col.actions", (q) => endButton(q.session_id, "admin.drop")],
    ],
    s.queue,
    "admin.noQueue",
  );
  table(
    $("errors"),
    [
      ["admin.col.time", (e) => new Date(e.time * 1000).toLocaleTimeString()],
      ["admin.col.level", (e) => badge(e.level === "WARNING" ? "warn" : "bad", e.level)],
      ["admin.col.source", (e) => h("code", {}, e.logger)],
      ["admin.col.message", (e) => e.message, "wrap"],
    ],
    s.errors,
    "admin.noErrors",
  );
}

async function refresh() {
  clearTimeout(timer);
  try {
    status = await api("/api/admin/status", { headers: headers() });
    $("messages").innerHTML = "";
    $("token-form").hidden = true;
    $("dashboard").hidden = false;
    $("refresh-controls").hidden = false;
    $("updated").textContent = t("admin.updated", { time: new Date().toLocaleTimeString() });
    render();
  } catch (err) {
    if (err.status === 401 && err.code === "admin_unauthorized") {
      const hadToken = Boolean(sessionStorage.getItem(TOKEN_KEY));
      sessionStorage.removeItem(TOKEN_KEY);
      $("dashboard").hidden = true;
      $("refresh-controls").hidden = true;
      $("token-form").hidden = false;
      $("messages").innerHTML = "";
      if (hadToken) $("messages").append(banner("error", t("admin.tokenWrong"), err.message));
      $("admin-token").focus();
      return; // no polling until a token is entered
    }
    $("messages").innerHTML = "";
    $("messages").append(banner("error", t("admin.loadFailed"), `${err.message} (${err.code})`));
  }
  if (!paused) timer = setTimeout(refresh, REFRESH_MS);
}

mountHeader("/admin");
onLangChange(() => {
  render();
  $("pause").textContent = t(paused ? "admin.resume" : "admin.pause");
});
$("token-form").onsubmit = (e) => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("admin-token").value);
  $("admin-token").value = "";
  refresh();
};
$("pause").onclick = () => {
  paused = !paused;
  $("pause").setAttribute("aria-pressed", String(paused));
  $("pause").textContent = t(paused ? "admin.resume" : "admin.pause");
  if (paused) clearTimeout(timer);
  else refresh();
};
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && !paused) refresh();
});
// Without a stored token, ask for one first if the server needs it (instead of provoking a 401).
if (!sessionStorage.getItem(TOKEN_KEY)) {
  const info = await api("/api/info").catch(() => null);
  if (info && info.admin_token_required) {
    $("token-form").hidden = false;
    $("admin-token").focus();
  } else {
    refresh();
  }
} else {
  refresh();
}
