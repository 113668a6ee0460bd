"""The MiniCPM-o 4.5 model: LLM, vision encoder + resampler, audio encoder + projection, sharing one set of
weights across every session and mode.

This module computes embeddings and runs the LLM; per-session state (KV slot, streaming audio cache, counters)
lives in `MiniCPMO45.engine`. The TTS speech-token model (`tts`, built when `init_tts`) is loaded here too so
that one object holds every weight; its use belongs to the TTS code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .config import MiniCPMOConfig
from .host_copy import upload
from .loader import CheckpointError, checkpoint_files, load_weights, read_checkpoint
from .modules.qwen3 import Qwen3ForCausalLM
from .modules.resampler import Resampler
from .modules.siglip import SiglipVisionTransformer
from .modules.tts import MiniCPMTTS
from .modules.whisper import AudioProjector, WhisperEncoder, WhisperStreamCache, avg_pool_time, pooled_tokens
from .processor.image import normalize_on_device

Bounds = torch.Tensor | Sequence[Sequence[int]]
KNOWN_PREFIXES = ("llm.", "vpm.", "resampler.", "apm.", "audio_projection_layer.", "tts.")


def group_by_size(sizes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """Indices of the slices of each (rows, cols) patch grid, in first-seen order of sizes."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)
    return groups


class MiniCPMO(nn.Module):
    def __init__(self, config: MiniCPMOConfig) -> None:
        super().__init__()
        self.config = config
        self.llm = Qwen3ForCausalLM(config.llm)
        d = config.llm.hidden_size
        self.vpm: SiglipVisionTransformer | None = None
        self.resampler: Resampler | None = None
        self.apm: WhisperEncoder | None = None
        self.audio_projection_layer: AudioProjector | None = None
        self.tts: MiniCPMTTS | None = None
        if config.init_vision:
            self.vpm = SiglipVisionTransformer(config.vision, config.vision_layers_kept)
            self.resampler = Resampler(config.query_num, d, config.vision.hidden_size)
        if config.init_audio:
            self.apm = WhisperEncoder(config.audio)
            self.audio_projection_layer = AudioProjector(config.audio.encoder_ffn_dim // 4, d)
        if config.init_tts:
            self.tts = MiniCPMTTS(config.tts)

    # ---- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> MiniCPMO:
        """Build from an official checkpoint folder; every tensor is loaded by its official name."""
        config = MiniCPMOConfig.from_file(model_dir)
        stray = sorted(n for n in checkpoint_files(model_dir) if not n.startswith(KNOWN_PREFIXES))
        if stray:
            raise CheckpointError(f"tensors outside every known module: {', '.join(stray[:20])}")
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype).to_empty(device=device)  # cast on meta: no full-precision copy is ever made
        # One module at a time, read on the CPU and copied into place: peak memory stays near one model.
        parts: list[tuple[str, nn.Module | None]] = [
            ("llm.", model.llm),
            ("vpm.", model.vpm),
            ("resampler.", model.resampler),
            ("apm.", model.apm),
            ("audio_projection_layer.", model.audio_projection_layer),
        ]
        for prefix, module in parts:
            if module is not None:
                load_weights(module, read_checkpoint(model_dir, [prefix], dtype=dtype), prefix)
        if model.tts is not None:
            model.tts.load_tensors(read_checkpoint(model_dir, ["tts."], dtype=dtype))
        model.llm.model.rotary.reset_buffers(torch.device(device))
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.lm_head.weight.dtype

    # ---- text -------------------------------------------------------------------------------------------------
    def embed_ids(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.llm.embed(ids)

    # ---- vision -----------------------------------------------------------------------------------------------
    def vision_embeds(
        self,
        slices: Sequence[torch.Tensor],
        tgt_sizes: torch.Tensor,
        normalize: tuple[list[float], list[float]] | None = None,
    ) -> torch.Tensor:
        """Resampled embeddings `[N, query_num, D]` for N slices `[C, patch, L_i*patch]` with `tgt_sizes [N, 2]`.
        `normalize` (mean, std): the slices are uint8 patch rows, normalised on the model's device."""
        if self.vpm is None or self.resampler is None:
            raise RuntimeError("this model was built without the vision encoder")
        if len(slices) != len(tgt_sizes):
            raise ValueError(f"{len(slices)} slices but {len(tgt_sizes)} tgt_sizes")
        tgt_sizes = torch.as_tensor(tgt_sizes, dtype=torch.long)
        for s, (rows, cols) in zip(slices, tgt_sizes.tolist(), strict=True):
            if s.shape[-1] != rows * cols * self.vpm.embeddings.patch_size:
                raise ValueError(f"slice of width {s.shape[-1]} does not hold {rows}x{cols} patches")
        sizes = [(int(r), int(c)) for r, c in tgt_sizes.tolist()]
        out: torch.Tensor | None = None
        step = self.config.vision_batch_size
        # Slices of one patch grid run together with no padding: no attention mask (flash SDPA), one cached
        # position block. Mixed sizes become one group per size; outputs go back to the caller's order.
        for size, members in group_by_size(sizes).items():
            for i in range(0, len(members), step):
                chunk = members[i : i + step]
                pixels = self._stage_pixels([slices[j] for j in chunk], normalize)
                embeds = self.resampler(self.vpm(pixels, [size] * len(chunk)), [size] * len(chunk))
                if out is None:
                    out = embeds.new_empty(len(slices), *embeds.shape[1:])
                if chunk == list(range(chunk[0], chunk[0] + len(chunk))):
                    out[chunk[0] : chunk[0] + len(chunk)] = embeds
                else:
                    out.index_copy_(0, upload(chunk, embeds.device), embeds)
        if out is None:
            raise ValueError("vision_embeds needs at least one slice")
        return out

    def _stage_pixels(
        self, slices: Sequence[torch.Tensor], normalize: tuple[list[float], list[float]] | None = None
    ) -> torch.Tensor:
        """Equal-shape slices as one `[B, C, patch, L*patch]` batch on the model's device and dtype: one
        host-to-device copy (through pinned memory when the target is CUDA), the cast (and with `normalize`,
        the normalisation of uint8 pixels) runs on the device."""
        on_host = all(s.device.type == "cpu" for s in slices)
        if on_host and self.device.type == "cuda":
            staged = torch.empty((len(slices), *slices[0].shape), dtype=slices[0].dtype, pin_memory=True)
            torch.stack(list(slices), out=staged)
            pixels = staged.to(self.device, non_blocking=True)
        else:
            pixels = torch.stack([s.to(self.device) for s in slices])
        if normalize is not None:
            pixels = normalize_on_device(pixels, *normalize)
        return pixels.to(self.dtype)

    # ---- audio ------------------------------------------------------------------------------------------------
    def _project_audio(self, states: torch.Tensor) -> torch.Tensor:
        assert self.audio_projection_layer is not None
        return avg_pool_time(self.audio_projection_layer(states), self.config.audio_pool_step)

    def audio_embeds(
        self, mel: torch.Tensor, mel_lengths: torch.Tensor | Sequence[int], chunk_seconds: float | None = None
    ) -> list[torch.Tensor]:
        """Offline encoding of segments `mel [S, n_mels, F]` → one `[P_i, D]` tensor per segment.

        `chunk_seconds` (1.0 in chat and for the duplex reference audio) gives the chunk-causal mask; None gives
        full attention (the half-duplex user turn).
        """
        if self.apm is None:
            raise RuntimeError("this model was built without the audio encoder")
        lengths = torch.as_tensor(mel_lengths, dtype=torch.long)
        chunk = int(chunk_seconds * 50) if chunk_seconds else None
        states = self.apm(mel.to(self.device, self.dtype), lengths.to(self.device), chunk)
        pooled = self._project_audio(states)
        step = self.config.audio_pool_step
        return [pooled[i, : pooled_tokens(int(n), step)] for i, n in enumerate(lengths.tolist())]

    def audio_embeds_stream(
        self,
        mel: torch.Tensor,
        cache: WhisperStreamCache,
        prefix_extra_frames: int = 0,
        suffix_extra_frames: int = 0,
        mel_length: int | None = None,
    ) -> torch.Tensor:
        """One streaming chunk `[1, n_mels, F]` of one session → `[P, D]`; `cache` carries the encoder state."""
        if self.apm is None:
            raise RuntimeError("this model was built without the audio encoder")
        states = self.apm.forward_stream(
            mel.to(self.device, self.dtype), cache, prefix_extra_frames, suffix_extra_frames
        )
        pooled = self._project_audio(states)[0]
        if mel_length is not None:
            pooled = pooled[: pooled_tokens(mel_length, self.config.audio_pool_step)]
        return pooled

    # ---- multimodal merge -------------------------------------------------------------------------------------
    def merge_embeddings(
        self,
        input_ids: torch.Tensor | Sequence[int],
        vision: torch.Tensor | None = None,
        image_bounds: Bounds = (),
        audio: Sequence[torch.Tensor] | torch.Tensor | None = None,
        audio_bounds: Bounds = (),
    ) -> torch.Tensor:
        """Token embeddings `[T, D]` of one prompt with vision rows scattered into `image_bounds` (each bound
        `[start, end)` takes one slice's `query_num` rows, in order) and audio rows into `audio_bounds` (the
        concatenated audio embeddings fill the bounds in order)."""
        emb = self.embed_ids(input_ids).clone()
        image_bounds = [tuple(map(int, b)) for b in torch.as_tensor(image_bounds).reshape(-1, 2).tolist()]
        audio_bounds = [tuple(map(int, b)) for b in torch.as_tensor(audio_bounds).reshape(-1, 2).tolist()]
        if image_bounds:
            if vision is None:
                raise ValueError("image bounds given without vision embeddings")
            rows = vision.reshape(-1, vision.shape[-1])
            want = sum(e - s for s, e in image_bounds)
            if rows.shape[0] != want:
                raise ValueError(f"{rows.shape[0]} vision rows for image bounds that hold {want}")
            idx = torch.cat([torch.arange(s, e) for s, e in image_bounds]).to(emb.device)
            emb[idx] = rows.to(emb.dtype)
        if audio_bounds:
            if audio is None:
                raise ValueError("audio bounds given without audio embeddings")
            rows = torch.cat(list(audio)) if not isinstance(audio, torch.Tensor) else audio
            want = sum(e - s for s, e in audio_bounds)
            if rows.shape[0] != want:
                raise ValueError(f"{rows.shape[0]} audio rows for audio bounds that hold {want}")
            idx = torch.cat([torch.arange(s, e) for s, e in audio_bounds]).to(emb.device)
            emb[idx] = rows.to(emb.dtype)
        return emb
