"""aiortc media tracks for the speech model server.

Inbound audio → exact 16 kHz model units (`InboundAudio`, `UnitCutter`), inbound video → the newest
frame as RGB on demand (`LatestVideoFrame`), and the outbound speech track (`SpeechTrack`).
"""

from media_tracks.audio_in import MODEL_RATE, AudioUnit, InboundAudio, UnitCutter, grid_lead_in
from media_tracks.speech_track import FRAME_SAMPLES, OUTPUT_RATE, PacingStats, SpeechTrack
from media_tracks.video_in import LatestVideoFrame, fit_size, frame_to_rgb

__all__ = [
    "FRAME_SAMPLES",
    "MODEL_RATE",
    "OUTPUT_RATE",
    "AudioUnit",
    "InboundAudio",
    "LatestVideoFrame",
    "PacingStats",
    "SpeechTrack",
    "UnitCutter",
    "fit_size",
    "frame_to_rgb",
    "grid_lead_in",
]
