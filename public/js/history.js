// Recent calls: this browser's calls (kept in localStorage by the call page) and, for the operator, every
// recording on the server. A recording replays with its transcript in step and its camera snapshots.
import { api, authHeaders, banner, formatDuration, h, ICONS, mountHeader } from "./common.js";
import { hasText, onLangChange, t } from "./i18n.js";
import { modeById } from "./modes.js";
import { callHistory, forgetCall } from "./settings-store.js";

const $ = (id) => document.getElementById(id);
let recordings = []; // RecordingInfo of the calls this page can open
let current = null; // the Recording being replayed
let audioUrl = null;

function when(unix) {
  return new Date(unix * 1000).toLocaleString();
}

function modeTitle(id) {
  const mode = modeById(id);
  return mode.key ? t(`mode.${mode.key}.title`) : id;
}

async function loadList() {
  const mine = callHistory();
  const found = new Map();
  // the operator (loopback, or with the admin token) sees every recording; anyone else sees their own calls
  try {
    const all = await api("/api/recordings", { headers: adminHeader() });
    for (const r of all.recordings) found.set(r.recording_id, r);
  } catch {
    // not the operator: only this browser's calls
  }
  await Promise.all(
    mine
      .filter((c) => !found.has(c.id))
      .map(async (c) => {
        try {
          const r = await api(`/api/recordings/${encodeURIComponent(c.id)}`);
          found.set(r.recording_id, r);
        } catch (err) {
          if (err.status === 404) forgetCall(c.id); // deleted, or pruned by the retention rules
        }
      }),
  );
  recordings = [...found.values()].sort((a, b) => b.started_at - a.started_at);
  renderList();
}

function adminHeader() {
  const token = sessionStorage.getItem("minicpmo.adminToken");
  return token ? { "X-Admin-Token": token } : {};
}

function renderList() {
  const list = $("recordings");
  list.innerHTML = "";
  if (!recordings.length) {
    list.append(h("li", { class: "muted" }, t("history.empty")));
    return;
  }
  for (const r of recordings) {
    const open = h("button", { type: "button", class: "open" }, t("history.play"));
    open.onclick = () => openRecording(r.recording_id);
    const facts = `${when(r.started_at)} · ${formatDuration(r.duration_s)}${r.ended ? "" : ` · ${t("history.running")}`}`;
    list.append(
      h("li", { class: "recording", "data-recording": r.recording_id }, open, h("span", { class: "name" }, modeTitle(r.mode)), h("span", { class: "muted small" }, facts)),
    );
  }
}

function line(event) {
  switch (event.type) {
    case "text":
      return ["assistant", event.text];
    case "user_turn":
      if (event.started) return null;
      return ["user", event.text !== null && event.text !== undefined ? event.text : t("call.spokenTurn", { s: Number(event.seconds).toFixed(1) })];
    case "session":
      return ["system", t("call.modeOpen", { mode: modeTitle(event.mode) })];
    case "error":
      return ["system error", hasText(`error.${event.code}`) ? t(`error.${event.code}`) : `${event.code}: ${event.message}`];
    default:
      return null;
  }
}

async function openRecording(id) {
  let recording;
  try {
    recording = await api(`/api/recordings/${encodeURIComponent(id)}`);
  } catch (err) {
    $("messages").replaceChildren(banner("error", t("history.failed"), `${err.message} (${err.code})`));
    return;
  }
  current = recording;
  history.replaceState(null, "", `#${id}`);
  $("player").hidden = false;
  $("player-title").textContent = `${modeTitle(recording.mode)} · ${when(recording.started_at)}`;
  $("player-info").textContent = formatDuration(recording.duration_s);
  // the transcript: assistant text deltas of one turn joined into one entry, each entry with its time
  const list = $("player-transcript");
  list.innerHTML = "";
  let last = null;
  let mode = null;
  for (const event of recording.events) {
    if (event.type === "session") {
      if (event.phase !== "active" || event.mode === mode) continue; // the same call announced again
      mode = event.mode;
    }
    const entry = line(event);
    if (!entry) continue;
    const [role, text] = entry;
    if (role === "assistant" && last && last.dataset.role === "assistant" && last.dataset.turn === String(event.turn)) {
      last.lastChild.textContent += text;
      continue;
    }
    // a spoken turn is announced when it ended: it starts `seconds` earlier
    const start = event.type === "user_turn" && event.seconds ? Math.max(0, event.t - event.seconds) : event.t;
    const at = h("span", { class: "at muted small" }, formatDuration(start));
    const item = h("li", { class: role, "data-t": String(start), "data-role": role, "data-turn": String(event.turn ?? "") }, at, h("span", {}, text));
    item.onclick = () => {
      $("player-audio").currentTime = start;
    };
    if (event.type === "user_turn" && event.seconds) {
      const play = h("button", { type: "button", class: "round small play", "aria-label": t("history.playTurn"), title: t("history.playTurn") });
      play.innerHTML = ICONS.play;
      play.onclick = (e) => {
        e.stopPropagation();
        $("player-audio").currentTime = start;
        $("player-audio").play().catch(() => {});
      };
      item.append(play);
    }
    last = item;
    list.append(item);
  }
  // the audio: fetched (not an <audio src>) so that the API token goes with it
  const resp = await fetch(`/api/recordings/${encodeURIComponent(id)}/audio`, { headers: authHeaders() });
  if (audioUrl) URL.revokeObjectURL(audioUrl);
  audioUrl = URL.createObjectURL(await resp.blob());
  $("player-audio").src = audioUrl;
  $("player-download").href = audioUrl;
  $("player-download").download = `call-${id.slice(0, 8)}.wav`;
  showFrame(0);
  $("player").scrollIntoView({ block: "nearest" });
}

async function showFrame(seconds) {
  const img = $("player-frame");
  const times = current ? current.frame_times_ms : [];
  const ms = [...times].reverse().find((x) => x <= seconds * 1000) ?? times[0];
  if (ms === undefined) {
    img.hidden = true;
    return;
  }
  if (img.dataset.ms === String(ms)) return;
  img.dataset.ms = String(ms);
  const resp = await fetch(`/api/recordings/${encodeURIComponent(current.recording_id)}/frames/${ms}`, { headers: authHeaders() });
  if (!resp.ok) return;
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(await resp.blob());
  img.hidden = false;
}

function follow() {
  const now = $("player-audio").currentTime;
  let active = null;
  for (const li of $("player-transcript").children) {
    if (Number(li.dataset.t) <= now) active = li;
    li.classList.remove("now");
  }
  if (active) active.classList.add("now");
  showFrame(now);
}

async function removeCurrent() {
  if (!current || !window.confirm(t("history.deleteConfirm"))) return;
  try {
    await api(`/api/recordings/${encodeURIComponent(current.recording_id)}`, { method: "DELETE" });
  } catch (err) {
    $("messages").replaceChildren(banner("error", t("history.failed"), `${err.message} (${err.code})`));
    return;
  }
  forgetCall(current.recording_id);
  current = null;
  $("player").hidden = true;
  $("player-audio").removeAttribute("src");
  history.replaceState(null, "", location.pathname);
  await loadList();
}

mountHeader("/history");
$("player-audio").ontimeupdate = follow;
$("player-delete").onclick = removeCurrent;
$("player-share").onclick = async () => {
  // the link is the recording's capability (and needs the API token where the server sets one)
  const link = `${location.origin}/history#${current.recording_id}`;
  await navigator.clipboard.writeText(link).catch(() => {});
  $("messages").replaceChildren(banner("info", t("history.linkCopied"), link));
};
onLangChange(renderList);
await loadList();
if (location.hash.length > 1) openRecording(decodeURIComponent(location.hash.slice(1)));
