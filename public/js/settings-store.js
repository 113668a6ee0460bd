// User settings, kept in localStorage. The call page sends what the server accepts with the session request.
const KEY = "minicpmo.settings.v1";

// The modes that take a system prompt; each keeps its own (a chat prompt is not a duplex prompt).
export const PROMPT_MODES = ["chat", "audio_duplex", "omni_duplex"];

export const DEFAULTS = Object.freeze({
  prompts: {}, // mode -> {presetId: "" (the mode's own default) | a preset id | "custom", text}
  voiceId: "",
  lastMode: "", // the mode of the last call: where "Call" in the menu opens
  voiceTokens: {}, // voice id -> the owner token its upload returned (to rename or delete it)
  vadThreshold: 0.5, // turn-based: speech probability that starts a user turn
  silenceMs: 800, // turn-based: silence that ends a user turn
  temperature: 0.7,
  topP: 0.8,
  topK: 100,
  maxNewTokens: 256,
  lengthPenalty: 1.1,
  apiToken: "",
  micId: "",
  camId: "",
  speakerId: "",
});

export function loadSettings() {
  let stored = {};
  try {
    stored = JSON.parse(localStorage.getItem(KEY) || "{}");
  } catch {
    stored = {};
  }
  if (!stored || typeof stored !== "object") stored = {};
  const settings = { ...DEFAULTS, ...stored };
  if (!settings.prompts || typeof settings.prompts !== "object") settings.prompts = {};
  // Before prompts were per mode, one prompt went with every mode: a custom one becomes chat's.
  if (typeof stored.systemPrompt === "string" && stored.systemPrompt.trim() && !stored.prompts && !stored.presetId) {
    settings.prompts = { chat: { presetId: "custom", text: stored.systemPrompt } };
  }
  delete settings.systemPrompt;
  delete settings.presetId;
  return settings;
}

/** The prompt a call in `mode` sends ("" when the mode's own default is used). */
export function promptFor(settings, mode) {
  const entry = settings.prompts[mode];
  return entry && entry.presetId !== "" && typeof entry.text === "string" ? entry.text.trim() : "";
}

export function savePrompt(mode, presetId, text) {
  const settings = loadSettings();
  return saveSettings({ prompts: { ...settings.prompts, [mode]: { presetId, text } } });
}

export function saveSettings(changes) {
  const next = { ...loadSettings(), ...changes };
  localStorage.setItem(KEY, JSON.stringify(next));
  return next;
}

export function resetSettings() {
  const keep = loadSettings();
  // Devices, the API token and the voices' owner tokens are not preferences of the conversation: keep them.
  const next = {
    ...DEFAULTS,
    apiToken: keep.apiToken,
    micId: keep.micId,
    camId: keep.camId,
    speakerId: keep.speakerId,
    voiceTokens: keep.voiceTokens,
  };
  localStorage.setItem(KEY, JSON.stringify(next));
  return next;
}

/** Fields of POST /api/sessions for a call in `mode` that come from the settings (the server's SessionRequest). */
export function sessionRequestFields(settings = loadSettings(), mode = "chat") {
  const fields = {};
  const prompt = promptFor(settings, mode);
  if (prompt) fields.system_prompt = prompt;
  if (/^[0-9a-f]{24}$/.test(settings.voiceId || "")) fields.voice = settings.voiceId;
  // The server's ModeOptions bounds (inference/options.py). Only values the user changed are sent: otherwise
  // each mode keeps its own tuned defaults (duplex samples with top-k 20, chat with top-k 100).
  const options = {
    vad_threshold: ["vadThreshold", (v) => clamp(v, 0.05, 0.95)],
    min_silence_ms: ["silenceMs", (v) => clamp(Math.round(v), 100, 5000)],
    temperature: ["temperature", (v) => clamp(v, 0.05, 2)],
    top_p: ["topP", (v) => clamp(v, 0.05, 1)],
    top_k: ["topK", (v) => clamp(Math.round(v), 0, 1000)],
    max_new_tokens: ["maxNewTokens", (v) => clamp(Math.round(v), 1, 4096)],
    length_penalty: ["lengthPenalty", (v) => clamp(v, 0.05, 5)],
  };
  fields.options = {};
  for (const [name, [key, bound]] of Object.entries(options)) {
    const value = bound(Number(settings[key]));
    if (Number.isFinite(value) && Number(settings[key]) !== DEFAULTS[key]) fields.options[name] = value;
  }
  return fields;
}

function clamp(value, low, high) {
  return Number.isFinite(value) ? Math.min(high, Math.max(low, value)) : NaN;
}

// ---- this browser's calls (the history page replays their recordings; a call's id is its capability) ----
const CALLS_KEY = "minicpmo.calls.v1";
const CALLS_KEPT = 50;

export function callHistory() {
  try {
    const calls = JSON.parse(localStorage.getItem(CALLS_KEY) || "[]");
    return Array.isArray(calls) ? calls.filter((c) => c && typeof c.id === "string") : [];
  } catch {
    return [];
  }
}

export function rememberCall(id, mode) {
  const calls = [{ id, mode, at: Date.now() }, ...callHistory().filter((c) => c.id !== id)].slice(0, CALLS_KEPT);
  localStorage.setItem(CALLS_KEY, JSON.stringify(calls));
}

export function forgetCall(id) {
  localStorage.setItem(CALLS_KEY, JSON.stringify(callHistory().filter((c) => c.id !== id)));
}
