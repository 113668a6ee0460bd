"""MiniCPM-o 4.5's vocoder ("token2wav", stepaudio2 in minicpmo-utils 1.0.7) in plain PyTorch.

25 Hz speech tokens -> flow matching (conformer encoder + DiT, 5 Euler steps, CFG 0.7) -> 50 Hz log-mel
-> HiFT -> 24 kHz float32 audio. Facts and fixtures: `spec/token2wav.md`, `fixtures/token2wav-tiny/`.

Streaming session API (what the engine uses)
--------------------------------------------
One shared, read-only model per worker::

    model = Token2Wav.from_assets("<model_dir>/assets/token2wav", n_timesteps=5, device="cuda")

Per reference voice (cache it; `prompt_frontend.PromptFrontend` turns a WAV into these three inputs)::

    voice = model.prepare_prompt(prompt_tokens, prompt_mel, spk_embedding)   # -> PromptCache

Per spoken turn (the voice's flow caches are cloned; the token buffer starts with 3 silence tokens 4218)::

    turn = model.start_turn(voice, rule="duplex")      # or rule="turn"
    for codes, unit_ended_early in tts_units:          # any number of codes per call
        for pcm in model.push_codes(turn, codes, flush=unit_ended_early):
            send(pcm)                                  # np.float32, 24 kHz, mono
    tail = model.push_codes(turn, [], end_of_turn=True)  # flushes the look-ahead and the vocoder delay

Windowing (official): a window of 28 tokens (25 new + 3 look-ahead) goes out whenever 28 are buffered, and
25 are dropped. With rule "duplex" and `flush=True` (the official duplex path flushes when a unit's codes
carry a chunk terminator, or on force-flush) shorter windows go out too: min(28, n) tokens while n >= 8,
dropping min(25, n - 3). End of turn sends the rest with `last_chunk`. `iter_push_codes` yields each
window's audio as soon as it is computed, so the first PCM leaves right after the first window. The first
non-empty piece of a turn starts with 3840 zero samples (the vocoder's 8-frame delay); empty pieces are not
returned. `duplex_unit_audio` applies the duplex path's post-processing to one unit's pieces (int16 round
trip, `pcm16_roundtrip`, and left padding of non-final units to 1 s).

Many sessions per worker: `push_codes_batch([PushRequest(turn, codes, end_of_turn, flush), ...])` runs
the turns' windows round by round: each round takes every turn's next due window, or its last chunk once
no window is due. With `use_graphs=True` a round's windows form one flow batch whatever their size, kind,
voice and cache length; the plain path groups equal shapes. The streaming vocoder runs one F0 and one
decoder batch per 16-frame block round (rows right-padded and cropped; final calls batch by length, or on
the padded path at one width, `StreamingVocoder.final_width`).

Speed (inference only): `from_assets(..., fold_weights=True)` (default) stores the weight-normed convs'
g * v / ||v|| once at load (`fold.py`). `use_graphs=True` (default None = off until measured) runs each
round through `flow_graphs.py`: tokens padded to 4/8/16/25/28 output tokens, caches to the round's largest
prompt + 100 frames (rounded to 16), padded keys masked per row, positions and noise offsets per row, rows
padded to buckets 1..64; and the causal HiFT's decoder network up to the ISTFT on padded batches
(`padded_graphs.py`). On CUDA each shape seen twice is captured as a CUDA graph and replayed; all graphs of
one cache size share one set of static inputs sized for the largest bucket, within
`model.flow_graphs.max_bytes` (16 GiB by default; a server worker sets `model.vocoder_graph_gib`, 1 GiB: at the real
size 64 rows took 264 MiB on the H100).
Same audio as the plain path up to float rounding; `bench/vocoder_gpu.py` times both (`--mixed`: sessions
at mixed points of their turns).

Whole utterance (the official `__call__`; flow over [prompt ; tokens], then the original HiFT)::

    wav = model.synthesize(tokens, voice)

Checkpoint layouts: see `assets.detect_layout`. The new layout streams with the causal HiFT
(`streaming_vocoder`); the old one (hift.pt = original HiFT, no config.yaml) streams with the original HiFT,
an 8-frame mel cache, a 3840-sample source cache and a Hamming cross-fade (`crossfade_vocoder`).
"""

from .assets import AssetLayout, AssetLayoutError, detect_layout, read_weights
from .model import (
    PromptCache,
    PushRequest,
    Token2Wav,
    TurnState,
    duplex_unit_audio,
    fit_prompt_mel,
    pcm16_roundtrip,
)

__all__ = [
    "AssetLayout",
    "AssetLayoutError",
    "PromptCache",
    "PushRequest",
    "Token2Wav",
    "TurnState",
    "detect_layout",
    "duplex_unit_audio",
    "fit_prompt_mel",
    "pcm16_roundtrip",
    "read_weights",
]
