"""Typed view of the official MiniCPM-o 4.5 `config.json` and `preprocessor_config.json`.

Every value is read from the files; the defaults below are only used when a key is absent and are the
official class defaults. Unknown keys are kept (`extra="allow"`): real checkpoints carry many training-only
fields that inference never reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class LLMConfig(_Section):
    """The Qwen3 text backbone (top-level keys of config.json)."""

    vocab_size: int = 151748
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int = 151643
    eos_token_id: int | list[int] = 151645
    pad_token_id: int | None = 151643


class VisionConfig(_Section):
    """SigLIP / NaViT encoder (`vision_config`)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 980
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"


class AudioConfig(_Section):
    """Whisper encoder (`audio_config`)."""

    d_model: int = 1024
    encoder_layers: int = 24
    encoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    num_mel_bins: int = 80
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    scale_embedding: bool = False


class TTSConfig(_Section):
    """The speech-token LM (`tts_config`)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 20
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    llm_dim: int = 4096
    num_text_tokens: int = 152064
    num_audio_tokens: int = 6562
    num_vq: int = 1
    audio_bos_token_id: int = 21132
    text_eos_token_id: int = 21133
    normalize_projected_hidden: bool = True
    condition_type: str = "hidden_text_merge"
    projector_type: str = "mlp"
    attention_type: str = "sliding_recompute"
    window_size: int = 2
    recomputed_chunks: int = 1
    streaming_audio_chunk_size: int = 50
    streaming_text_reserved_len: int = 300
    audio_tokenizer_sample_rate: int = 24000

    @property
    def audio_eos_id(self) -> int:
        """The codec end-of-speech id: the last row of the audio table."""
        return self.num_audio_tokens - 1


class SliceConfig(_Section):
    max_slice_nums: int = 9
    patch_size: int = 14
    scale_resolution: int = 448


class MiniCPMOConfig(_Section):
    """The whole `config.json`: LLM keys at the top level plus the nested sections."""

    llm: LLMConfig
    vision: VisionConfig
    audio: AudioConfig
    tts: TTSConfig
    slice: SliceConfig
    query_num: int = 64
    audio_pool_step: int = 5
    audio_chunk_length: float = 1.0
    drop_vision_last_layer: bool = True
    vision_batch_size: int = 16
    use_image_id: bool = True
    slice_mode: bool = True
    stream_input: bool = False
    init_vision: bool = True
    init_audio: bool = True
    init_tts: bool = True
    raw: dict[str, Any] = Field(default_factory=dict, repr=False)

    @property
    def vision_layers_kept(self) -> int:
        n = self.vision.num_hidden_layers
        return n - 1 if self.drop_vision_last_layer else n

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiniCPMOConfig:
        top = {k: v for k, v in data.items() if not k.endswith("_config") and not k.startswith("_")}
        return cls(
            llm=LLMConfig(**top),
            vision=VisionConfig(**data.get("vision_config", {})),
            audio=AudioConfig(**data.get("audio_config", {})),
            tts=TTSConfig(**data.get("tts_config", {})),
            slice=SliceConfig(**data.get("slice_config", {})),
            **{k: v for k, v in top.items() if k in _TOP_LEVEL_KEYS},
            raw=data,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> MiniCPMOConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_dict(json.loads(path.read_text()))


_TOP_LEVEL_KEYS = {
    "query_num",
    "audio_pool_step",
    "audio_chunk_length",
    "drop_vision_last_layer",
    "vision_batch_size",
    "use_image_id",
    "slice_mode",
    "stream_input",
    "init_vision",
    "init_audio",
    "init_tts",
}


class PreprocessorConfig(_Section):
    """`preprocessor_config.json`: image slicing and audio pooling parameters."""

    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    use_image_id: bool = True
    image_feature_size: int = 64
    slice_mode: bool = True
    audio_pool_step: int = 5
    norm_mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    norm_std: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])

    @classmethod
    def from_file(cls, path: str | Path) -> PreprocessorConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text()))
