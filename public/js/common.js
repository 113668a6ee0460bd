// Shared by every page: the top bar, API calls with the configured token, a tiny element builder, icons.
import { applyI18n, getLang, LANGS, setLang, t } from "./i18n.js";
import { loadSettings } from "./settings-store.js";

const svg = (body, extra = "") =>
  `<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" stroke-linejoin="round" aria-hidden="true"${extra}>${body}</svg>`;

export const ICONS = {
  logo: `<svg viewBox="0 0 32 32" aria-hidden="true"><rect width="32" height="32" rx="8" fill="#2458d3"/><path d="M9 13v6M13 10v12M17 12v8M21 9v14M25 14v4" stroke="#fff" stroke-width="2.4" stroke-linecap="round"/></svg>`,
  chat: svg('<path d="M21 15a2 2 0 0 1-2 2H8l-4 4V5a2 2 0 0 1 2-2h13a2 2 0 0 1 2 2z"/>'),
  phone: svg('<path d="M22 16.9v3a2 2 0 0 1-2.2 2 19.8 19.8 0 0 1-8.6-3.1 19.5 19.5 0 0 1-6-6A19.8 19.8 0 0 1 2.1 4.2 2 2 0 0 1 4.1 2h3a2 2 0 0 1 2 1.7c.1.9.4 1.8.7 2.7a2 2 0 0 1-.5 2.1L8 9.8a16 16 0 0 0 6 6l1.3-1.3a2 2 0 0 1 2.1-.4c.9.3 1.8.6 2.7.7a2 2 0 0 1 1.7 2z"/>'),
  video: svg('<path d="m23 7-7 5 7 5V7z"/><rect x="1" y="5" width="15" height="14" rx="2"/>'),
  videoOff: svg('<path d="M16 16v1a2 2 0 0 1-2 2H3a2 2 0 0 1-2-2V7a2 2 0 0 1 2-2h2m5.7 0H14a2 2 0 0 1 2 2v3.3l1 1L23 7v10"/><path d="m1 1 22 22"/>'),
  mic: svg('<rect x="9" y="2" width="6" height="12" rx="3"/><path d="M19 10v1a7 7 0 0 1-14 0v-1M12 18v4M8 22h8"/>'),
  micOff: svg('<path d="m1 1 22 22M9 9v2a3 3 0 0 0 5.1 2.1M15 9.3V5a3 3 0 0 0-5.9-.6"/><path d="M17 16.9A7 7 0 0 1 5 11v-1m14 0v1a7 7 0 0 1-.1 1.2M12 18v4M8 22h8"/>'),
  hangup: svg('<path d="M10.7 13.3a16 16 0 0 0 3.4 2.6l1.3-1.3a2 2 0 0 1 2.1-.4c.9.3 1.8.6 2.7.7a2 2 0 0 1 1.7 2v3a2 2 0 0 1-2.2 2A19.8 19.8 0 0 1 2.1 4.2 2 2 0 0 1 4.1 2h3a2 2 0 0 1 2 1.7c.1.9.4 1.8.7 2.7a2 2 0 0 1-.5 2.1L8 9.8"/><path d="M23 1 1 23"/>'),
  gear: svg('<circle cx="12" cy="12" r="3"/><path d="M19.4 15a1.7 1.7 0 0 0 .3 1.8l.1.1a2 2 0 1 1-2.8 2.8l-.1-.1a1.7 1.7 0 0 0-1.8-.3 1.7 1.7 0 0 0-1 1.5V21a2 2 0 1 1-4 0v-.1a1.7 1.7 0 0 0-1.1-1.5 1.7 1.7 0 0 0-1.8.3l-.1.1a2 2 0 1 1-2.8-2.8l.1-.1a1.7 1.7 0 0 0 .3-1.8 1.7 1.7 0 0 0-1.5-1H3a2 2 0 1 1 0-4h.1a1.7 1.7 0 0 0 1.5-1.1 1.7 1.7 0 0 0-.3-1.8l-.1-.1a2 2 0 1 1 2.8-2.8l.1.1a1.7 1.7 0 0 0 1.8.3H9a1.7 1.7 0 0 0 1-1.5V3a2 2 0 1 1 4 0v.1a1.7 1.7 0 0 0 1 1.5 1.7 1.7 0 0 0 1.8-.3l.1-.1a2 2 0 1 1 2.8 2.8l-.1.1a1.7 1.7 0 0 0-.3 1.8V9a1.7 1.7 0 0 0 1.5 1H21a2 2 0 1 1 0 4h-.1a1.7 1.7 0 0 0-1.5 1z"/>'),
  chart: svg('<path d="M3 3v18h18"/><path d="m19 9-5 5-4-4-3 3"/>'),
  wave: svg('<path d="M2 12h2M6 8v8M10 5v14M14 8v8M18 10v4M22 12h-2"/>'),
  info: svg('<circle cx="12" cy="12" r="10"/><path d="M12 16v-4M12 8h.01"/>'),
  alert: svg('<path d="M10.3 3.9 1.8 18a2 2 0 0 0 1.7 3h17a2 2 0 0 0 1.7-3L13.7 3.9a2 2 0 0 0-3.4 0z"/><path d="M12 9v4M12 17h.01"/>'),
  bot: svg('<rect x="3" y="8" width="18" height="12" rx="3"/><path d="M12 8V4M8 14h.01M16 14h.01"/><circle cx="12" cy="3" r="1"/>'),
  user: svg('<path d="M20 21v-2a4 4 0 0 0-4-4H8a4 4 0 0 0-4 4v2"/><circle cx="12" cy="7" r="4"/>'),
  send: svg('<path d="m22 2-7 20-4-9-9-4 20-7z"/>'),
  stopTalk: svg('<rect x="6" y="6" width="12" height="12" rx="2"/>'),
  pause: svg('<path d="M9 5v14M15 5v14"/>'),
  play: svg('<path d="m7 4 13 8-13 8z"/>'),
  check: svg('<path d="M20 6 9 17l-5-5"/>'),
  refresh: svg('<path d="M23 4v6h-6M1 20v-6h6"/><path d="M3.5 9a9 9 0 0 1 14.9-3.4L23 10M1 14l4.6 4.4A9 9 0 0 0 20.5 15"/>'),
};

const NAV = [
  ["/", "nav.home"],
  ["/call", "nav.call"],
  ["/history", "nav.history"],
  ["/settings", "nav.settings"],
  ["/admin", "nav.admin"],
  ["/docs", "nav.docs"],
];

/** Fill <header id="topbar"> with the brand, the page links and the language switch. */
export function mountHeader(active) {
  const header = document.getElementById("topbar");
  header.classList.add("topbar");
  header.innerHTML = "";
  const brand = h("a", { class: "brand", href: "/" });
  brand.innerHTML = `${ICONS.logo}<span>MiniCPM-o 4.5</span>`;
  const nav = h("nav", { class: "nav", "aria-label": "main" });
  for (const [href, key] of NAV) {
    const link = h("a", { href, "data-i18n": key }, t(key));
    if (href === active) link.setAttribute("aria-current", "page");
    nav.append(link);
  }
  const select = h("select", { class: "lang-select", id: "lang", "aria-label": "Language / 语言" });
  for (const [code, name] of Object.entries(LANGS)) select.append(h("option", { value: code }, name));
  select.value = getLang();
  select.addEventListener("change", () => setLang(select.value));
  header.append(brand, nav, select);
  applyI18n(document);
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Authorization header for servers with `auth.api_token` (settings page, or ?token= in the URL). */
export function authHeaders() {
  const token = new URLSearchParams(location.search).get("token") || loadSettings().apiToken;
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** fetch() that returns parsed JSON (or null for 204) and throws ApiError with the server's message. */
export async function api(path, { method = "GET", json, body, headers = {} } = {}) {
  const init = { method, headers: { ...authHeaders(), ...headers } };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "network", t("error.network", { detail: String(err.message || err) }));
  }
  if (resp.status === 204) return null;
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!resp.ok) {
    const e = data && data.error ? data.error : { code: `http_${resp.status}`, message: text.slice(0, 200) || resp.statusText };
    throw new ApiError(resp.status, e.code, e.message);
  }
  return data;
}

/** h("div", {class: "x"}, "text", child) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "html") el.innerHTML = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** A message box; `text` is HTML when `isHtml` (only for our own translated strings). */
export function banner(kind, title, text, isHtml = false) {
  const icon = kind === "info" ? ICONS.info : ICONS.alert;
  const el = h("div", { class: `banner ${kind}`, role: kind === "error" ? "alert" : "status" });
  el.innerHTML = icon;
  el.append(h("div", {}, h("strong", {}, title), text ? h("p", isHtml ? { html: text } : {}, isHtml ? null : text) : null));
  return el;
}

export function formatDuration(seconds) {
  const sign = seconds < 0 ? "-" : "";
  const s = Math.round(Math.abs(seconds));
  const m = Math.floor(s / 60);
  const hours = Math.floor(m / 60);
  const mm = hours ? String(m % 60).padStart(2, "0") : String(m);
  return `${sign}${hours ? `${hours}:` : ""}${mm}:${String(s % 60).padStart(2, "0")}`;
}

export function formatNumber(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Number(value).toLocaleString(getLang(), { minimumFractionDigits: digits, maximumFractionDigits: digits });
}
