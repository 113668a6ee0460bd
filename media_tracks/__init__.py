"""aiortc media tracks for the speech model server (the rates and frame sizes are `MiniCPMO45.audio.rates`).

Inbound audio → exact 16 kHz model units (`InboundAudio`, `UnitCutter`), inbound video → the newest
frame as RGB on demand (`LatestVideoFrame`), the outbound speech track (`SpeechTrack`), and inbound audio
decoded on the event loop instead of aiortc's decoder thread (`decode_inline`).
"""

from media_tracks.audio_in import AudioUnit, InboundAudio, UnitCutter, grid_lead_in
from media_tracks.inline_decode import InlineAudioDecoder, decode_inline
from media_tracks.speech_track import PacingStats, SpeechTrack
from media_tracks.video_in import LatestVideoFrame, fit_size, frame_to_rgb, model_input_size

__all__ = [
    "AudioUnit",
    "InboundAudio",
    "InlineAudioDecoder",
    "LatestVideoFrame",
    "PacingStats",
    "SpeechTrack",
    "UnitCutter",
    "decode_inline",
    "fit_size",
    "frame_to_rgb",
    "model_input_size",
    "grid_lead_in",
]
