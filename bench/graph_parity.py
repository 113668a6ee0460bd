"""The server's graph backend against the golden fixtures (issue 18: "run once on the device").

    python bench/graph_parity.py [--device cuda] [--dtypes float32,bfloat16] --out DIR

Runs the tiny fixture model through what the server runs: the duplex tick (`DuplexSession.tick` over `DuplexBatcher` and its static steps,
CUDA graphs and fused kernels on a GPU; eager on the CPU) for the golden duplex session (6 omni units, forced
listens as recorded), and the vocoder (`Token2Wav` with its flow graphs) for the golden stream. Per dtype it
reports what matches the official outputs: the decisions, decoded ids, texts and the whole token history exactly,
the TTS conditions and the vocoder's audio as the largest absolute difference. In float32 the ids must be exact
and the conditions within 1e-4 (the audio within the chain tolerance of `tests/test_token2wav_stream.py`); in
bfloat16 (the vocoder's flow then in float16, as the server runs it) the figures are measured, not asserted. Writes `DIR/graph_parity.json` and prints a markdown table.
Not a test (the test suite runs it on the CPU once, `tests/test_graph_parity.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COND_TOL = 1e-4
AUDIO_TOL = 5e-4  # flow -> HiFT chain in float32, see tests/test_token2wav_stream.py


@dataclass
class DuplexParity:
    units: int = 0
    decisions_equal: int = 0
    texts_equal: int = 0
    decoded_ids_equal: bool = False
    total_ids_equal: bool = False
    total_ids_common_prefix: int = 0
    total_ids_len: int = 0
    kv_equal: int = 0
    condition_max_abs: float = 0.0  # over the conditions of units that spoke the same number of tokens
    conditions_compared: int = 0
    conditions_other_length: int = 0  # units whose condition differs in length (their text differs)
    seconds: float = 0.0


@dataclass
class VocoderParity:
    windows: int = 0
    lengths_equal: bool = False
    audio_max_abs: float = 0.0
    audio_snr_db: float = 0.0  # the golden audio's power over the difference's
    seconds: float = 0.0


@dataclass
class Row:
    device: str
    dtype: str
    graphs: bool
    duplex: DuplexParity = field(default_factory=DuplexParity)
    vocoder: VocoderParity = field(default_factory=VocoderParity)
    ok: bool = False


def duplex_parity(
    model_dir: Path, fixture: Path, device: str, dtype: torch.dtype
) -> tuple[DuplexParity, bool]:
    from MiniCPMO45.engine.batcher import DuplexBatcher
    from MiniCPMO45.engine.core import Engine
    from MiniCPMO45.engine.duplex_session import DuplexSession
    from tests.engine_fixtures import duplex_fixture, fixture_duplex_config, load_npz

    fx = duplex_fixture(fixture)
    golden = load_npz(fixture, "e_duplex")
    cfg = fixture_duplex_config(fx.manifest)
    engine = Engine.from_pretrained(model_dir, dtype=dtype, device=device, max_sessions=8, max_len=512)
    batcher = DuplexBatcher(engine, use_graphs=None, fused=device != "cpu")
    graphs = bool(batcher.llm.use_graphs)
    call = DuplexSession(batcher, unit_budget=172)
    call.prepare(fx.prompt, fx.ref_audio, cfg)
    session = call.session
    out = DuplexParity()
    t0 = time.perf_counter()
    decoded: list[int] = []
    speaking = 0
    for unit, rec in zip(fx.units, fx.steps, strict=True):
        [done] = DuplexSession.tick([call], [unit], [rec["force_listen_override"]])
        result = done.output.result
        out.units += 1
        out.decisions_equal += result.is_listen == rec["is_listen"]
        out.texts_equal += result.text == rec["text"]
        out.kv_equal += result.kv_length + 2 == rec["kv_len_after_finalize"]
        decoded += result.decoded_ids
        if not result.is_listen and not rec["is_listen"]:
            cond = batcher.conditions([result])[0].detach().float().cpu().numpy()
            want = golden[f"tts{speaking}_condition"]
            if cond.shape == want.shape:
                out.condition_max_abs = max(out.condition_max_abs, float(np.abs(cond - want).max()))
                out.conditions_compared += 1
            else:
                out.conditions_other_length += 1
        speaking += not rec["is_listen"]
    batcher.finalize([session])
    if device != "cpu":
        torch.cuda.synchronize()
    out.seconds = time.perf_counter() - t0
    want_ids = golden["total_ids"].tolist()
    got_ids = session.duplex.total_ids
    out.decoded_ids_equal = decoded == golden["decode_out_ids"].tolist()
    out.total_ids_equal = got_ids == want_ids
    out.total_ids_len = len(want_ids)
    out.total_ids_common_prefix = next(
        (i for i, (a, b) in enumerate(zip(got_ids, want_ids, strict=False)) if a != b),
        min(len(got_ids), len(want_ids)),
    )
    return out, graphs


def vocoder_parity(fixture: Path, device: str, dtype: torch.dtype) -> VocoderParity:
    from MiniCPMO45.token2wav import Token2Wav
    from tests.token2wav_assets import build_asset_folder

    inputs = np.load(fixture / "inputs" / "inputs.npz")
    stream = np.load(fixture / "expected" / "stream.npz")
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_asset_folder(fixture, Path(tmp) / "token2wav")
        model = Token2Wav.from_assets(
            folder,
            n_timesteps=5,
            flow_noise=torch.from_numpy(inputs["rand_noise_prefix"]),
            source_noise_table=torch.from_numpy(stream["sine_noise_table_prefix"]),
            device=device,
            use_graphs=device != "cpu",
            # the server's vocoder runs its flow in float16 on a GPU (`vocoder_dtype`), float32 on the CPU
            flow_dtype=torch.float32 if dtype == torch.float32 else torch.float16,
        )
        voice = model.prepare_prompt(
            inputs["prompt_tokens"][0], inputs["prompt_mel"], inputs["spk_embedding"]
        )
        tokens = [int(t) for t in inputs["gen_tokens"]]
        out = VocoderParity()
        t0 = time.perf_counter()
        turn = model.start_turn(voice, rule="turn")
        pieces = model.push_codes(turn, tokens, end_of_turn=False)
        pieces += model.push_codes(turn, [], end_of_turn=True)
        out.seconds = time.perf_counter() - t0
    want = [stream[f"call{i}_wav"][0] for i in range(len(pieces))]
    out.windows = len(pieces)
    out.lengths_equal = [p.shape[0] for p in pieces] == [w.shape[0] for w in want]
    if out.lengths_equal:
        out.audio_max_abs = max(float(np.abs(p - w).max()) for p, w in zip(pieces, want, strict=True))
        got_all, want_all = np.concatenate(pieces), np.concatenate(want)
        noise = float(np.mean((got_all - want_all) ** 2))
        out.audio_snr_db = 10 * np.log10(float(np.mean(want_all**2)) / max(noise, 1e-20))
    else:
        out.audio_max_abs = float("inf")
    return out


def run(device: str, dtypes: list[str], out_dir: Path) -> list[Row]:
    from tests.conftest import fixtures_root, prepare_tiny_model

    fixtures = fixtures_root()
    model_dir = prepare_tiny_model(REPO / ".cache" / "fixtures")
    rows = []
    for name in dtypes:
        dtype = getattr(torch, name)
        duplex, graphs = duplex_parity(model_dir, fixtures / "minicpmo45-tiny", device, dtype)
        row = Row(device, name, graphs, duplex, vocoder_parity(fixtures / "token2wav-tiny", device, dtype))
        d, v = row.duplex, row.vocoder
        row.ok = (
            d.total_ids_equal
            and d.decoded_ids_equal
            and d.decisions_equal == d.units
            and d.condition_max_abs <= COND_TOL
            and d.conditions_other_length == 0
            and v.lengths_equal
            and v.audio_max_abs <= AUDIO_TOL
        )
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(0) if device != "cpu" else "cpu", "torch": torch.__version__}
    (out_dir / "graph_parity.json").write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    print(table(rows, meta["device"]))
    return rows


def table(rows: list[Row], device: str) -> str:
    lines = [
        f"Device: {device}.",
        "",
        "| dtype | graphs | decisions | texts | decoded ids | token history (common prefix) | KV | TTS condition max abs | "
        "audio max abs (SNR) | parity |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        d, v = r.duplex, r.vocoder
        lines.append(
            f"| {r.dtype} | {'yes' if r.graphs else 'no'} | {d.decisions_equal}/{d.units} | {d.texts_equal}/{d.units} | "
            f"{'equal' if d.decoded_ids_equal else 'differ'} | {d.total_ids_common_prefix}/{d.total_ids_len} | "
            f"{d.kv_equal}/{d.units} | {d.condition_max_abs:.2e} ({d.conditions_compared} of "
            f"{d.conditions_compared + d.conditions_other_length}) | {v.audio_max_abs:.2e} ({v.audio_snr_db:.0f} dB) | "
            f"{'within 1e-4 / 5e-4' if r.ok else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    rows = run(args.device, args.dtypes.split(","), args.out)
    return 0 if rows[0].ok or rows[0].dtype != "float32" else 1


if __name__ == "__main__":
    sys.exit(main())
