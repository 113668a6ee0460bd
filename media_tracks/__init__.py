"""aiortc media tracks for the speech model server (the rates and frame sizes are `MiniCPMO45.audio.rates`).

Inbound audio → exact 16 kHz model units (`InboundAudio`, `UnitCutter`), inbound video → the newest
frame as RGB on demand (`LatestVideoFrame`), and the outbound speech track (`SpeechTrack`).
"""

from media_tracks.audio_in import AudioUnit, InboundAudio, UnitCutter, grid_lead_in
from media_tracks.speech_track import PacingStats, SpeechTrack
from media_tracks.video_in import LatestVideoFrame, fit_size, frame_to_rgb

__all__ = [
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
