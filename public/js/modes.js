// The four ways to talk to the model. `id` is the server's mode name (GET /api/info lists those it serves).
export const MODES = [
  { id: "chat", key: "turn", icon: "chat", video: false },
  { id: "audio_duplex", key: "audio", icon: "phone", video: false },
  { id: "omni_duplex", key: "video", icon: "video", video: true },
  { id: "loopback", key: "loopback", icon: "wave", video: false },
];

export function modeById(id) {
  return MODES.find((m) => m.id === id) || { id, key: null, icon: "wave", video: false };
}
