"""Call recordings: what the model heard, what the caller heard, the transcript and camera snapshots.

One folder per call, named by the call's id (which is also its capability: whoever holds the call's URL may
read its recording), written while the call runs:

- `caller.wav`: the caller's audio as the model got it (16 kHz mono PCM16, unit by unit);
- `assistant.wav`: the model's speech as the outbound track sent it (24 kHz mono PCM16: after flushes, with
  the silences between turns);
- `events.jsonl`: the events the caller got (text, turns, states, metrics, errors), each with `t`, seconds
  since the recording started;
- `frames/<ms>.jpg`: a camera snapshot every `FRAME_EVERY_S` in camera modes;
- `meta.json`: mode, start, end, duration.

Both WAVs start at the recording's start and are kept in step with the wall clock (silence fills a gap), so
they play in sync. They are written, and their headers rewritten, every `HEADER_EVERY_S`: a crash loses at most
those seconds.
`prune` enforces `recording.retention_days` and `recording.max_gb`, oldest first.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import time
import wave
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydantic import BaseModel, ConfigDict

from MiniCPMO45.audio.rates import MODEL_INPUT_RATE, SPEECH_RATE
from MiniCPMO45.audio.wav import pcm16_header, pcm16_wav, wav_header
from rtc_server.config import AppConfig

log = logging.getLogger("rtc_server.recordings")
REPO_ROOT = Path(__file__).resolve().parent.parent
HEADER_EVERY_S = 2.0
FRAME_EVERY_S = 5.0
MAX_GAP_S = 600.0  # silence filled in at most this long at once (a clock jump must not write gigabytes)
RECORDING_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def recordings_dir(config: AppConfig) -> Path:
    return REPO_ROOT / config.recording.dir


class RecordingInfo(BaseModel):
    """One recording, as `GET /api/recordings` and `GET /api/recordings/{id}` describe it."""

    model_config = ConfigDict(extra="forbid")
    recording_id: str
    mode: str
    started_at: float  # Unix time
    duration_s: float
    ended: bool  # False while the call runs (or if the server stopped before it ended)
    frames: int
    bytes: int


class RecordingList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recordings: list[RecordingInfo]


class Recording(RecordingInfo):
    """A recording with its transcript and metrics (`GET /api/recordings/{id}`)."""

    events: list[dict[str, Any]]
    frame_times_ms: list[int]


class TrackWriter:
    """A mono PCM16 WAV on the call's clock: a chunk lands at its time (silence fills the time before it),
    or right after the previous one if it comes early."""

    def __init__(self, path: Path, rate: int, t0: float) -> None:
        self.rate = rate
        self.t0 = t0
        self.samples = 0
        self._pending: list[np.ndarray] = []  # chunks not written yet (at most HEADER_EVERY_S of them)
        self._file: BinaryIO = path.open("wb")
        self._header()
        self._header_at = time.monotonic()

    def _header(self) -> None:
        header = pcm16_header(self.rate, self.samples)
        end = self._file.tell()
        self._file.seek(0)
        self._file.write(header)
        self._file.seek(max(end, len(header)))

    def write(self, pcm: np.ndarray, ends_at: float) -> None:
        """`pcm` (float in [-1, 1] or int16) whose last sample is at `ends_at` (monotonic seconds). Chunks are
        gathered in memory and written together (the outbound track gives one per packet)."""
        if self._file.closed or pcm.size == 0:
            return
        samples = pcm if pcm.dtype == np.int16 else (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)
        start = int(round((ends_at - self.t0) * self.rate)) - samples.size
        gap = min(start - self.samples, int(MAX_GAP_S * self.rate))
        if gap > 0:
            self._pending.append(np.zeros(gap, dtype=np.int16))
            self.samples += gap
        self._pending.append(samples.copy())
        self.samples += samples.size
        if time.monotonic() - self._header_at >= HEADER_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Write what is gathered and rewrite the header: the file on disk is a whole WAV up to here."""
        if self._file.closed:
            return
        if self._pending:
            self._file.write(np.concatenate(self._pending).astype("<i2").tobytes())
            self._pending.clear()
        self._header()
        self._file.flush()
        self._header_at = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


class CallRecorder:
    """Writes one call's recording (event loop only; file writes are small and buffered)."""

    def __init__(self, folder: Path, call_id: str, mode: str) -> None:
        self.folder = folder / call_id
        self.folder.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.meta: dict[str, Any] = {"mode": mode, "started_at": time.time(), "ended": False}
        self._write_meta()
        self.caller = TrackWriter(self.folder / "caller.wav", MODEL_INPUT_RATE, self.t0)
        self.assistant = TrackWriter(self.folder / "assistant.wav", SPEECH_RATE, self.t0)
        self._events = (self.folder / "events.jsonl").open("a", encoding="utf-8")
        self._frame_due = 0.0
        self.closed = False

    def _write_meta(self) -> None:
        tmp = self.folder / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta), encoding="utf-8")
        tmp.replace(self.folder / "meta.json")

    def caller_audio(self, pcm: np.ndarray, ends_at: float) -> None:
        self.caller.write(pcm, ends_at)

    def assistant_frame(self, pcm48k: np.ndarray) -> None:
        """One packet the outbound track sent (`rtc.outbound_packet_ms` of 48 kHz int16, whose content is the 24 kHz
        speech upsampled, so every other sample is the speech at 24 kHz with nothing to alias). It goes out at
        the start of its time slot and plays through it: it ends one packet after now."""
        speech = pcm48k[::2]
        self.assistant.write(speech, time.monotonic() + speech.size / SPEECH_RATE)

    def event(self, event_json: str) -> None:
        """An event as it went to the caller (a JSON object), with its time put first."""
        if not self.closed and event_json.startswith("{"):
            t = round(time.monotonic() - self.t0, 3)
            rest = event_json[1:].strip()
            self._events.write(f'{{"t": {t}' + (", " + rest if rest != "}" else "}") + "\n")

    def wants_frame(self) -> bool:
        return not self.closed and time.monotonic() >= self._frame_due

    def frame_jpeg(self, jpeg: bytes) -> None:
        """A camera snapshot (already JPEG-encoded, off the loop), at most one per FRAME_EVERY_S."""
        if self.closed:
            return
        now = time.monotonic()
        self._frame_due = now + FRAME_EVERY_S
        frames = self.folder / "frames"
        frames.mkdir(exist_ok=True)
        (frames / f"{int((now - self.t0) * 1000):09d}.jpg").write_bytes(jpeg)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.caller.close()
        self.assistant.close()
        self._events.close()
        # the length of what was recorded (the call's teardown after its last frame is not part of it)
        audio_s = max(self.caller.samples / MODEL_INPUT_RATE, self.assistant.samples / SPEECH_RATE)
        self.meta.update(ended=True, duration_s=round(audio_s, 3))
        self._write_meta()


def encode_jpeg(rgb: np.ndarray, quality: int = 70) -> bytes:
    """A camera frame (H, W, 3 uint8) as JPEG (run it off the event loop)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---- reading, replay and housekeeping (blocking: run off the event loop) ----


def _wav_seconds(path: Path) -> float:
    """Length of a WAV written by TrackWriter, from its size (its header may lag after a crash)."""
    try:
        rate, _, _ = wav_header(path)
    except (OSError, EOFError, wave.Error):
        return 0.0
    return max(path.stat().st_size - 44, 0) / 2 / rate


def info(folder: Path) -> RecordingInfo | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    frames = folder / "frames"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    duration = meta.get("duration_s")
    if not isinstance(duration, int | float):
        duration = max(_wav_seconds(folder / "caller.wav"), _wav_seconds(folder / "assistant.wav"))
    return RecordingInfo(
        recording_id=folder.name,
        mode=str(meta.get("mode", "")),
        started_at=float(meta.get("started_at", 0.0)),
        duration_s=round(float(duration), 3),
        ended=bool(meta.get("ended", False)),
        frames=len(list(frames.glob("*.jpg"))) if frames.is_dir() else 0,
        bytes=size,
    )


def list_all(root: Path) -> list[RecordingInfo]:
    found = (
        [info(p) for p in root.iterdir() if p.is_dir() and RECORDING_ID.match(p.name)]
        if root.is_dir()
        else []
    )
    return sorted((r for r in found if r is not None), key=lambda r: r.started_at, reverse=True)


def load(root: Path, recording_id: str) -> Recording | None:
    folder = root / recording_id
    summary = info(folder) if RECORDING_ID.match(recording_id) else None
    if summary is None:
        return None
    events: list[dict[str, Any]] = []
    path = folder / "events.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                break  # the last line of a crashed call may be cut
    frames = folder / "frames"
    times = sorted(int(p.stem) for p in frames.glob("*.jpg")) if frames.is_dir() else []
    return Recording(**summary.model_dump(), events=events, frame_times_ms=times)


def _read_pcm(path: Path) -> np.ndarray:
    if not path.is_file():
        return np.zeros(0, dtype=np.float32)
    data = path.read_bytes()[44:]
    return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float32) / 32768


def mixed_wav(root: Path, recording_id: str) -> bytes:
    """Both sides in one 24 kHz mono WAV, in sync, for replay and download."""

    folder = root / recording_id
    caller = _read_pcm(folder / "caller.wav")
    assistant = _read_pcm(folder / "assistant.wav")
    # 16 -> 24 kHz by linear interpolation: the caller's side is the quieter reference here
    up = (
        np.interp(np.arange(caller.size * 3 // 2) / 1.5, np.arange(caller.size), caller)
        if caller.size
        else caller
    )
    out = np.zeros(max(up.size, assistant.size), dtype=np.float32)
    out[: up.size] += 0.8 * up
    out[: assistant.size] += assistant
    return pcm16_wav(np.clip(out, -1.0, 1.0), SPEECH_RATE)


def frame_path(root: Path, recording_id: str, ms: int) -> Path | None:
    path = root / recording_id / "frames" / f"{ms:09d}.jpg"
    return path if RECORDING_ID.match(recording_id) and path.is_file() else None


def delete(root: Path, recording_id: str) -> bool:
    folder = root / recording_id
    if not RECORDING_ID.match(recording_id) or not folder.is_dir():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def prune(
    root: Path, retention_days: float, max_bytes: int, keep: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """Delete recordings older than `retention_days`, then the oldest until all fit `max_bytes`; never
    those in `keep` (calls still running). Returns the deleted ids."""
    now = time.time()
    deleted: list[str] = []
    recordings = sorted(list_all(root), key=lambda r: r.started_at)
    total = sum(r.bytes for r in recordings)
    for rec in recordings:
        if rec.recording_id in keep:
            continue
        too_old = now - rec.started_at > retention_days * 86400
        if too_old or total > max_bytes:
            if delete(root, rec.recording_id):
                deleted.append(rec.recording_id)
                total -= rec.bytes
    if deleted:
        log.info("recordings: deleted %d (retention and size cap)", len(deleted))
    return deleted
