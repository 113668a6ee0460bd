// Settings page: every field is saved to localStorage as it changes.
import { api, authHeaders, banner, h, ICONS, mountHeader } from "./common.js";
import { getLang, onLangChange, t } from "./i18n.js";
import { loadPresets } from "./presets.js";
import { modeById } from "./modes.js";
import { loadSettings, PROMPT_MODES, resetSettings, savePrompt, saveSettings } from "./settings-store.js";

const $ = (id) => document.getElementById(id);
const RECORD_MS = 10000;
const NUMBER_FIELDS = {
  "vad-threshold": "vadThreshold",
  "silence-ms": "silenceMs",
  temperature: "temperature",
  "top-p": "topP",
  "top-k": "topK",
  "max-new-tokens": "maxNewTokens",
  "length-penalty": "lengthPenalty",
};

let presets = { presets: [], source: "builtin" };
let promptMode = "chat"; // the mode whose prompt the form shows
let voices = []; // the server's voice library (GET /api/voices)
let preview = null; // the <audio> playing a voice preview
let savedTimer = null;

function flashSaved() {
  $("saved").hidden = false;
  clearTimeout(savedTimer);
  savedTimer = setTimeout(() => ($("saved").hidden = true), 1500);
}

function promptEntry(s = loadSettings()) {
  return s.prompts[promptMode] || { presetId: "", text: "" };
}

function fillForm() {
  const s = loadSettings();
  const entry = promptEntry(s);
  $("system-prompt").value = entry.presetId === "" ? "" : entry.text;
  $("system-prompt").placeholder = t("settings.presetDefault");
  for (const [id, key] of Object.entries(NUMBER_FIELDS)) $(id).value = s[key];
  $("vad-value").textContent = Number(s.vadThreshold).toFixed(2);
  $("api-token").value = s.apiToken;
  const chosen = voices.find((v) => v.voice_id === s.voiceId);
  $("voice-current").textContent = s.voiceId
    ? t("settings.voiceCurrent", { id: chosen ? chosen.name || chosen.voice_id : s.voiceId })
    : t("settings.voiceNone");
}

function modeTitle(id) {
  const mode = modeById(id);
  return mode.key ? t(`mode.${mode.key}.title`) : id;
}

function renderPresets() {
  const modes = $("prompt-mode");
  modes.innerHTML = "";
  for (const id of PROMPT_MODES) modes.append(new Option(modeTitle(id), id));
  modes.value = promptMode;
  const select = $("preset");
  const entry = promptEntry();
  select.innerHTML = "";
  select.append(new Option(t("settings.presetDefault"), ""));
  const mine = presets.presets.filter((p) => p.mode === promptMode);
  for (const p of mine) select.append(new Option(p.name[getLang()] || p.name.en || p.id, p.id));
  select.append(new Option(t("settings.presetCustom"), "custom"));
  select.value = entry.presetId === "" || mine.some((p) => p.id === entry.presetId) ? entry.presetId : "custom";
  $("preset-source").textContent = t(presets.source === "server" ? "settings.presetsServer" : "settings.presetsBuiltin");
}

function applyPreset(id) {
  const preset = presets.presets.find((p) => p.id === id);
  if (id === "") {
    savePrompt(promptMode, "", "");
    $("system-prompt").value = "";
  } else if (preset) {
    savePrompt(promptMode, id, preset.system_prompt);
    $("system-prompt").value = preset.system_prompt;
    // a preset with a voice of the library picks that voice too
    if (preset.voice && voices.some((v) => v.voice_id === preset.voice)) {
      saveSettings({ voiceId: preset.voice });
      renderVoices();
      fillForm();
    }
  } else {
    savePrompt(promptMode, "custom", $("system-prompt").value);
  }
  flashSaved();
}

function voiceStatus(kind, title, detail) {
  const box = $("voice-status");
  box.innerHTML = "";
  if (title) box.append(banner(kind, title, detail));
}

// The server takes WAV only: anything else the browser can decode (a recording, an mp3) is converted here.
async function toWav(blob) {
  const head = new Uint8Array(await blob.slice(0, 12).arrayBuffer());
  const tag = (a, b) => String.fromCharCode(...head.slice(a, b));
  if (tag(0, 4) === "RIFF" && tag(8, 12) === "WAVE") return blob;
  const ctx = new OfflineAudioContext(1, 1, 16000);
  const audio = await ctx.decodeAudioData(await blob.arrayBuffer());
  const rate = 16000;
  const render = new OfflineAudioContext(1, Math.ceil(audio.duration * rate), rate);
  const source = render.createBufferSource();
  source.buffer = audio;
  source.connect(render.destination);
  source.start();
  const pcm = (await render.startRendering()).getChannelData(0);
  const out = new DataView(new ArrayBuffer(44 + pcm.length * 2));
  const text = (at, s) => [...s].forEach((c, i) => out.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF"); out.setUint32(4, 36 + pcm.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
  out.setUint32(24, rate, true); out.setUint32(28, rate * 2, true); out.setUint16(32, 2, true); out.setUint16(34, 16, true);
  text(36, "data"); out.setUint32(40, pcm.length * 2, true);
  pcm.forEach((v, i) => out.setInt16(44 + i * 2, Math.max(-1, Math.min(1, v)) * 32767, true));
  return new Blob([out.buffer], { type: "audio/wav" });
}

// ---- the voice library: pick one for the next calls, preview, rename, delete ----

async function loadVoices() {
  try {
    voices = (await api("/api/voices")).voices || [];
  } catch {
    voices = [];
  }
  const s = loadSettings();
  if (s.voiceId && !voices.some((v) => v.voice_id === s.voiceId)) {
    // the chosen voice is gone from the server: calls use the default voice again, and the page says so
    saveSettings({ voiceId: "" });
    voiceStatus("warn", t("settings.voiceGone"), "");
  }
  renderVoices();
  fillForm();
}

function renderVoices() {
  const list = $("voice-list");
  const chosen = loadSettings().voiceId;
  list.innerHTML = "";
  const row = (voice) => {
    const id = voice ? voice.voice_id : "";
    const li = h("li", { class: `voice${id === chosen ? " chosen" : ""}`, "data-voice": id || "default" });
    const use = h("button", { type: "button", class: "use", "aria-pressed": String(id === chosen) }, t(id === chosen ? "settings.voiceInUse" : "settings.voiceUse"));
    use.onclick = () => {
      saveSettings({ voiceId: id });
      renderVoices();
      fillForm();
      flashSaved();
    };
    const label = voice
      ? h("span", { class: "name" }, voice.name || voice.voice_id, h("span", { class: "muted small" }, ` · ${voice.duration_s.toFixed(1)} s`))
      : h("span", { class: "name" }, t("settings.voiceDefault"));
    li.append(use, label);
    const token = voice && loadSettings().voiceTokens[voice.voice_id];
    if (voice) {
      const play = h("button", { type: "button", class: "round small play", "aria-label": t("settings.voicePreview"), title: t("settings.voicePreview") });
      play.innerHTML = ICONS.play;
      play.onclick = () => previewVoice(voice.voice_id);
      const rename = h("button", { type: "button", class: "rename" }, t("settings.voiceRename"));
      rename.onclick = () => renameVoice(voice);
      const remove = h("button", { type: "button", class: "danger-text delete" }, t("settings.voiceDelete"));
      remove.onclick = () => deleteVoice(voice);
      li.append(play);
      if (token) li.append(rename, remove); // only the browser that uploaded a voice may change it
    }
    return li;
  };
  list.append(row(null), ...voices.map(row));
}

async function previewVoice(id) {
  if (preview) preview.pause();
  // fetched (not an <audio src>) so that the API token goes with it
  const resp = await fetch(`/api/voices/${encodeURIComponent(id)}`, { headers: authHeaders() });
  if (!resp.ok) return voiceStatus("error", t("settings.voiceFailed"), `HTTP ${resp.status}`);
  preview = new Audio(URL.createObjectURL(await resp.blob()));
  window.voicePreview = preview; // the browser tests check what plays
  await preview.play().catch(() => {});
}

function ownerHeader(voice) {
  return { "X-Voice-Token": loadSettings().voiceTokens[voice.voice_id] || "" };
}

async function renameVoice(voice) {
  const name = window.prompt(t("settings.voiceRenamePrompt"), voice.name || "");
  if (name === null || !name.trim()) return;
  try {
    await api(`/api/voices/${voice.voice_id}`, { method: "PATCH", json: { name }, headers: ownerHeader(voice) });
  } catch (err) {
    voiceStatus("error", t("settings.voiceFailed"), `${err.message} (${err.code})`);
  }
  await loadVoices();
}

async function deleteVoice(voice) {
  if (!window.confirm(t("settings.voiceDeleteConfirm", { name: voice.name || voice.voice_id }))) return;
  try {
    await api(`/api/voices/${voice.voice_id}`, { method: "DELETE", headers: ownerHeader(voice) });
  } catch (err) {
    voiceStatus("error", t("settings.voiceFailed"), `${err.message} (${err.code})`);
  }
  const { [voice.voice_id]: _, ...tokens } = loadSettings().voiceTokens;
  saveSettings({ voiceTokens: tokens, ...(loadSettings().voiceId === voice.voice_id ? { voiceId: "" } : {}) });
  await loadVoices();
}

async function uploadVoice(blob, filename) {
  voiceStatus("info", t("settings.voiceUploading"), filename);
  const form = new FormData();
  try {
    const wav = await toWav(blob);
    form.append("file", new File([wav], filename.replace(/\.[^.]*$/, "") + ".wav", { type: "audio/wav" }));
  } catch (err) {
    voiceStatus("error", t("settings.voiceFailed"), `${err.name}: ${err.message}`);
    return;
  }
  try {
    const name = encodeURIComponent(filename.replace(/\.[^.]*$/, ""));
    const result = await api(`/api/voices?name=${name}`, { method: "POST", body: form });
    const id = (result && (result.voice_id || result.id)) || filename;
    const tokens = loadSettings().voiceTokens;
    if (result.owner_token) tokens[id] = result.owner_token; // this browser uploaded it first: it owns it
    saveSettings({ voiceId: id, voiceTokens: tokens });
    voiceStatus("info", t("settings.voiceSaved"), result.name || id);
    await loadVoices();
  } catch (err) {
    const hint = err.status === 404 || err.status === 405 ? t("settings.voiceUnsupported") : "";
    voiceStatus("error", t("settings.voiceFailed"), `${err.message} (${err.code}). ${hint}`.trim());
  }
}

async function recordVoice() {
  const button = $("voice-record");
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (err) {
    voiceStatus("error", t("call.mediaFailed"), `${err.name}: ${err.message}`);
    return;
  }
  const recorder = new MediaRecorder(stream);
  const chunks = [];
  recorder.ondataavailable = (e) => e.data.size && chunks.push(e.data);
  recorder.onstop = () => {
    stream.getTracks().forEach((track) => track.stop());
    button.disabled = false;
    button.textContent = t("settings.voiceRecord");
    const blob = new Blob(chunks, { type: recorder.mimeType || "audio/webm" });
    const stamp = new Date().toLocaleString(getLang() === "zh" ? "zh-CN" : "en-GB", { dateStyle: "short", timeStyle: "short" });
    uploadVoice(blob, `${t("settings.voiceRecordingName", { time: stamp })}.${blob.type.includes("ogg") ? "ogg" : "webm"}`);
  };
  button.disabled = true;
  button.textContent = t("settings.voiceRecording");
  voiceStatus("info", t("settings.voiceRecording"), t("settings.voiceSpeak"));
  recorder.start();
  setTimeout(() => recorder.state === "recording" && recorder.stop(), RECORD_MS);
}

function bind() {
  $("prompt-mode").onchange = (e) => {
    promptMode = e.target.value;
    renderPresets();
    fillForm();
  };
  $("preset").onchange = (e) => applyPreset(e.target.value);
  $("system-prompt").oninput = (e) => {
    // editing makes the prompt this mode's own (an emptied box goes back to the mode's default)
    const text = e.target.value;
    const preset = presets.presets.find((p) => p.id === $("preset").value);
    const presetId = !text.trim() ? "" : preset && preset.system_prompt === text ? preset.id : "custom";
    savePrompt(promptMode, presetId, text);
    $("preset").value = presetId;
    flashSaved();
  };
  for (const [id, key] of Object.entries(NUMBER_FIELDS)) {
    $(id).oninput = (e) => {
      const value = Number(e.target.value);
      if (e.target.value === "" || !Number.isFinite(value) || !e.target.checkValidity()) {
        e.target.setAttribute("aria-invalid", "true");
        return;
      }
      e.target.removeAttribute("aria-invalid");
      saveSettings({ [key]: value });
      if (id === "vad-threshold") $("vad-value").textContent = value.toFixed(2);
      flashSaved();
    };
  }
  $("api-token").oninput = (e) => {
    saveSettings({ apiToken: e.target.value.trim() });
    flashSaved();
  };
  $("voice-file").onchange = (e) => {
    const file = e.target.files[0];
    if (file) uploadVoice(file, file.name);
    e.target.value = "";
  };
  $("voice-record").onclick = () => recordVoice();
  $("reset").onclick = () => {
    resetSettings();
    fillForm();
    renderPresets();
    flashSaved();
  };
}

mountHeader("/settings");
bind();
fillForm();
onLangChange(() => {
  renderPresets();
  renderVoices();
  fillForm();
});
presets = await loadPresets();
renderPresets();
fillForm();
loadVoices();
