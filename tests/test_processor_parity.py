"""Processor parity with the official MiniCPMOProcessor outputs (a_processor, d_streaming prompts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from MiniCPMO45.audio.load import load_audio
from MiniCPMO45.audio.mel_stream import HalfDuplexStreamingMel
from MiniCPMO45.config import PreprocessorConfig
from MiniCPMO45.processor import (
    GENERATION_BOS_TTS,
    ImageProcessor,
    MiniCPMOProcessor,
    ProcessorError,
    flatten_messages,
    render_chat,
)
from MiniCPMO45.processor.chat_template import ChatFormatError

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def processor(tiny_fixture_dir: Path) -> MiniCPMOProcessor:
    return MiniCPMOProcessor.from_dir(tiny_fixture_dir / "model")


@pytest.fixture(scope="module")
def manifest(tiny_fixture_dir: Path) -> dict:
    return json.loads((tiny_fixture_dir / "manifest.json").read_text())


def _npz(fixture_dir: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(fixture_dir / "expected" / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def _chat_msgs(inputs: Path) -> list[dict]:
    image = Image.open(inputs / "image.png")
    audio = load_audio(inputs / "chat_audio.wav")
    return [{"role": "user", "content": [image, audio, "Describe the image and the sound."]}]


def test_a_processor_parity(processor: MiniCPMOProcessor, tiny_fixture_dir: Path, manifest: dict) -> None:
    a = _npz(tiny_fixture_dir, "a_processor")
    args = manifest["groups"]["a_processor"]["arrays"]["input_ids"]["args"]
    out = processor.chat_inputs(
        _chat_msgs(tiny_fixture_dir / "inputs"),
        max_slice_nums=args["max_slice_nums"],
        use_image_id=args["use_image_id"],
    )
    np.testing.assert_array_equal(out.input_ids.numpy(), a["input_ids"])
    np.testing.assert_array_equal(out.attention_mask.numpy(), a["attention_mask"])
    assert len(out.pixel_values) == 3
    for i, pv in enumerate(out.pixel_values):
        assert pv.shape == a[f"pixel_values_{i}"].shape
        np.testing.assert_allclose(pv.numpy(), a[f"pixel_values_{i}"], **TOL)
    np.testing.assert_array_equal(out.tgt_sizes.numpy(), a["tgt_sizes"])
    np.testing.assert_array_equal(out.image_bound.numpy(), a["image_bound"])
    assert out.audio_features.shape == a["audio_features"].shape
    np.testing.assert_allclose(out.audio_features.numpy(), a["audio_features"], **TOL)
    np.testing.assert_array_equal(out.audio_feature_lens.numpy(), a["audio_feature_lens"])
    np.testing.assert_array_equal(out.audio_bounds.numpy(), a["audio_bounds"])
    # every bound spans exactly <unk> ids
    unk = processor.tokenizer.special.unk
    for start, end in [*out.image_bound.tolist(), *out.audio_bounds.tolist()]:
        assert set(out.input_ids[0, start:end].tolist()) == {unk}


def test_chat_template_renders_fixture_prompts(manifest: dict, tiny_fixture_dir: Path) -> None:
    flat = flatten_messages(_chat_msgs(tiny_fixture_dir / "inputs"))
    assert flat.audio_parts == [0] and len(flat.images) == 1
    assert render_chat(flat.messages, use_tts_template=flat.has_audio) == manifest["chat_prompt_text"]
    tts = manifest["tts_chat_msgs"]
    msgs = [{"role": m["role"], "content": "\n".join(m["content"])} for m in tts]
    assert render_chat(msgs, add_generation_prompt=False) == manifest["tts_chat_prompt"]
    system = [{"role": "system", "content": "You are a helpful assistant."}]
    assert render_chat(system, add_generation_prompt=False) == manifest["streaming_prompts"][0]


def test_chat_template_options() -> None:
    user = [{"role": "user", "content": "hi"}]
    assert (
        render_chat(user, enable_thinking=True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(user).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_chat(user, use_tts_template=True).endswith("</think>\n\n<|tts_bos|>")
    assert GENERATION_BOS_TTS == "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n<|tts_bos|>"
    # assistant turns before the last user query lose their think block; later ones keep it
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nfirst"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second"},
    ]
    text = render_chat(msgs, add_generation_prompt=False)
    assert "<|im_start|>assistant\nfirst<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nsecond<|im_end|>\n")
    with pytest.raises(ChatFormatError):
        render_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatFormatError):
        flatten_messages([{"role": "assistant", "content": "x"}])


def test_half_duplex_prefills_match_d_streaming(
    processor: MiniCPMOProcessor, tiny_fixture_dir: Path, manifest: dict
) -> None:
    d = _npz(tiny_fixture_dir, "d_streaming")
    prompts = manifest["streaming_prompts"]
    system = processor(prompts[0])
    np.testing.assert_array_equal(system.input_ids.numpy(), d["prefill0_input_ids"])
    audio = load_audio(tiny_fixture_dir / "inputs" / "duplex_audio.wav")
    stream = HalfDuplexStreamingMel()
    for i in (1, 2, 3):
        segment = audio[(i - 1) * 16000 : i * 16000]
        out = processor(prompts[i], audios=[segment], streaming_mel=stream)
        np.testing.assert_array_equal(out.input_ids.numpy(), d[f"prefill{i}_input_ids"])
        np.testing.assert_allclose(out.audio_features.numpy(), d[f"prefill{i}_audio_features"], **TOL)
        assert out.audio_feature_lens.tolist() == [100]
        assert out.audio_bounds.shape == (1, 2)


def test_listen_is_stripped_and_truncation(processor: MiniCPMOProcessor) -> None:
    tok = processor.tokenizer
    out = processor("<|listen|>hello<|listen|> world")
    assert out.input_ids[0].tolist() == tok.encode("hello world")
    assert processor("hello world", max_length=1).input_ids.shape == (1, 1)


def test_stream_input_gives_one_audio_block_per_second(processor: MiniCPMOProcessor) -> None:
    audio = np.zeros(24000, dtype=np.float32)
    audio[::7] = 0.1
    msgs = [{"role": "user", "content": ["hi", audio]}]
    out = processor.chat_inputs(msgs, stream_input=True)
    assert out.audio_bounds.tolist() and [e - s for s, e in out.audio_bounds.tolist()] == [10, 5]
    assert "hi<|audio_start|>" in out.text  # items joined with "" in stream/omni mode
    plain = processor.chat_inputs(msgs)
    assert [e - s for s, e in plain.audio_bounds.tolist()] == [15] and "hi\n<|audio_start|>" in plain.text


def test_consecutive_audio_items_are_merged(processor: MiniCPMOProcessor) -> None:
    a, b = np.full(16000, 0.01, np.float32), np.full(8000, -0.01, np.float32)
    out = processor.chat_inputs([{"role": "user", "content": [a, b, "x"]}])
    assert out.audio_features.shape[0] == 1 and out.audio_feature_lens.tolist() == [150]
    assert [e - s for s, e in out.audio_bounds.tolist()] == [10, 5]  # placeholders stay per item
    separate = processor.chat_inputs(
        [{"role": "user", "content": [a, b]}], merge_audio_from_same_content=False
    )
    assert separate.audio_feature_lens.tolist() == [100, 50]


def test_marker_mismatch_is_an_error(processor: MiniCPMOProcessor) -> None:
    with pytest.raises(ProcessorError, match="image"):
        processor("<image>./</image>")
    with pytest.raises(ProcessorError, match="audio"):
        processor("text", audios=[np.zeros(16000, np.float32)])


def test_image_sizes_from_the_spec() -> None:
    """Spec §2.3 examples at the real preprocessor settings (448, patch 14)."""
    images = ImageProcessor(PreprocessorConfig())
    frame = Image.new("RGB", (640, 480), (10, 20, 30))
    one = images.preprocess(frame, max_slice_nums=1)
    assert one.grid is None and one.tgt_sizes.tolist() == [[28, 37]]
    assert one.pixel_values[0].shape == (3, 14, 28 * 37 * 14)
    wide = images.preprocess(Image.new("RGB", (1280, 720)), max_slice_nums=1)
    assert wide.tgt_sizes.tolist() == [[24, 43]]  # 602x336
    hd = images.preprocess(frame, max_slice_nums=2)
    assert hd.grid == (2, 1) and len(hd.pixel_values) == 3


def test_patch_layout() -> None:
    """View pixel (c, y, x) lands at [c, y % 14, (row * cols + col) * 14 + x % 14]."""
    images = ImageProcessor(PreprocessorConfig(scale_resolution=28, max_slice_nums=1))
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
    out = images.preprocess(Image.fromarray(arr))
    assert out.tgt_sizes.tolist() == [[2, 2]]
    pv = out.pixel_values[0]
    expected = (arr.astype(np.float32) / 255 - 0.5) / 0.5
    for c, y, x in [(0, 0, 0), (1, 3, 20), (2, 17, 5), (0, 27, 27)]:
        row, col = y // 14, x // 14
        assert pv[c, y % 14, (row * 2 + col) * 14 + x % 14] == pytest.approx(expected[y, x, c])
