"""Tokenizer parity: the fixture prompts tokenize to exactly the ids the official processor produced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from MiniCPMO45.tokenizer import REPLACEMENT_CHAR, MiniCPMOTokenizer, SpecialTokens, TokenizerError

AUDIO_MARK = "<audio>./</audio>"
IMAGE_MARK = "<image>./</image>"


@pytest.fixture(scope="module")
def tok(tiny_fixture_dir: Path) -> MiniCPMOTokenizer:
    return MiniCPMOTokenizer.from_dir(tiny_fixture_dir / "model")


@pytest.fixture(scope="module")
def manifest(tiny_fixture_dir: Path) -> dict:
    return json.loads((tiny_fixture_dir / "manifest.json").read_text())


def _npz(fixture_dir: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(fixture_dir / "expected" / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def test_special_ids_resolved_by_name(tok: MiniCPMOTokenizer, tiny_fixture_dir: Path) -> None:
    added = json.loads((tiny_fixture_dir / "model" / "added_tokens.json").read_text())
    sp = tok.special
    assert sp.im_start == added["<|im_start|>"] and sp.im_end == added["<|im_end|>"]
    assert sp.listen == added["<|listen|>"] and sp.tts_pad == added["<|tts_pad|>"]
    assert sp.unk == tok.token_to_id("<unk>")
    assert sp.pad == added["<|endoftext|>"]
    assert len(set(sp.as_dict().values())) == len(sp.as_dict())
    assert tok.vocab_size == max(added.values()) + 1
    config = json.loads((tiny_fixture_dir / "model" / "tokenizer_config.json").read_text())
    assert tok.bad_token_ids == config["bad_token_ids"] and len(tok.bad_token_ids) > 0


def test_chat_prompt_matches_a_processor_outside_placeholders(
    tok: MiniCPMOTokenizer, manifest: dict, tiny_fixture_dir: Path
) -> None:
    a = _npz(tiny_fixture_dir, "a_processor")
    ids = a["input_ids"][0].tolist()
    text = manifest["chat_prompt_text"]
    head, rest = text.split(IMAGE_MARK)
    between, tail = rest.split(AUDIO_MARK)
    (img_first, _), (_, img_last) = a["image_bound"][0], a["image_bound"][-1]
    aud_start, aud_end = a["audio_bounds"][0]
    # head: "<|im_start|>user\n", then "<image_id>0</image_id>" just before <image>
    head_ids = tok.encode(head)
    assert ids[: len(head_ids)] == head_ids
    id_ids = tok.encode("<image_id>0</image_id>")
    assert ids[len(head_ids) : len(head_ids) + len(id_ids)] == id_ids
    # between the last image slice and the audio block, then everything after the audio block
    assert ids[img_last + 1 : aud_start - 1] == tok.encode(between)
    assert ids[aud_end + 1 :] == tok.encode(tail)
    assert ids[aud_start - 1] == tok.special.audio_start and ids[aud_end] == tok.special.audio_end
    assert ids[img_first - 1] == tok.special.image_start


def test_streaming_prompts_match_d_streaming(
    tok: MiniCPMOTokenizer, manifest: dict, tiny_fixture_dir: Path
) -> None:
    d = _npz(tiny_fixture_dir, "d_streaming")
    prompts = manifest["streaming_prompts"]
    assert tok.encode(prompts[0]) == d["prefill0_input_ids"][0].tolist()
    block = "<|audio_start|>" + "<unk>" * 10 + "<|audio_end|>"  # 1 s of audio = 10 placeholders
    for i in (1, 2, 3):
        assert tok.encode(prompts[i].replace(AUDIO_MARK, block)) == d[f"prefill{i}_input_ids"][0].tolist()


def test_duplex_prepare_pieces_match_kv_length(
    tok: MiniCPMOTokenizer, manifest: dict, tiny_fixture_dir: Path
) -> None:
    e = _npz(tiny_fixture_dir, "e_duplex")
    prefix, suffix = manifest["duplex_prepare_prompt"].split("[音频嵌入]")
    assert prefix.endswith("<|audio_start|>") and suffix == "<|audio_end|><|im_end|>"
    pre, suf = tok.encode(prefix), tok.encode(suffix)
    assert pre[-1] == tok.special.audio_start and suf == [tok.special.audio_end, tok.special.im_end]
    ref_audio_tokens = 10  # 1 s reference audio
    assert len(pre) + ref_audio_tokens + len(suf) == int(e["kv_len_after_prepare"])


def test_tts_chat_prompt_text_span(tok: MiniCPMOTokenizer, manifest: dict, tiny_fixture_dir: Path) -> None:
    ids = tok.encode(manifest["tts_chat_prompt"])
    sp = tok.special
    assert ids[-2:] == [sp.im_end, tok.encode("\n")[0]]
    spoken = ids[ids.index(sp.tts_bos) + 1 : ids.index(sp.tts_eos)]
    assert tok.decode(spoken) == "Hello there, nice to meet you."
    f = _npz(tiny_fixture_dir, "f_tts")
    # one TTS condition row per spoken token, plus text_eos and audio_bos
    assert len(spoken) + 2 == f["tts_inputs_embeds"].shape[0]


def test_decode_generated_ids(tok: MiniCPMOTokenizer, manifest: dict, tiny_fixture_dir: Path) -> None:
    d = _npz(tiny_fixture_dir, "d_streaming")
    assert tok.decode(d["generated_ids"].tolist()) == manifest["streaming_text"]
    ids = tok.encode("<|tts_bos|>hi<|tts_eos|>")
    assert tok.decode(ids) == "<|tts_bos|>hi<|tts_eos|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_listen_token_and_no_bos(tok: MiniCPMOTokenizer) -> None:
    ids = tok.encode("<|listen|>hello")
    assert ids[0] == tok.special.listen and tok.special.im_start not in ids


def test_incremental_detokenizer_holds_partial_characters(tok: MiniCPMOTokenizer) -> None:
    text = "缟 ผู้น 😀 tail 龘"
    ids = tok.encode(text)
    # this text must really contain a token boundary inside a character, or the test proves nothing
    assert any(tok.decode(ids[:k]).endswith(REPLACEMENT_CHAR) for k in range(1, len(ids)))
    det = tok.detokenizer(skip_special_tokens=False)
    deltas = [det.push(i) for i in ids]
    deltas.append(det.flush())
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "".join(deltas) == text == det.text


def test_incremental_detokenizer_skips_specials(tok: MiniCPMOTokenizer) -> None:
    det = tok.detokenizer(skip_special_tokens=True)
    out = det.push(tok.encode("Hi<|chunk_eos|> there"))
    assert out + det.flush() == "Hi there"


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError):
        MiniCPMOTokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="vocab.json"):
        MiniCPMOTokenizer.from_dir(tmp_path)


def test_missing_special_token_is_named() -> None:
    with pytest.raises(TokenizerError, match="<unit>"):
        SpecialTokens.resolve({"<|im_start|>": 1})


def test_tokenizer_json_is_accepted(tok: MiniCPMOTokenizer, tmp_path: Path, tiny_fixture_dir: Path) -> None:
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_bytes(
        (tiny_fixture_dir / "model" / "tokenizer_config.json").read_bytes()
    )
    again = MiniCPMOTokenizer.from_dir(tmp_path)
    text = "<|im_start|>user\nDescribe 激起缟<|im_end|>\n"
    assert again.encode(text) == tok.encode(text)
    assert again.special == tok.special


def test_display_text_leaves_out_every_control_token(tok: MiniCPMOTokenizer) -> None:
    """Added tokens that are not marked special (`<tool_call>`) are control tokens too: never shown."""
    ids = tok.encode("a<tool_call>b</tool_call>c<|timbre_27|>d<|spk_eos|>")
    assert tok.decode(ids, skip_special_tokens=True) != "abcd"  # the plain decode keeps `<tool_call>`
    assert tok.display_text(ids) == "abcd"
    det = tok.display_detokenizer()
    assert "".join(det.push(i) for i in ids) + det.flush() == "abcd"
