"""A call's inbound Opus decoded on the event loop, not in aiortc's decoder thread (`rtc.inline_audio_decode`).

aiortc 1.16's `RTCRtpReceiver` gives every receiver a decoder thread: the loop puts each reassembled encoded frame
on a `queue.Queue`, the thread decodes it and hands each decoded frame back with `run_coroutine_threadsafe`, so
every 20 ms frame of every call costs two thread wake-ups, a write to the loop's self-pipe and a task on the loop.
Opus decoding itself is ~20-40 µs a frame, cheaper than those hops, so for audio this module puts a stand-in for
that queue on the receiver before it starts: `put` (called on the loop by the receiver for each encoded frame)
decodes at once with aiortc's own decoder for the codec and queues the frames on the track. The decoder thread
aiortc still starts waits in `get` until the receiver stops, then ends the track the way it always does.

This leans on private attributes of `RTCRtpReceiver` (its name-mangled decoder queue and thread): `decode_inline`
checks aiortc's version (pinned in requirements.txt) and every attribute it touches and raises `RuntimeError`
if they differ, rather than leave a receiver half patched.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
from typing import Any

import aiortc
import av
from aiortc import RTCRtpReceiver
from aiortc import rtcrtpreceiver as aiortc_receiver
from aiortc.codecs import get_decoder
from aiortc.codecs.base import Decoder

log = logging.getLogger(__name__)

AIORTC_VERSION = "1.16.0"  # the version whose RTCRtpReceiver internals this module was written against
_QUEUE = "_RTCRtpReceiver__decoder_queue"
_THREAD = "_RTCRtpReceiver__decoder_thread"
_ERROR = "_RTCRtpReceiver__decoder_error"
_WORKER_PARAMS = ["loop", "input_q", "output_q", "decode_error"]


class InlineAudioDecoder:
    """Stands in for an `RTCRtpReceiver`'s decoder queue: `put` decodes on the loop, `get` parks the thread."""

    def __init__(self, output: asyncio.Queue[Any], decode_error: threading.Event) -> None:
        self._output = output  # the receiver's track's queue (its `recv()` awaits it)
        self._decode_error = decode_error
        self._stopped = threading.Event()
        self._decoder: Decoder | None = None
        self._codec_name: str | None = None
        self.frames_decoded = 0
        self.decode_errors = 0

    def put(self, task: tuple[Any, Any] | None) -> None:
        """The receiver's (codec, encoded frame) to decode now; None: the receiver stops."""
        if task is None:
            self._stopped.set()  # the parked thread ends the track as aiortc's decoder thread does
            return
        codec, encoded_frame = task
        if codec.name != self._codec_name:
            self._decoder = get_decoder(codec)
            self._codec_name = codec.name
        assert self._decoder is not None
        try:
            frames = self._decoder.decode(encoded_frame)
        except av.FFmpegError as exc:
            self.decode_errors += 1
            self._decode_error.set()
            log.warning("inbound %s frame could not be decoded: %s", codec.name, exc)
            return
        for frame in frames:
            self._output.put_nowait(frame)
        self.frames_decoded += len(frames)

    def get(self) -> None:
        """Called by the receiver's decoder thread: returns None (end the track) once the receiver stops."""
        self._stopped.wait()
        self._decoder = None


def decode_inline(receiver: RTCRtpReceiver) -> InlineAudioDecoder:
    """Make `receiver` (audio, not started yet) decode on the event loop; raises RuntimeError if aiortc's
    internals are not the ones this module knows."""
    if aiortc.__version__ != AIORTC_VERSION:
        raise RuntimeError(
            f"inline audio decoding was written for aiortc {AIORTC_VERSION}, not {aiortc.__version__}"
        )
    params = list(inspect.signature(aiortc_receiver.decoder_worker).parameters)
    if params != _WORKER_PARAMS:
        raise RuntimeError(f"aiortc's decoder_worker takes {params}, expected {_WORKER_PARAMS}")
    decoder_queue = getattr(receiver, _QUEUE, None)
    decode_error = getattr(receiver, _ERROR, None)
    track = getattr(receiver, "_track", None)
    output = getattr(track, "_queue", None)
    if not isinstance(decoder_queue, queue.Queue) or not decoder_queue.empty():
        raise RuntimeError(
            f"RTCRtpReceiver's decoder queue is {decoder_queue!r}, expected an empty queue.Queue"
        )
    if not isinstance(decode_error, threading.Event) or not isinstance(output, asyncio.Queue):
        raise RuntimeError("RTCRtpReceiver has no decoder error event or track queue where expected")
    if not hasattr(receiver, _THREAD) or getattr(receiver, _THREAD) is not None:
        raise RuntimeError("RTCRtpReceiver's decoder thread is missing or already started")
    if getattr(track, "kind", None) != "audio":
        raise RuntimeError(f"inline decoding is for audio receivers, not {getattr(track, 'kind', None)!r}")
    inline = InlineAudioDecoder(output, decode_error)
    setattr(receiver, _QUEUE, inline)
    return inline
