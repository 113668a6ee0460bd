// System prompt presets: the server's (GET /api/presets) when it has them, else these built-in ones.
import { api } from "./common.js";

export const BUILTIN_PRESETS = [
  {
    id: "assistant_en",
    mode: "chat",
    name: { en: "Friendly assistant (English)", zh: "友好助手（英文）" },
    system_prompt:
      "You are a friendly voice assistant. Speak naturally, in short sentences, and get to the point. " +
      "If you did not understand something, say so and ask a short question.",
  },
  {
    id: "assistant_zh",
    mode: "chat",
    name: { en: "Friendly assistant (Chinese)", zh: "友好助手（中文）" },
    system_prompt:
      "你是一位亲切的语音助手。请用自然的口语回答，句子简短，直奔主题。没听清或不确定时，直接说明并简短地追问。",
  },
  {
    id: "partner_en",
    mode: "chat",
    name: { en: "Conversation partner (English practice)", zh: "英语口语陪练" },
    system_prompt:
      "You are a patient partner for practising spoken English. Keep your turns short, keep the talk going " +
      "with a question, and when the user makes a mistake, offer one better way to say it.",
  },
  {
    id: "partner_zh",
    mode: "chat",
    name: { en: "Conversation partner (Chinese practice)", zh: "中文口语陪练" },
    system_prompt:
      "你是一位耐心的中文口语练习伙伴。每次发言尽量简短，用一个问题让对话继续下去；对方说错时，给出一种更地道的说法。",
  },
  {
    id: "observer_en",
    mode: "omni_duplex",
    name: { en: "Camera companion (English)", zh: "摄像头伙伴（英文）" },
    system_prompt:
      "You can see the user's camera. Mention what you notice only when it matters, describe things briefly, " +
      "and answer questions about what is in view.",
  },
  {
    id: "observer_zh",
    mode: "omni_duplex",
    name: { en: "Camera companion (Chinese)", zh: "摄像头伙伴（中文）" },
    system_prompt: "你能看到用户的摄像头画面。只在有必要时提及你注意到的内容，描述要简洁，并回答关于画面内容的问题。",
  },
];

function normalise(list) {
  return list
    .filter((p) => p && typeof p.id === "string")
    .map((p) => ({
      id: p.id,
      mode: typeof p.mode === "string" ? p.mode : "chat",
      name: typeof p.name === "object" && p.name ? p.name : { en: String(p.name || p.id), zh: String(p.name || p.id) },
      system_prompt: String(p.system_prompt || p.text || ""),
      voice: typeof p.voice === "string" ? p.voice : null,
    }));
}

/** {presets, source: "server" | "builtin", error?} — never throws. */
export async function loadPresets() {
  try {
    const data = await api("/api/presets");
    const list = normalise(Array.isArray(data) ? data : (data && data.presets) || []);
    if (list.length) return { presets: list, source: "server" };
    return { presets: BUILTIN_PRESETS, source: "builtin" };
  } catch (err) {
    return { presets: BUILTIN_PRESETS, source: "builtin", error: err };
  }
}
