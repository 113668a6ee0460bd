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
    for codes in tts_codes:                            # any number of codes per call
        for pcm in model.push_codes(turn, codes, end_of_turn=False):
            send(pcm)                                  # np.float32, 24 kHz, mono
    tail = model.push_codes(turn, [], end_of_turn=True)  # flushes the look-ahead and the vocoder delay

Windowing (official): rule "turn" sends 28 tokens (25 new + 3 look-ahead) whenever 28 are buffered and
drops 25; rule "duplex" sends min(28, n) tokens while n >= 8 and drops min(25, n - 3). End of turn sends
the rest with `last_chunk`. `iter_push_codes` yields each window's audio as soon as it is computed, so the
first PCM leaves after the first window (28 tokens, or 8 in duplex). The first non-empty piece of a turn
starts with 3840 zero samples (the vocoder's 8-frame delay); empty pieces are not returned.
`pcm16_roundtrip` reproduces the duplex path's int16 conversion when bit-level parity with it matters.

Whole utterance (the official `__call__`; flow over [prompt ; tokens], then the original HiFT)::

    wav = model.synthesize(tokens, voice)

Checkpoint layouts: see `assets.detect_layout`. The new layout streams with the causal HiFT
(`streaming_vocoder`); the old one (hift.pt = original HiFT, no config.yaml) streams with the original HiFT,
an 8-frame mel cache, a 3840-sample source cache and a Hamming cross-fade (`crossfade_vocoder`).
"""

from .assets import AssetLayout, AssetLayoutError, detect_layout, read_weights
from .model import PromptCache, Token2Wav, TurnState, fit_prompt_mel, pcm16_roundtrip

__all__ = [
    "AssetLayout",
    "AssetLayoutError",
    "PromptCache",
    "Token2Wav",
    "TurnState",
    "detect_layout",
    "fit_prompt_mel",
    "pcm16_roundtrip",
    "read_weights",
]
