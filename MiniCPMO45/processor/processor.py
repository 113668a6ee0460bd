"""The MiniCPM-o 4.5 input processor: prompt text + images + audio -> token ids, pixel views, mel features, bounds.

The prompt text carries `<image>./</image>` and `<audio>./</audio>` markers (see `chat_template.flatten_messages`).
Each image marker becomes `[<image_id>k</image_id>]<image>` + N×`<unk>` + `</image>` followed by the HD slice
rows (`<slice>` + N×`<unk>` + `</slice>` per column, rows joined by "\\n"); each audio marker becomes
`<|audio_start|>` + P×`<unk>` + `<|audio_end|>` (one block per second with `stream_input`). `<|listen|>` ids are
dropped after tokenizing. The bounds are [start, end) ranges of the `<unk>` runs that the model overwrites with
vision / audio embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from MiniCPMO45.audio.mel import (
    DYNAMIC_FLOOR,
    LogFloor,
    audio_token_count,
    batch_features,
    chunked_audio_token_counts,
)
from MiniCPMO45.audio.mel_stream import HalfDuplexStreamingMel
from MiniCPMO45.config import PreprocessorConfig
from MiniCPMO45.processor.chat_template import AUDIO_MARK, IMAGE_MARK, flatten_messages, render_chat
from MiniCPMO45.processor.image import ImageInputs, ImageProcessor
from MiniCPMO45.tokenizer import MiniCPMOTokenizer

_MARKS = re.compile(f"({re.escape(IMAGE_MARK)}|{re.escape(AUDIO_MARK)})")


class ProcessorError(ValueError):
    """Inputs that do not match the prompt (marker counts, shapes) or cannot be processed."""


@dataclass
class ProcessorOutput:
    """Model inputs for one prompt (batch of one, like the official processor's output for a single chat)."""

    text: str  # the prompt after placeholder expansion
    input_ids: torch.Tensor  # [1, L] int64
    attention_mask: torch.Tensor  # [1, L] bool
    pixel_values: list[torch.Tensor]  # one [3, patch, n*patch] float32 per view, all images in order
    tgt_sizes: torch.Tensor  # [n_views, 2] int64 (patch rows, patch cols)
    image_sizes: list[tuple[int, int]]  # original (width, height) per image
    image_bound: torch.Tensor  # [n_views, 2] int64, [start, end) of each view's <unk> run
    audio_features: torch.Tensor  # [n_segments, 80, frames] float32, zero-padded on the right
    audio_feature_lens: torch.Tensor  # [n_segments] int64
    audio_bounds: torch.Tensor  # [n_blocks, 2] int64
    spk_bounds: torch.Tensor  # [n, 2] int64 (unused in 4.5 inference)
    images: list[ImageInputs] = field(default_factory=list)


def _bounds(ids: torch.Tensor, starts: Sequence[int], ends: Sequence[int], what: str) -> torch.Tensor:
    start_pos = torch.nonzero(torch.isin(ids, torch.tensor(list(starts))), as_tuple=True)[0] + 1
    end_pos = torch.nonzero(torch.isin(ids, torch.tensor(list(ends))), as_tuple=True)[0]
    if len(start_pos) != len(end_pos):
        raise ProcessorError(
            f"{what}: {len(start_pos)} openings but {len(end_pos)} closings (truncated prompt?)"
        )
    return torch.stack([start_pos, end_pos], dim=1).to(torch.int64).reshape(-1, 2)


def merge_audio_parts(audios: Sequence[np.ndarray], parts: Sequence[int] | None) -> list[np.ndarray]:
    """Concatenate consecutive audio items of the same message (the official merge before encoding)."""
    if parts is None:
        return [np.asarray(a, dtype=np.float32) for a in audios]
    if len(parts) != len(audios):
        raise ProcessorError(f"{len(audios)} audio items but {len(parts)} audio_parts")
    merged: list[list[np.ndarray]] = []
    for i, audio in enumerate(audios):
        if i > 0 and parts[i] == parts[i - 1]:
            merged[-1].append(audio)
        else:
            merged.append([audio])
    return [np.concatenate(group).astype(np.float32) for group in merged]


class MiniCPMOProcessor:
    """Builds model inputs from prompts; `MiniCPMOProcessor.from_dir(model_dir)` reads the tokenizer and
    preprocessor_config.json of a model folder."""

    def __init__(
        self,
        tokenizer: MiniCPMOTokenizer,
        config: PreprocessorConfig | None = None,
        chunk_seconds: float = 1.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config or PreprocessorConfig()
        self.images = ImageProcessor(self.config)
        self.chunk_seconds = chunk_seconds

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> MiniCPMOProcessor:
        return cls(MiniCPMOTokenizer.from_dir(model_dir), PreprocessorConfig.from_file(model_dir))

    # ------------------------------------------------------------------------------------------ placeholders

    def image_placeholder(
        self,
        size: tuple[int, int],
        image_index: int = 0,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
    ) -> str:
        cfg = self.config
        unk_run = "<unk>" * cfg.image_feature_size
        text = f"<image>{unk_run}</image>"
        if cfg.use_image_id if use_image_id is None else use_image_id:
            text = f"<image_id>{image_index}</image_id>" + text
        grid = self.images.grid_for(size, max_slice_nums)
        if grid is not None:
            cols, rows = grid
            row = f"<slice>{unk_run}</slice>" * cols
            text += "\n".join([row] * rows)
        return text

    def audio_placeholder(self, n_samples: int, chunked: bool = False) -> str:
        """One `<|audio_start|>…<|audio_end|>` block, or one per `chunk_seconds` when `chunked`."""
        pool = self.config.audio_pool_step
        counts = (
            chunked_audio_token_counts(n_samples, pool, self.chunk_seconds)
            if chunked
            else [audio_token_count(n_samples, pool)]
        )
        return "".join(f"<|audio_start|>{'<unk>' * n}<|audio_end|>" for n in counts)

    # ---------------------------------------------------------------------------------------------- process

    def __call__(
        self,
        text: str,
        images: Sequence[Image.Image] = (),
        audios: Sequence[np.ndarray] = (),
        audio_parts: Sequence[int] | None = None,
        *,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        stream_input: bool = False,
        max_length: int | None = None,
        streaming_mel: HalfDuplexStreamingMel | None = None,
        floor: LogFloor = DYNAMIC_FLOOR,
    ) -> ProcessorOutput:
        """Expand the markers in `text`, tokenize, and compute the media inputs.

        `stream_input` lays audio out as one placeholder block per second. `streaming_mel` switches the audio to
        the half-duplex streaming path (one segment; the session object pads its first segment and keeps the
        buffer). `floor` is the log-mel floor of the batch audio path (dynamic, as a fresh official processor).
        """
        chunks = _MARKS.split(text)
        n_image_marks, n_audio_marks = chunks.count(IMAGE_MARK), chunks.count(AUDIO_MARK)
        if n_image_marks != len(images):
            raise ProcessorError(
                f"the prompt has {n_image_marks} image markers but {len(images)} images were given"
            )
        if n_audio_marks != len(audios):
            raise ProcessorError(
                f"the prompt has {n_audio_marks} audio markers but {len(audios)} audios were given"
            )

        image_inputs = [self.images.preprocess(im, max_slice_nums) for im in images]
        audio_features, audio_lens, audio_lengths = self._audio(audios, audio_parts, streaming_mel, floor)

        image_i = audio_i = 0
        for i, chunk in enumerate(chunks):
            if chunk == IMAGE_MARK:
                size = image_inputs[image_i].original_size
                chunks[i] = self.image_placeholder(size, image_i, max_slice_nums, use_image_id)
                image_i += 1
            elif chunk == AUDIO_MARK:
                chunks[i] = self.audio_placeholder(audio_lengths[audio_i], chunked=stream_input)
                audio_i += 1
        final_text = "".join(chunks)

        sp = self.tokenizer.special
        ids = [t for t in self.tokenizer.encode(final_text) if t != sp.listen]
        if max_length is not None:
            ids = ids[:max_length]
        input_ids = torch.tensor(ids, dtype=torch.int64)
        image_bound = _bounds(
            input_ids, (sp.image_start, sp.slice_start), (sp.image_end, sp.slice_end), "images"
        )
        audio_bounds = _bounds(input_ids, (sp.audio_start,), (sp.audio_end,), "audio")
        spk_bounds = _bounds(input_ids, (sp.spk_start,), (sp.spk_end,), "speaker")

        pixel_values = [torch.from_numpy(pv) for inp in image_inputs for pv in inp.pixel_values]
        tgt = [inp.tgt_sizes for inp in image_inputs]
        tgt_sizes = torch.from_numpy(np.concatenate(tgt)) if tgt else torch.zeros((0, 2), dtype=torch.int64)
        return ProcessorOutput(
            text=final_text,
            input_ids=input_ids.unsqueeze(0),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.bool),
            pixel_values=pixel_values,
            tgt_sizes=tgt_sizes,
            image_sizes=[inp.original_size for inp in image_inputs],
            image_bound=image_bound,
            audio_features=torch.from_numpy(audio_features),
            audio_feature_lens=torch.from_numpy(audio_lens),
            audio_bounds=audio_bounds,
            spk_bounds=spk_bounds,
            images=image_inputs,
        )

    def _audio(
        self,
        audios: Sequence[np.ndarray],
        audio_parts: Sequence[int] | None,
        streaming_mel: HalfDuplexStreamingMel | None,
        floor: LogFloor,
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(features, lens, per-item sample counts used for the placeholders)."""
        clips = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
        if not clips:
            return np.zeros((0, 80, 0), np.float32), np.zeros(0, np.int64), []
        if streaming_mel is not None:
            if len(clips) != 1:
                raise ProcessorError(f"streaming audio takes exactly one segment per call, got {len(clips)}")
            features, n_samples = streaming_mel.push(clips[0])
            return features[None], np.array([features.shape[1]], dtype=np.int64), [n_samples]
        features, lens = batch_features(merge_audio_parts(clips, audio_parts), floor)
        return features, lens, [c.size for c in clips]

    # ------------------------------------------------------------------------------------------------- chat

    def chat_inputs(
        self,
        msgs: Sequence[dict[str, Any]],
        *,
        omni_mode: bool = False,
        stream_input: bool = False,
        enable_thinking: bool = False,
        use_tts_template: bool = False,
        add_generation_prompt: bool = True,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        merge_audio_from_same_content: bool = True,
        max_length: int | None = 8192,
    ) -> ProcessorOutput:
        """Inputs for a chat message list the way `MiniCPMO.chat` builds them.

        Message content is a string or a list of strings, PIL images and 1-D 16 kHz float32 arrays. Any audio
        turns on the TTS template. `add_generation_prompt=False` is the teacher-forcing form.
        """
        flat = flatten_messages(msgs, omni_mode=omni_mode or stream_input)
        prompt = render_chat(
            flat.messages,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            use_tts_template=use_tts_template or flat.has_audio,
        )
        return self(
            prompt,
            flat.images,
            flat.audios,
            flat.audio_parts if merge_audio_from_same_content else None,
            max_slice_nums=max_slice_nums,
            use_image_id=use_image_id,
            stream_input=stream_input,
            max_length=max_length,
        )
