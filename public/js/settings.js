// Settings page: every field is saved to localStorage as it changes.
import { api, banner, mountHeader } from "./common.js";
import { getLang, onLangChange, t } from "./i18n.js";
import { loadPresets } from "./presets.js";
import { DEFAULTS, loadSettings, resetSettings, saveSettings } from "./settings-store.js";

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
let savedTimer = null;

function flashSaved() {
  $("saved").hidden = false;
  clearTimeout(savedTimer);
  savedTimer = setTimeout(() => ($("saved").hidden = true), 1500);
}

function fillForm() {
  const s = loadSettings();
  $("system-prompt").value = s.systemPrompt;
  for (const [id, key] of Object.entries(NUMBER_FIELDS)) $(id).value = s[key];
  $("vad-value").textContent = Number(s.vadThreshold).toFixed(2);
  $("api-token").value = s.apiToken;
  $("voice-current").textContent = s.voiceId ? t("settings.voiceCurrent", { id: s.voiceId }) : t("settings.voiceNone");
}

function renderPresets() {
  const select = $("preset");
  const s = loadSettings();
  select.innerHTML = "";
  select.append(new Option(t("settings.presetCustom"), ""));
  for (const p of presets.presets) select.append(new Option(p.name[getLang()] || p.name.en || p.id, p.id));
  select.value = presets.presets.some((p) => p.id === s.presetId) ? s.presetId : "";
  $("preset-source").textContent = t(presets.source === "server" ? "settings.presetsServer" : "settings.presetsBuiltin");
}

function applyPreset(id) {
  const preset = presets.presets.find((p) => p.id === id);
  if (!preset) {
    saveSettings({ presetId: "" });
  } else {
    saveSettings({ presetId: id, systemPrompt: preset.system_prompt });
    $("system-prompt").value = preset.system_prompt;
  }
  flashSaved();
}

function voiceStatus(kind, title, detail) {
  const box = $("voice-status");
  box.innerHTML = "";
  if (title) box.append(banner(kind, title, detail));
}

async function uploadVoice(blob, filename) {
  voiceStatus("info", t("settings.voiceUploading"), filename);
  const form = new FormData();
  form.append("file", blob, filename);
  try {
    const result = await api("/api/voices", { method: "POST", body: form });
    const id = (result && (result.voice_id || result.id)) || filename;
    saveSettings({ voiceId: id });
    fillForm();
    voiceStatus("info", t("settings.voiceSaved"), id);
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
    uploadVoice(blob, `recording.${blob.type.includes("ogg") ? "ogg" : "webm"}`);
  };
  button.disabled = true;
  button.textContent = t("settings.voiceRecording");
  voiceStatus("info", t("settings.voiceRecording"), t("settings.voiceSpeak"));
  recorder.start();
  setTimeout(() => recorder.state === "recording" && recorder.stop(), RECORD_MS);
}

function bind() {
  $("preset").onchange = (e) => applyPreset(e.target.value);
  $("system-prompt").oninput = (e) => {
    const preset = presets.presets.find((p) => p.id === $("preset").value);
    const changes = { systemPrompt: e.target.value };
    if (preset && preset.system_prompt !== e.target.value) {
      changes.presetId = "";
      $("preset").value = "";
    }
    saveSettings(changes);
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
    const preset = presets.presets.find((p) => p.id === DEFAULTS.presetId);
    if (preset) saveSettings({ systemPrompt: preset.system_prompt });
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
  fillForm();
});
presets = await loadPresets();
// First visit: start from the default preset's text rather than an empty prompt.
const first = loadSettings();
if (!first.systemPrompt && first.presetId) {
  const preset = presets.presets.find((p) => p.id === first.presetId);
  if (preset) saveSettings({ systemPrompt: preset.system_prompt });
}
renderPresets();
fillForm();
