// The call page. Microphone (and camera in video modes) -> RTCPeerConnection -> POST /api/sessions.
// The model's speech comes back as a WebRTC audio track and plays in the <audio id="remote"> element, so the
// browser's echo canceller knows it; Web Audio is used only to measure levels.
import { CallStats } from "./call-stats.js";
import { api, banner, formatDuration, h, ICONS, mountHeader } from "./common.js";
import { applyI18n, hasText, onLangChange, t } from "./i18n.js";
import { LevelMeter } from "./levels.js";
import { MODES, modeById } from "./modes.js";
import { loadSettings, promptFor, rememberCall, saveSettings, sessionRequestFields } from "./settings-store.js";

const AUDIO_CONSTRAINTS = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };
const AUTO_RETRIES = 2;
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

// Everything about the current call; the browser tests read it as window.callState.
const state = {
  pc: null,
  channel: null,
  sessionId: null,
  stream: null,
  constraints: null,
  events: [],
  status: "idle",
  talk: null, // listening | thinking | speaking, from `state` events
  phase: null, // queued | active, from `session` events
  mode: null, // the mode the server runs for this call, from `session` events
  paused: false, // from `paused` / `resumed` events
  remoteLevel: 0,
  maxRemoteLevel: 0,
  localLevel: 0,
  retries: 0,
  hangingUp: false,
};
window.callState = state;

let audioContext = null;
let remoteMeter = null;
let localMeter = null;
let stats = new CallStats();
let statsTimer = null;
let queueTimer = null;
let queue = { position: null, deadline: null };
let lastAssistant = null; // transcript entry that text deltas of the current turn extend
let serverModes = null;
let disconnectTimer = null;
let announcedMode = null; // the mode last announced in the transcript
let callSettings = null; // the settings the current call was started with

// ---- small UI helpers ----

function setStatus(status) {
  state.status = status;
  $("status").textContent = t(`status.${status}`);
  const grade = { connected: "ok", queued: "warn", connecting: "warn", media: "warn", reconnecting: "warn", failed: "bad" }[status];
  $("status-badge").className = `badge conn ${grade || ""}`;
}

function setTalkState(talk) {
  state.talk = talk;
  const badge = $("state");
  badge.dataset.state = talk || "idle";
  badge.hidden = !talk;
  badge.textContent = talk ? t(`state.${talk}`) : "–";
  badge.className = `badge state-badge ${{ listening: "accent", speaking: "ok", thinking: "warn" }[talk] || ""}`;
}

function showError(title, detail) {
  const box = $("messages");
  box.innerHTML = "";
  const el = banner("error", title, detail);
  el.id = "call-error";
  box.append(el);
}

function clearError() {
  $("messages").innerHTML = "";
}

function addTranscript(role, text, extraClass = "") {
  const list = $("transcript");
  const empty = list.querySelector(".placeholder");
  if (empty) empty.remove();
  const li = h("li", { class: `${role} ${extraClass}`.trim() }, text);
  list.append(li);
  list.scrollTop = list.scrollHeight;
  return li;
}

function onText(event) {
  if (!lastAssistant || Number(lastAssistant.dataset.turn) !== event.turn) {
    lastAssistant = addTranscript("assistant", "");
    lastAssistant.dataset.turn = String(event.turn);
  }
  lastAssistant.textContent += event.text;
  $("transcript").scrollTop = $("transcript").scrollHeight;
}

function transcriptPlaceholder() {
  const list = $("transcript");
  if (!list.children.length) list.append(h("li", { class: "system placeholder" }, t("call.transcriptEmpty")));
}

// ---- queue countdown: ticks down each second; only a new position may move it up ----

function onQueue(position, etaS) {
  const deadline = Date.now() + etaS * 1000;
  // The countdown only moves up with a new place in the queue, or when it ran out (the server's estimate is
  // refreshed every few seconds): a wait that turned out longer shows a new estimate, not "over the estimate".
  const overdue = queue.deadline !== null && queue.deadline < Date.now();
  if (position !== queue.position || queue.deadline === null || deadline < queue.deadline || overdue) {
    queue.deadline = deadline;
  }
  queue.position = position;
  $("queue").hidden = false;
  setStatus("queued");
  renderQueue();
  if (!queueTimer) queueTimer = setInterval(renderQueue, 1000);
}

function renderQueue() {
  if (queue.position === null) return;
  $("queue-position").textContent = `#${queue.position}`;
  const left = (queue.deadline - Date.now()) / 1000;
  $("queue-eta").textContent = left >= 0 ? formatDuration(left) : t("call.queueOvertime", { time: formatDuration(-left) });
}

function endQueue() {
  clearInterval(queueTimer);
  queueTimer = null;
  queue = { position: null, deadline: null };
  $("queue").hidden = true;
}

// ---- events from the server ----

function onEvent(event) {
  state.events.push(event);
  switch (event.type) {
    case "session":
      state.phase = event.phase;
      $("text-input").disabled = $("text-send").disabled = event.phase !== "active";
      if (event.phase === "queued") {
        setStatus("queued");
        $("queue").hidden = false;
      } else if (event.phase === "active") {
        endQueue();
        if (state.pc && state.pc.connectionState === "connected") setStatus("connected");
        if (event.mode !== announcedMode) addTranscript("system", t("call.modeOpen", { mode: modeName(event.mode) }));
        announcedMode = event.mode;
      }
      state.mode = event.mode;
      $("rec-badge").hidden = !event.recording;
      if ([...$("mode").options].some((o) => o.value === event.mode)) $("mode").value = event.mode;
      if (callSettings) renderSetup(callSettings, event.mode);
      renderInCall();
      break;
    case "state":
      setTalkState(event.state);
      renderInCall();
      break;
    case "text":
      onText(event);
      break;
    case "user_turn":
      if (event.started) break; // the caller began to speak; the turn itself comes when it ends
      // typed turns are in the transcript since they were sent; a spoken one shows how much the model took
      if (event.seconds !== null && event.seconds !== undefined) {
        addTranscript("user", t("call.spokenTurn", { s: event.seconds.toFixed(1) }), "spoken");
      }
      lastAssistant = null;
      break;
    case "metrics":
      stats.addUnit(event);
      if (!$("stats").hidden) renderStats();
      break;
    case "queue":
      onQueue(event.position, event.eta_s);
      break;
    case "paused":
      state.paused = true;
      addTranscript("system", t("call.paused", { s: event.timeout_s }));
      renderInCall();
      break;
    case "resumed":
      state.paused = false;
      addTranscript("system", t("call.resumed"));
      renderInCall();
      break;
    case "error": {
      if (state.mode && $("mode").value !== state.mode) $("mode").value = state.mode; // a refused switch
      // the server's code in the user's language where the page knows it; the server's words otherwise
      const text = hasText(`error.${event.code}`) ? `${t(`error.${event.code}`)} (${event.code})` : `${event.code}: ${event.message}`;
      addTranscript("system", text, "error");
      showError(t("call.serverError"), text);
      // an error the call goes on after (e.g. audio_too_fast) does not stay on screen
      const pc = state.pc;
      setTimeout(() => {
        if (state.pc === pc && pc && pc.connectionState === "connected") clearError();
      }, 8000);
      break;
    }
  }
}

// ---- media ----

function mediaConstraints(mode, settings) {
  const audio = { ...AUDIO_CONSTRAINTS };
  if (settings.micId) audio.deviceId = { exact: settings.micId };
  let video = false;
  if (mode.video) {
    video = { width: { ideal: 640 }, height: { ideal: 480 } };
    if (settings.camId) video.deviceId = { exact: settings.camId };
  }
  return { audio, video };
}

async function getMedia(constraints) {
  try {
    return await navigator.mediaDevices.getUserMedia(constraints);
  } catch (err) {
    // A remembered device that is gone: try again with the default one.
    if (err.name === "OverconstrainedError" || err.name === "NotFoundError") {
      const relaxed = { audio: { ...AUDIO_CONSTRAINTS }, video: constraints.video ? { width: { ideal: 640 }, height: { ideal: 480 } } : false };
      return navigator.mediaDevices.getUserMedia(relaxed);
    }
    throw err;
  }
}

function isDenied(err) {
  return err && (err.name === "NotAllowedError" || err.name === "SecurityError");
}

/** The microphone alone, when a video mode's camera is missing or busy; null if even that fails. */
async function audioOnlyFallback() {
  try {
    return await getMedia({ audio: { ...AUDIO_CONSTRAINTS }, video: false });
  } catch {
    return null;
  }
}

/** What went wrong with the devices, and what the user can do about it. */
function showMediaError(err, mode) {
  const name = err && err.name;
  if (isDenied(err)) {
    showError(t(mode.video ? "call.denied.camMic" : "call.denied.mic"), t("call.denied.how"));
  } else if (name === "NotFoundError" || name === "OverconstrainedError") {
    showError(t("call.noMic"), t("call.noMicHow"));
  } else if (name === "NotReadableError" || name === "AbortError") {
    showError(t("call.micBusy"), t("call.micBusyHow"));
  } else {
    showError(t("call.mediaFailed"), `${name || "Error"}: ${(err && err.message) || err}`);
  }
}

function ensureAudioContext() {
  if (!audioContext) audioContext = new AudioContext();
  if (audioContext.state === "suspended") audioContext.resume().catch(() => {});
  return audioContext;
}

function attachSelfView(mode) {
  const video = $("self-video");
  const hasVideo = mode.video && state.stream && state.stream.getVideoTracks().length > 0;
  $("self-tile").hidden = false;
  $("stage").classList.add("with-self");
  video.hidden = !hasVideo;
  $("self-avatar").hidden = hasVideo;
  if (hasVideo) video.srcObject = state.stream;
}

function detachSelfView() {
  $("self-video").srcObject = null;
  $("self-tile").hidden = true;
  $("stage").classList.remove("with-self");
}

function animateLevels() {
  const remote = remoteMeter ? remoteMeter.level() : 0;
  const local = localMeter ? localMeter.level() : 0;
  state.remoteLevel = remote;
  state.maxRemoteLevel = Math.max(state.maxRemoteLevel, remote);
  state.localLevel = local;
  $("remote-meter").style.height = `${Math.round(remote * 100)}%`;
  $("local-meter").style.height = `${Math.round(local * 100)}%`;
  const avatar = $("assistant-avatar");
  avatar.style.setProperty("--level", remote.toFixed(3));
  avatar.classList.toggle("speaking", remote > 0.02 || state.talk === "speaking");
  if (state.pc) requestAnimationFrame(animateLevels);
}

async function fillDevices() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
  const devices = await navigator.mediaDevices.enumerateDevices();
  const settings = loadSettings();
  const fill = (select, kind, chosen) => {
    select.innerHTML = "";
    select.append(h("option", { value: "" }, t("call.defaultDevice")));
    devices
      .filter((d) => d.kind === kind && d.deviceId && d.deviceId !== "default")
      .forEach((d, i) => select.append(h("option", { value: d.deviceId }, d.label || `${kind} ${i + 1}`)));
    select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
  };
  fill($("mic-select"), "audioinput", settings.micId);
  fill($("cam-select"), "videoinput", settings.camId);
  fill($("speaker-select"), "audiooutput", settings.speakerId);
  $("speaker-field").hidden = typeof $("remote").setSinkId !== "function";
}

async function switchDevice(kind, deviceId) {
  saveSettings(kind === "audio" ? { micId: deviceId } : { camId: deviceId });
  if (!state.pc || !state.stream) return;
  const old = kind === "audio" ? state.stream.getAudioTracks()[0] : state.stream.getVideoTracks()[0];
  if (!old) return;
  const base = kind === "audio" ? { ...AUDIO_CONSTRAINTS } : { width: { ideal: 640 }, height: { ideal: 480 } };
  if (deviceId) base.deviceId = { exact: deviceId };
  try {
    const fresh = await navigator.mediaDevices.getUserMedia({ [kind]: base });
    const track = kind === "audio" ? fresh.getAudioTracks()[0] : fresh.getVideoTracks()[0];
    track.enabled = old.enabled;
    const sender = state.pc.getSenders().find((s) => s.track === old);
    if (sender) await sender.replaceTrack(track);
    state.stream.removeTrack(old);
    old.stop();
    state.stream.addTrack(track);
    if (kind === "audio") {
      if (localMeter) localMeter.stop();
      localMeter = new LevelMeter(ensureAudioContext(), new MediaStream([track]));
    } else {
      $("self-video").srcObject = state.stream;
    }
  } catch (err) {
    showError(t("call.deviceFailed"), `${err.name}: ${err.message}`);
  }
}

// ---- the call ----

function waitForIceGathering(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 2000); // host candidates are there by then; more would only add routes
  });
}

function currentMode() {
  return modeById($("mode").value);
}

async function start() {
  if (state.pc) return;
  clearError();
  let mode = currentMode();
  const settings = loadSettings();
  $("start").disabled = true;
  $("start").hidden = true;
  $("reconnect").hidden = true;
  $("mode").disabled = true; // until the call is active: then a change switches the call's mode
  state.hangingUp = false;
  $("stop").hidden = false;
  $("stop").disabled = false;
  setStatus("media");
  stats = new CallStats();
  ensureAudioContext();
  state.constraints = mediaConstraints(mode, settings);
  try {
    state.stream = await getMedia(state.constraints);
  } catch (err) {
    const fallback = mode.video && !isDenied(err) ? await audioOnlyFallback() : null;
    if (!fallback) {
      showMediaError(err, mode);
      resetControls();
      setStatus("idle");
      return;
    }
    // No usable camera: the call goes on as an audio call, and says so.
    state.stream = fallback;
    mode = modeById("audio_duplex");
    $("mode").value = mode.id;
    state.constraints = mediaConstraints(mode, settings);
    addTranscript("system", t("call.noCameraAudioOnly"), "error");
    renderToggles();
  }
  // Mute and camera-off chosen before the call apply to the new tracks.
  const micOff = $("mic").getAttribute("aria-pressed") === "true";
  const camOff = $("cam").getAttribute("aria-pressed") === "true";
  state.stream.getAudioTracks().forEach((track) => (track.enabled = !micOff));
  state.stream.getVideoTracks().forEach((track) => (track.enabled = !camOff));
  localMeter = new LevelMeter(audioContext, new MediaStream(state.stream.getAudioTracks()));
  attachSelfView(mode);
  fillDevices().catch(() => {});

  callSettings = settings;
  saveSettings({ lastMode: mode.id });
  renderSetup(settings, mode.id);
  const pc = new RTCPeerConnection();
  state.pc = pc;
  state.stream.getTracks().forEach((track) => pc.addTrack(track, state.stream));
  pc.ontrack = (ev) => {
    if (ev.track.kind !== "audio") return;
    const stream = ev.streams[0] || new MediaStream([ev.track]);
    $("remote").srcObject = stream;
    $("remote").play().catch(() => {});
    if (remoteMeter) remoteMeter.stop();
    remoteMeter = new LevelMeter(ensureAudioContext(), stream);
  };
  pc.onconnectionstatechange = () => onConnectionState(pc);
  const channel = pc.createDataChannel("events");
  state.channel = channel;
  channel.onopen = () => {
    $("text-input").disabled = $("text-send").disabled = state.phase !== "active";
  };
  channel.onmessage = (ev) => {
    try {
      onEvent(JSON.parse(ev.data));
    } catch (err) {
      console.warn("bad event", err);
    }
  };
  channel.onclose = () => {
    $("text-input").disabled = true;
    $("text-send").disabled = true;
    if (state.pc === pc && !state.hangingUp && pc.connectionState !== "failed") {
      // The server ended the call (its reason came as an `error` event, if any): no automatic retry.
      addTranscript("system", t("call.endedByServer"));
      teardown({ deleteSession: false }).then(() => setStatus("ended")); // "Start call" begins a new one
    }
  };
  requestAnimationFrame(animateLevels);

  setStatus("connecting");
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc);
    const answer = await api("/api/sessions", {
      method: "POST",
      json: { sdp: pc.localDescription.sdp, type: "offer", mode: mode.id, ...sessionRequestFields(settings, mode.id) },
    });
    if (state.pc !== pc) return; // hung up meanwhile
    state.sessionId = answer.session_id;
    rememberCall(answer.session_id, mode.id);
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
  } catch (err) {
    // what it means in the user's language as the title, the server's own words (which name e.g. the
    // modes it has) as the detail
    const known = err.code && hasText(`error.${err.code}`);
    const detail = err.code ? `${err.message} (${err.code})` : String(err.message || err);
    showError(known ? t(`error.${err.code}`) : t("call.startFailed"), detail);
    await teardown({ deleteSession: true });
    setStatus("failed");
    return;
  }
  $("stop").disabled = false;
  $("start").hidden = true;
  $("stage-hint").hidden = true;
  statsTimer = setInterval(pollStats, 1000);
}

function onConnectionState(pc) {
  if (state.pc !== pc) return;
  const s = pc.connectionState;
  clearTimeout(disconnectTimer);
  if (s === "connected") {
    state.retries = 0;
    setStatus(state.phase === "queued" ? "queued" : "connected");
  } else if (s === "disconnected") {
    setStatus("reconnecting"); // ICE often recovers by itself; give it a moment
    disconnectTimer = setTimeout(() => state.pc === pc && connectionLost(), 8000);
  } else if (s === "failed") {
    connectionLost();
  }
}

async function connectionLost() {
  addTranscript("system", (await howCallEnded()) || t("call.connectionLost"), "error");
  await teardown({ deleteSession: true });
  setStatus("failed");
  $("reconnect").hidden = false;
  $("start").hidden = true; // one way back: Reconnect
  if (state.retries < AUTO_RETRIES) {
    state.retries += 1;
    setStatus("reconnecting");
    setTimeout(() => {
      if (!state.pc && state.status === "reconnecting") start();
    }, 1500 * state.retries);
  }
}

/** Why the server ended the call, when it did (its URL answers 410 with the reason): a media process that
 * stopped could not say it over the events channel, which died with it. */
async function howCallEnded() {
  if (!state.sessionId) return null;
  try {
    await api(`/api/sessions/${encodeURIComponent(state.sessionId)}`);
  } catch (err) {
    if (err.status === 410) {
      const detail = hasText(`error.${err.code}`) ? t(`error.${err.code}`) : err.message;
      return t("call.endedWhy", { detail: `${detail} (${err.code})` });
    }
  }
  return null;
}

async function pollStats() {
  if (!state.pc) return;
  try {
    await stats.poll(state.pc);
  } catch {
    return;
  }
  if (!$("stats").hidden) renderStats();
}

function renderStats() {
  const body = $("stats-body");
  body.innerHTML = "";
  for (const [key, value, grade] of stats.rows()) {
    body.append(h("tr", {}, h("th", { scope: "row" }, t(key)), h("td", { class: `num ${grade}` }, value)));
  }
}

async function teardown({ deleteSession }) {
  const id = state.sessionId;
  const pc = state.pc;
  state.pc = null;
  clearInterval(statsTimer);
  clearTimeout(disconnectTimer);
  statsTimer = null;
  endQueue();
  if (deleteSession && id) {
    await api(`/api/sessions/${id}`, { method: "DELETE" }).catch(() => {});
  }
  if (pc) pc.close();
  if (state.stream) state.stream.getTracks().forEach((track) => track.stop());
  state.stream = null;
  state.channel = null;
  if (remoteMeter) remoteMeter.stop();
  if (localMeter) localMeter.stop();
  remoteMeter = localMeter = null;
  $("remote").srcObject = null;
  detachSelfView();
  setTalkState(null);
  state.phase = null;
  state.mode = null;
  state.paused = false;
  state.sessionId = null;
  lastAssistant = null;
  announcedMode = null;
  resetControls();
}

function resetControls() {
  $("start").disabled = false;
  $("start").hidden = false;
  $("stop").hidden = true;
  $("mode").disabled = false;
  $("text-input").disabled = true;
  $("text-send").disabled = true;
  $("call-setup").hidden = true;
  $("rec-badge").hidden = true;
  renderToggles();
  renderInCall();
}

// ---- in-call controls: interrupt, end turn (chat), pause/resume, live mode switch ----

function sendControl(message) {
  if (!state.channel || state.channel.readyState !== "open") return false;
  state.channel.send(JSON.stringify(message));
  return true;
}

function renderInCall() {
  const active = Boolean(state.pc) && state.phase === "active";
  $("in-call").hidden = !active;
  $("mode").disabled = Boolean(state.pc) && !active;
  if (!active) return;
  $("end-turn").hidden = state.mode !== "chat";
  $("interrupt").disabled = state.talk !== "speaking" && state.talk !== "thinking";
  $("pause").setAttribute("aria-pressed", String(state.paused));
  $("pause").innerHTML = state.paused ? ICONS.play : ICONS.pause;
  const label = t(state.paused ? "call.resume" : "call.pause");
  $("pause").setAttribute("aria-label", label);
  $("pause").title = label;
  // a live switch cannot add a camera the call was started without
  const hasVideo = Boolean(state.stream && state.stream.getVideoTracks().length);
  for (const option of $("mode").options) option.disabled = Boolean(modeById(option.value).video) && !hasVideo;
}

function switchMode(mode) {
  if (mode === state.mode) return;
  // the new mode opens with its own prompt from the settings ("" for its default)
  if (!sendControl({ type: "set_mode", mode, system_prompt: promptFor(callSettings || loadSettings(), mode) })) {
    $("mode").value = state.mode;
    return;
  }
  addTranscript("system", t("call.switching", { mode: modeName(mode) }));
}

/** What this call was started with: the prompt (a preset's name, or the start of a custom prompt) and voice. */
function renderSetup(settings, mode) {
  const prompt = promptFor(settings, mode);
  const shown = prompt ? (prompt.length > 60 ? `${prompt.slice(0, 57)}…` : prompt) : t("call.defaultPrompt");
  const voice = sessionRequestFields(settings).voice || t("call.defaultVoice");
  const box = $("call-setup");
  box.textContent = `${t("call.promptLabel")}: ${shown} · ${t("call.voiceLabel")}: ${voice}`;
  box.title = prompt;
  box.hidden = false;
}

async function hangUp() {
  state.hangingUp = true;
  state.retries = AUTO_RETRIES; // no automatic reconnect after a hang-up
  $("stop").disabled = true;
  await teardown({ deleteSession: true });
  setStatus("idle");
  addTranscript("system", t("call.ended"));
}

// ---- controls ----

function renderToggles() {
  const micOff = $("mic").getAttribute("aria-pressed") === "true";
  const camOff = $("cam").getAttribute("aria-pressed") === "true";
  $("mic").innerHTML = micOff ? ICONS.micOff : ICONS.mic;
  $("cam").innerHTML = camOff ? ICONS.videoOff : ICONS.video;
  $("muted-mark").hidden = !micOff;
  $("muted-mark").innerHTML = ICONS.micOff;
  // a camera turned off shows the avatar, not a black frame
  const hasVideo = Boolean(state.stream && state.stream.getVideoTracks().length);
  if (state.pc && hasVideo) {
    $("self-video").hidden = camOff;
    $("self-avatar").hidden = !camOff;
  }
  const mode = currentMode();
  $("cam").hidden = !mode.video;
  $("cam-field").hidden = !mode.video;
  $("stage-hint").textContent = mode.key ? t(`mode.${mode.key}.text`) : "";
  $("stage-hint").hidden = Boolean(state.pc);
}

function toggleTrack(button, tracks) {
  const off = button.getAttribute("aria-pressed") !== "true";
  button.setAttribute("aria-pressed", String(off));
  tracks.forEach((track) => (track.enabled = !off));
  renderToggles();
}

function modeName(id) {
  const mode = modeById(id);
  return mode.key ? t(`mode.${mode.key}.title`) : id;
}

function renderModeSelect() {
  const select = $("mode");
  // the URL's mode, else the last one this browser called in, else an audio call (not the microphone test)
  const chosen = select.value || params.get("mode") || loadSettings().lastMode || "audio_duplex";
  select.innerHTML = "";
  const ids = MODES.map((m) => m.id);
  if (!ids.includes(chosen)) ids.push(chosen); // a mode from the URL that we have no card for
  for (const id of ids) {
    const unavailable = serverModes && !serverModes.includes(id);
    select.append(h("option", { value: id }, unavailable ? `${modeName(id)} (${t("call.unavailableShort")})` : modeName(id)));
  }
  select.value = chosen;
}

function renderAll() {
  applyI18n(document);
  renderModeSelect();
  renderToggles();
  setStatus(state.status);
  setTalkState(state.talk);
  renderInCall();
  if (state.pc && callSettings) renderSetup(callSettings, state.mode || currentMode().id);
  renderQueue();
  if (!$("stats").hidden) renderStats();
  const placeholder = $("transcript").querySelector(".placeholder");
  if (placeholder) placeholder.textContent = t("call.transcriptEmpty");
}

function init() {
  mountHeader("/call");
  $("assistant-avatar").innerHTML = ICONS.bot;
  $("self-avatar").innerHTML = ICONS.user;
  $("devices").innerHTML = ICONS.gear;
  $("stats-toggle").innerHTML = ICONS.chart;
  $("stop").innerHTML = ICONS.hangup;
  $("text-send").innerHTML = ICONS.send;
  $("interrupt").innerHTML = ICONS.stopTalk;
  $("end-turn").innerHTML = ICONS.check;
  $("pause").innerHTML = ICONS.pause;
  renderAll();
  transcriptPlaceholder();
  onLangChange(renderAll);

  $("start").onclick = () => start();
  $("reconnect").onclick = () => {
    state.retries = 0;
    start();
  };
  $("stop").onclick = () => hangUp();
  $("interrupt").onclick = () => sendControl({ type: "interrupt" });
  $("end-turn").onclick = () => sendControl({ type: "end_turn" });
  $("pause").onclick = () => sendControl({ type: state.paused ? "resume" : "pause" });
  $("mode").onchange = () => {
    if (state.pc && state.phase === "active") switchMode($("mode").value);
    const url = new URL(location.href);
    url.searchParams.set("mode", $("mode").value);
    history.replaceState(null, "", url);
    renderToggles();
  };
  $("mic").onclick = () => toggleTrack($("mic"), state.stream ? state.stream.getAudioTracks() : []);
  $("cam").onclick = () => toggleTrack($("cam"), state.stream ? state.stream.getVideoTracks() : []);
  $("devices").onclick = () => {
    const panel = $("device-panel");
    panel.hidden = !panel.hidden;
    $("devices").setAttribute("aria-expanded", String(!panel.hidden));
    if (!panel.hidden) fillDevices().catch(() => {});
  };
  $("stats-toggle").onclick = () => {
    const box = $("stats");
    box.hidden = !box.hidden;
    $("stats-toggle").setAttribute("aria-pressed", String(!box.hidden));
    if (!box.hidden) renderStats();
  };
  $("mic-select").onchange = (e) => switchDevice("audio", e.target.value);
  $("cam-select").onchange = (e) => switchDevice("video", e.target.value);
  $("speaker-select").onchange = (e) => {
    saveSettings({ speakerId: e.target.value });
    $("remote").setSinkId(e.target.value).catch((err) => showError(t("call.deviceFailed"), String(err.message || err)));
  };
  $("text-form").onsubmit = (e) => {
    e.preventDefault();
    const text = $("text-input").value.trim();
    if (!text || !state.channel || state.channel.readyState !== "open") return;
    state.channel.send(JSON.stringify({ type: "text", text }));
    addTranscript("user", text);
    lastAssistant = null;
    $("text-input").value = "";
  };

  const speaker = loadSettings().speakerId;
  if (speaker && typeof $("remote").setSinkId === "function") $("remote").setSinkId(speaker).catch(() => {});
  api("/api/info")
    .then((info) => {
      serverModes = info.modes;
      renderModeSelect();
    })
    .catch(() => {});
  if (params.get("autostart") === "1") start();
}

init();
