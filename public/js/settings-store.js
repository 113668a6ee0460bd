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
  return fields;
}
