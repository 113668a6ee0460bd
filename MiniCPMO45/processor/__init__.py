"""Input processing for MiniCPM-o 4.5: chat template, images, audio features, placeholders and bounds."""

from MiniCPMO45.processor.audio_features import (
    DYNAMIC_FLOOR,
    FIXED_FLOOR_MODE,
    ExactStreamingMel,
    HalfDuplexStreamingMel,
    LogFloor,
    MelUnit,
    StreamingMel,
    audio_token_count,
    batch_features,
    log_mel,
)
from MiniCPMO45.processor.audio_io import load_audio, resample
from MiniCPMO45.processor.chat_template import (
    AUDIO_MARK,
    GENERATION_BOS,
    GENERATION_BOS_TTS,
    IMAGE_MARK,
    flatten_messages,
    render_chat,
)
from MiniCPMO45.processor.image import ImageInputs, ImageProcessor
from MiniCPMO45.processor.processor import MiniCPMOProcessor, ProcessorError, ProcessorOutput

__all__ = [
    "AUDIO_MARK",
    "DYNAMIC_FLOOR",
    "FIXED_FLOOR_MODE",
    "GENERATION_BOS",
    "GENERATION_BOS_TTS",
    "IMAGE_MARK",
    "ExactStreamingMel",
    "HalfDuplexStreamingMel",
    "ImageInputs",
    "ImageProcessor",
    "LogFloor",
    "MelUnit",
    "MiniCPMOProcessor",
    "ProcessorError",
    "ProcessorOutput",
    "StreamingMel",
    "audio_token_count",
    "batch_features",
    "flatten_messages",
    "load_audio",
    "log_mel",
    "render_chat",
    "resample",
]
