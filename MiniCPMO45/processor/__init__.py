"""Input processing for MiniCPM-o 4.5: chat template, images, placeholders and bounds (the audio features are
`MiniCPMO45.audio`)."""

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
    "GENERATION_BOS",
    "GENERATION_BOS_TTS",
    "IMAGE_MARK",
    "ImageInputs",
    "ImageProcessor",
    "MiniCPMOProcessor",
    "ProcessorError",
    "ProcessorOutput",
    "flatten_messages",
    "render_chat",
]
