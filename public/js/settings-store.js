// User settings, kept in localStorage. The call page sends what the server accepts with the session request.
const KEY = "minicpmo.settings.v1";

export const DEFAULTS = Object.freeze({
  presetId: "assistant_en",
  systemPrompt: "",
  voiceId: "",
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
  try {
    const stored = JSON.parse(localStorage.getItem(KEY) || "{}");
    return { ...DEFAULTS, ...(stored && typeof stored === "object" ? stored : {}) };
  } catch {
    return { ...DEFAULTS };
  }
}

export function saveSettings(changes) {
  const next = { ...loadSettings(), ...changes };
  localStorage.setItem(KEY, JSON.stringify(next));
  return next;
}

export function resetSettings() {
  const keep = loadSettings();
  // Devices and the API token are not preferences of the conversation: keep them.
  const next = { ...DEFAULTS, apiToken: keep.apiToken, micId: keep.micId, camId: keep.camId, speakerId: keep.speakerId };
  localStorage.setItem(KEY, JSON.stringify(next));
  return next;
}

/** Fields of POST /api/sessions that come from the settings (the server's SessionRequest accepts these). */
export function sessionRequestFields(settings = loadSettings()) {
  const fields = {};
  if (settings.systemPrompt.trim()) fields.system_prompt = settings.systemPrompt;
  if (/^[0-9a-f]{24}$/.test(settings.voiceId || "")) fields.voice = settings.voiceId;
  // The server's ModeOptions bounds (inference/options.py); out-of-range or unset values are left out.
  const options = {
    vad_threshold: clamp(Number(settings.vadThreshold), 0.05, 0.95),
    min_silence_ms: clamp(Math.round(Number(settings.silenceMs)), 100, 5000),
    temperature: clamp(Number(settings.temperature), 0.05, 2),
    top_p: clamp(Number(settings.topP), 0.05, 1),
    top_k: clamp(Math.round(Number(settings.topK)), 0, 1000),
    max_new_tokens: clamp(Math.round(Number(settings.maxNewTokens)), 1, 4096),
    length_penalty: clamp(Number(settings.lengthPenalty), 0.05, 5),
  };
  fields.options = Object.fromEntries(Object.entries(options).filter(([, v]) => Number.isFinite(v)));
  return fields;
}

function clamp(value, low, high) {
  return Number.isFinite(value) ? Math.min(high, Math.max(low, value)) : NaN;
}
