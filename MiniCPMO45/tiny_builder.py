"""The embedded default model: a tiny random-weight MiniCPM-o 4.5 in the official checkpoint format.

`build_tiny_model(dest)` writes config.json, generation_config.json, preprocessor_config.json, model.safetensors
(bf16, seeded) and a tokenizer trained here (a small byte-level BPE over a built-in English + Chinese text, plus
every special token of the real model), so the whole engine runs on the CPU with no download. The output is
deterministic: the same seed gives the same bytes. `ensure_tiny_model(cache_dir)` builds once and reuses the
folder while its marker matches this builder's content hash.

Vocoder assets are not written here; the vocoder's owner adds an `assets/token2wav/` step by passing it in
`extra_steps` (each step gets the folder and the seed and is part of the cache key through `extra_key`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from MiniCPMO45.config import MiniCPMOConfig
from MiniCPMO45.tensor_names import official_tensor_shapes
from MiniCPMO45.tokenizer import SPECIAL_TOKEN_TEXT, qwen2_pipeline

__all__ = ["BUILDER_VERSION", "build_tiny_model", "ensure_tiny_model", "official_tensor_shapes"]

BUILDER_VERSION = "tiny-1"
MARKER = ".tiny-builder"
BPE_VOCAB_SIZE = 1200

# Added tokens in the real model's order. Those the real tokenizer does not treat as special (they survive
# skip_special_tokens) are marked False.
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
    *[
        (f"<{tag}>", True)
        for name in (
            "image",
            "ref",
            "box",
            "quad",
            "point",
            "slice",
            "image_id",
            "unit",
            "answer",
            "focus",
            "line",
            "perception",
            "source_image",
            "image_save_to",
        )
        for tag in (name, f"/{name}")
    ],
    *[
        (f"<|{name}|>", True)
        for name in (
            "audio_start",
            "audio",
            "audio_end",
            "spk_bos",
            "spk",
            "spk_eos",
            "tts_bos",
            "tts_eos",
            "listen",
            "speak",
            "interrupt",
            "vad_start",
            "vad_end",
            "emotion_start",
            "emotion_end",
            "speed_start",
            "speed_end",
            "pitch_start",
            "pitch_end",
            "turn_bos",
            "turn_eos",
            "chunk_eos",
            "chunk_bos",
            "chunk_tts_bos",
            "chunk_tts_eos",
            "tts_pad",
        )
    ],
    *[(f"<|timbre_{i}|>", True) for i in range(7, 32)],
    ("<unk>", True),
]

# Training text for the tiny BPE. Any text works; this one covers chat words and common Chinese characters.
CORPUS = """\
You are a helpful assistant. Please answer the question about the image and the sound.
Hello there, nice to meet you. How are you today? I am fine, thank you, and you?
The weather is nice today. It is sunny and warm, with a light wind from the west.
Describe the image in detail. What do you hear in this audio clip? Tell me a short story.
The quick brown fox jumps over the lazy dog. A cat sat on the mat near the window.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 100 2026.
Streaming omni conversation: the model listens, thinks, and speaks in real time.
Use the voice in the audio prompt to synthesize new content. Speak clearly and slowly.
Let me think about that. Yes, that sounds good. No, I do not think so. Maybe later.
Good morning! Good evening! See you tomorrow. Have a great day, my friend.
你好，很高兴认识你。今天天气很好，阳光明媚。请描述这张图片和这段声音。
我是一个乐于助人的助手。你今天过得怎么样？我很好，谢谢你。
我们一起去公园散步吧。小猫坐在窗户旁边的垫子上。
请用音频中的声音说出新的内容。请说得清楚一点，慢一点。
一二三四五六七八九十。明天见！祝你有美好的一天，我的朋友。
这是一个实时的语音和视频对话系统，模型可以一边听一边说。
"""

# Characters the tiny tokenizer bans in duplex / TTS decoding, standing in for the real `bad_token_ids`.
BAD_TEXT = ["(", ")", "[", "]", "{", "}", "*", "#", "@", "$", "&", "/"]


def _train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE (Qwen2 pre-tokenizer) trained on CORPUS: (vocab, merges)."""
    tokenizer = qwen2_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    # Each line twice, once with a trailing newline, so that "\n" pieces and sentence ends are learnt.
    tokenizer.train_from_iterator([*lines, *(line + "\n" for line in lines)], trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = {str(k): int(v) for k, v in model["vocab"].items()}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model["merges"]]
    return vocab, [(a, b) for a, b in merges]


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def write_tokenizer(dest: Path) -> dict[str, int]:
    """Write vocab.json, merges.txt, added_tokens.json, tokenizer_config.json and special_tokens_map.json.

    Returns the id of every added token.
    """
    vocab, merges = _train_bpe()
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    _write_json(dest / "vocab.json", ordered)
    (dest / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    next_id = len(ordered)
    added = {text: next_id + i for i, (text, _) in enumerate(ADDED_TOKENS)}
    _write_json(dest / "added_tokens.json", dict(sorted(added.items())))

    missing = [t for t in SPECIAL_TOKEN_TEXT.values() if t not in added]
    if missing:
        raise AssertionError(f"tiny tokenizer lacks {missing}")
    decoder = {
        str(added[text]): {
            "content": text,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for text, special in ADDED_TOKENS
    }
    # printable ASCII characters are their own byte-level symbols
    bad = sorted(ordered[ch] for ch in BAD_TEXT if ch in ordered)
    specials = [text for text, special in ADDED_TOKENS if special]
    additional = [t for t in specials if t not in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
        "bos_token": "<|im_start|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "MiniCPMOTokenizerFast",
        "unk_token": "<unk>",
        "bad_token_ids": bad,
    }
    _write_json(dest / "tokenizer_config.json", config)
    _write_json(
        dest / "special_tokens_map.json",
        {
            "additional_special_tokens": additional,
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<unk>",
        },
    )
    return added


def tiny_config(vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    """A complete config.json for the tiny model (official layout; LLM hidden 128 is the resampler minimum)."""
    return {
        "architectures": ["MiniCPMO"],
        "model_type": "minicpmo",
        "torch_dtype": "bfloat16",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "use_sliding_window": False,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "initializer_range": 0.02,
        "query_num": 4,
        "image_size": 112,
        "patch_size": 14,
        "drop_vision_last_layer": True,
        "batch_vision_input": True,
        "vision_batch_size": 16,
        "use_image_id": True,
        "slice_mode": True,
        "audio_pool_step": 5,
        "audio_chunk_length": 1.0,
        "stream_input": False,
        "listen_speak_type": "asr",
        "init_vision": True,
        "init_audio": True,
        "init_tts": True,
        "slice_config": {
            "model_type": "minicpmv",
            "max_slice_nums": 2,
            "patch_size": 14,
            "scale_resolution": 112,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_channels": 3,
            "patch_size": 14,
            "image_size": 980,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "attention_dropout": 0.0,
        },
        "audio_config": {
            "model_type": "whisper",
            "d_model": 32,
            "encoder_layers": 2,
            "num_hidden_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 128,
            "decoder_layers": 1,
            "decoder_attention_heads": 2,
            "decoder_ffn_dim": 128,
            "num_mel_bins": 80,
            "max_source_positions": 1500,
            "max_target_positions": 448,
            "activation_function": "gelu",
            "scale_embedding": False,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
        },
        "tts_config": {
            "model_type": "minicpmtts",
            "backbone_model": "llama",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "llm_dim": 128,
            "llm_hidden_size": 128,
            "num_text_tokens": vocab_size,
            "num_audio_tokens": 6562,
            "num_vq": 1,
            "audio_bos_token_id": ids["<|tts_bos|>"],
            "text_eos_token_id": ids["<|tts_eos|>"],
            "condition_type": "hidden_text_merge",
            "projector_type": "mlp",
            "normalize_projected_hidden": True,
            "attention_type": "sliding_recompute",
            "window_size": 2,
            "recomputed_chunks": 1,
            "streaming": True,
            "streaming_audio_chunk_size": 50,
            "streaming_text_reserved_len": 300,
            "audio_tokenizer_type": "s3tokenizer_step_audio",
            "audio_tokenizer_sample_rate": 24000,
            "use_llm_hidden_state": False,
            "use_text": True,
        },
    }


def preprocessor_config(config: dict[str, Any]) -> dict[str, Any]:
    slices = config["slice_config"]
    return {
        "image_processor_type": "MiniCPMVImageProcessor",
        "feature_extractor_type": "MiniCPMAAudioProcessor",
        "processor_class": "MiniCPMOProcessor",
        "max_slice_nums": slices["max_slice_nums"],
        "scale_resolution": slices["scale_resolution"],
        "patch_size": slices["patch_size"],
        "use_image_id": True,
        "image_feature_size": config["query_num"],
        "im_start": "<image>",
        "im_end": "</image>",
        "slice_start": "<slice>",
        "slice_end": "</slice>",
        "unk": "<unk>",
        "im_id_start": "<image_id>",
        "im_id_end": "</image_id>",
        "slice_mode": True,
        "audio_pool_step": config["audio_pool_step"],
        "norm_mean": [0.5, 0.5, 0.5],
        "norm_std": [0.5, 0.5, 0.5],
        "version": 4.5,
    }


def generation_config(ids: dict[str, int]) -> dict[str, Any]:
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
    }


def _init_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded values by role: norms 1, norm biases 0, biases and embeddings N(0, 0.02), matrices
    N(0, min(0.1, fan_in^-0.5)). Each tensor has its own generator, so names do not shift each other."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(k in name for k in ("norm", "ln_q", "ln_kv", "ln_post"))
    if name == "tts.model.embed_tokens.weight":
        return torch.zeros(shape)  # present in the official format, never used
    if is_norm and leaf == "weight":
        return torch.ones(shape)
    if is_norm and leaf == "bias":
        return torch.zeros(shape)
    if name.endswith("parametrizations.weight.original0"):
        return torch.ones(shape)  # weight-norm magnitude
    if (
        len(shape) == 1
        or "embed" in name
        or name.endswith(("query", "emb_text.weight"))
        or ".emb_code." in name
    ):
        return torch.randn(shape, generator=gen) * 0.02
    fan_in = 1
    for n in shape[1:]:
        fan_in *= n
    return torch.randn(shape, generator=gen) * min(0.1, fan_in**-0.5)


def write_weights(dest: Path, config: MiniCPMOConfig, seed: int) -> None:
    tensors = {
        name: _init_tensor(name, shape, seed).to(torch.bfloat16).contiguous()
        for name, shape in sorted(official_tensor_shapes(config).items())
    }
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})


ExtraStep = Callable[[Path, int], None]


def build_tiny_model(dest: str | Path, seed: int = 0, extra_steps: Sequence[ExtraStep] = ()) -> Path:
    """Write the tiny model folder at `dest` (created; existing files are overwritten) and return it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(dest)
    vocab_size = max(ids.values()) + 1
    config = tiny_config(vocab_size, ids)
    _write_json(dest / "config.json", config)
    _write_json(dest / "generation_config.json", generation_config(ids))
    _write_json(dest / "preprocessor_config.json", preprocessor_config(config))
    write_weights(dest, MiniCPMOConfig.from_dict(config), seed)
    for step in extra_steps:
        step(dest, seed)
    return dest


def builder_hash(seed: int, extra_key: str = "") -> str:
    """Content hash of this builder (its source and version), the seed and any extra steps' key."""
    source = Path(__file__).read_bytes()
    names = (Path(__file__).parent / "tensor_names.py").read_bytes()
    h = hashlib.sha256()
    for part in (BUILDER_VERSION.encode(), source, names, str(seed).encode(), extra_key.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def ensure_tiny_model(
    cache_dir: str | Path, seed: int = 0, extra_steps: Sequence[ExtraStep] = (), extra_key: str = ""
) -> Path:
    """The tiny model folder under `cache_dir`, built on first use and rebuilt when the builder changes."""
    cache_dir = Path(cache_dir)
    dest = cache_dir / "minicpmo45-tiny-random"
    wanted = builder_hash(seed, extra_key)
    marker = dest / MARKER
    if marker.is_file() and marker.read_text().strip() == wanted:
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=cache_dir))
    try:
        build_tiny_model(staging, seed, extra_steps)
        (staging / MARKER).write_text(wanted + "\n")
        old = None
        if dest.exists():
            old = cache_dir / f".tiny-old-{os.getpid()}"
            dest.rename(old)
        try:
            staging.rename(dest)
        except OSError:
            # another process finished first; use its folder if it is current
            if not (marker.is_file() and marker.read_text().strip() == wanted):
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest
