"""Per-session TTS wrappers the tests use as oracles (the server draws a duplex unit's codes through
`MiniCPMO45.engine.static_tts`, and turn-based speech through `MiniCPMO45.modules.tts_streamer`): one duplex
unit for one session (`generate_chunk`) or a batch with the unit rules (`speak_units`), teacher forcing
(`teacher_force_chunk`), and the official non-streaming `generate`. All are `MiniCPMTTS.generate_chunks`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from MiniCPMO45.modules.tts import DUPLEX_MAX_DRAWS, ChunkResult, MiniCPMTTS, TTSSession
from MiniCPMO45.modules.tts_sampling import DUPLEX_SAMPLING, TURN_SAMPLING, CodeSampling


def duplex_min_new(session: TTSSession, end_of_turn: bool) -> int:
    """Draws before EOS is allowed in a duplex unit: none at a turn's first unit or its last, else all 26."""
    return 0 if session.length == 0 or end_of_turn else DUPLEX_MAX_DRAWS


def generate_chunk(
    tts: MiniCPMTTS,
    session: TTSSession,
    condition: torch.Tensor,
    min_new: int = DUPLEX_MAX_DRAWS,
    max_new: int = DUPLEX_MAX_DRAWS,
    temperature: float = 0.8,
    rep_penalty: float = 1.05,
    window: int = 16,
) -> torch.Tensor:
    """One duplex unit for one session: the codes to play (25 mid-turn; fewer if EOS was allowed and drawn).

    Pass min_new=0 at the first unit of a turn and when the turn ends (§3.3.3). The cache and position carry
    on to the next call; call `end_turn` when the turn is over.
    """
    sampling = CodeSampling(temperature=temperature, repetition_penalty=rep_penalty, window=window)
    result = tts.generate_chunks([session], [condition], min_new=min_new, max_new=max_new, sampling=sampling)
    return result[0].codes


def speak_units(
    tts: MiniCPMTTS,
    sessions: Sequence[TTSSession],
    conditions: Sequence[torch.Tensor],
    end_of_turn: Sequence[bool],
    sampling: CodeSampling = DUPLEX_SAMPLING,
) -> list[ChunkResult]:
    """One speaking duplex unit for each session, batched, with the official rules of §3.3.3.

    Up to 26 draws and 25 codes; EOS may stop a unit early only at the first unit of a turn or when the turn
    ends; a session whose turn ended is reset afterwards. (A forced listen in the middle of a turn does not
    end the TTS turn in the official demo: pass end_of_turn=False there and do not call `end_turn`.)
    """
    if len(end_of_turn) != len(sessions):
        raise ValueError(f"{len(sessions)} sessions but {len(end_of_turn)} end_of_turn flags")
    mins = [duplex_min_new(s, eot) for s, eot in zip(sessions, end_of_turn, strict=True)]
    results = tts.generate_chunks(
        sessions, conditions, min_new=mins, max_new=DUPLEX_MAX_DRAWS, sampling=sampling
    )
    for s, eot in zip(sessions, end_of_turn, strict=True):
        if eot:
            tts.end_turn(s)
    return results


def teacher_force_chunk(
    tts: MiniCPMTTS,
    session: TTSSession,
    condition: torch.Tensor,
    codes: Sequence[int],
    *,
    min_new: int,
    max_new: int,
    sampling: CodeSampling = DUPLEX_SAMPLING,
) -> torch.Tensor:
    """`generate_chunk` with recorded draws: returns the distributions `[n_draws, V]` it would have sampled."""
    result = tts.generate_chunks(
        [session],
        [condition],
        min_new=min_new,
        max_new=max_new,
        sampling=sampling,
        forced=[codes],
        record_probs=True,
    )[0]
    if len(result.draws) != len(codes):
        raise ValueError(f"the run stopped after {len(result.draws)} of {len(codes)} forced codes")
    assert result.probs is not None
    return result.probs


@torch.inference_mode()
def generate(
    tts: MiniCPMTTS,
    session: TTSSession,
    condition: torch.Tensor,
    *,
    min_new: int = 50,
    max_new: int = 2048,
    sampling: CodeSampling = TURN_SAMPLING,
    forced: Sequence[int] | None = None,
    record_probs: bool = False,
) -> ChunkResult:
    """All codes of one utterance from a fresh cache (the condition ends with text_eos + audio_bos).

    Top-p/top-k apply from the second draw on; the last draw (EOS, or the max_new-th code) is not returned.
    """
    tts.end_turn(session)
    result = tts.generate_chunks(
        [session],
        [condition],
        min_new=min_new,
        max_new=max_new,
        sampling=sampling,
        forced=None if forced is None else [forced],
        record_probs=record_probs,
    )[0]
    tts.end_turn(session)
    return result
