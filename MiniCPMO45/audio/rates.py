"""Sample rates and frame sizes, named once (numbers only: imported by the server, the media processes and the
workers alike)."""

from __future__ import annotations

MODEL_INPUT_RATE = 16000  # Hz of the audio the model hears: units, the mel, the VAD, voices, chat clips
SPEECH_RATE = 24000  # Hz of the vocoder's speech (token2wav), of the IPC speech PCM and of Realtime audio/pcm
WEBRTC_RATE = 48000  # Hz of WebRTC audio (Opus) in both directions
G711_RATE = 8000  # Hz of G.711 (Realtime audio/pcmu, audio/pcma)

WEBRTC_FRAME_S = 0.02  # one outbound WebRTC audio frame: 20 ms
WEBRTC_FRAME_SAMPLES = 960  # 20 ms at 48 kHz
DUPLEX_UNIT_SAMPLES = MODEL_INPUT_RATE  # one duplex model unit: 1 s of 16 kHz audio
CHAT_UNIT_SAMPLES = 5120  # one chat-mode unit: 320 ms of 16 kHz audio, 10 VAD windows of 512 samples
