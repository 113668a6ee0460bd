"""The speak stage of a duplex tick: TTS conditions of every speaking unit in one projector call, their 26 TTS
draws as static steps (`static_tts.StaticTTS.generate_codes`, sampling on the device), then the vocoder windows
(`Token2Wav.push_codes_batch`: equal-shaped windows share one flow batch). Each session's speech turn (its
voice, whether its TTS turn is open, its vocoder turn) lives in its `DuplexState`; this stage keeps none.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..host_copy import upload
from ..modules.tts import DUPLEX_MAX_DRAWS
from ..token2wav import PromptCache, PushRequest, Token2Wav
from .core import Engine
from .duplex import DuplexState, UnitResult, _state
from .static_tts import StaticTTS

# a duplex speech turn's first windows, two steady ones (its flow cache full: captured on the second) and its end
WARM_UP_UNITS = 5


@dataclass
class SpeechOut:
    codes: list[int]
    pcm: list[np.ndarray] = field(default_factory=list)  # float32 24 kHz pieces ready after this unit
    first_pcm_s: float | None = None  # perf_counter() when the first piece of this unit was ready
    end_of_turn: bool = False
    done_s: float = 0.0  # perf_counter() when this unit's codes (and audio) were complete


class TickSpeech:
    def __init__(
        self, engine: Engine, tts: StaticTTS | None, vocoder: Token2Wav | None, voice: PromptCache | None
    ) -> None:
        """`voice` is the default of sessions without their own; without a `vocoder` units get codes only."""
        self.engine, self.tts, self.vocoder, self.voice = engine, tts, vocoder, voice
        self.vocoder_s = 0.0  # the last tick's vocoder time

    @torch.no_grad()
    def warm_up(self, sessions: int, units: int = WARM_UP_UNITS, phase: int = 0) -> None:
        """Speak `units` units of random codes in `sessions` vocoder turns at once and end them: the padded flow
        and HiFT shapes of a tick in which that many sessions speak (the turn's opening windows, the steady
        one once its cache is full, the last chunk) are captured now (a shape is captured on its second use),
        so their memory shows in the worker's after-warm-up check and no capture of that size lands in a live
        tick. The turns take the store rows of tick `phase`'s sessions (`speak`); they are free again afterwards.
        Their last windows run twice (a second short turn each), so the shape of a round in which turns end is
        captured too. (Smaller buckets, while calls join, are captured live: each took 0.3-0.6 s of a tick on an
        H100, and capturing them all here would take about 1 GiB that 64 sessions' caches do not leave.)"""
        if self.vocoder is None or self.voice is None or sessions < 1:
            return
        codes = torch.randint(0, self.vocoder.flow.p.vocab_size, (units, sessions, DUPLEX_MAX_DRAWS - 1))
        turns = [self.vocoder.start_turn(self.voice, rule="duplex", phase=phase) for _ in range(sessions)]
        for u in range(units):
            last = u == units - 1
            requests = [
                PushRequest(t, c, end_of_turn=last) for t, c in zip(turns, codes[u].tolist(), strict=True)
            ]
            self.vocoder.push_codes_batch(requests)
        turns = [self.vocoder.start_turn(self.voice, rule="duplex", phase=phase) for _ in range(sessions)]
        self.vocoder.push_codes_batch(
            [PushRequest(t, c, end_of_turn=True) for t, c in zip(turns, codes[-1].tolist(), strict=True)]
        )

    def conditions(self, results: Sequence[UnitResult]) -> list[torch.Tensor]:
        """The TTS conditions of many units with one projector call: emb_text(t) + L2norm(projector_semantic(h))
        per spoken token, then audio_bos (the duplex TTS never gets text_eos)."""
        tts = self.engine.model.tts
        assert tts is not None
        w = tts.emb_text.weight
        ids = [t for r in results for t in r.tts_token_ids]
        hid = [r.tts_hidden for r in results if r.tts_hidden is not None]
        tail = tts.emb_text(upload([tts.config.audio_bos_token_id], w.device))
        if ids:
            sem = tts.projector_semantic(torch.cat(hid).to(dtype=w.dtype, device=w.device))
            if tts.config.normalize_projected_hidden:
                sem = F.normalize(sem, p=2, dim=-1)
            rows = tts.emb_text(upload(ids, w.device)) + sem
        out, at = [], 0
        for r in results:
            n = len(r.tts_token_ids)
            out.append(torch.cat([rows[at : at + n], tail]) if n else tail)
            at += n
        return out

    def voice_of(self, st: DuplexState) -> PromptCache | None:
        """The voice a session speaks with: its own, else the batcher's default."""
        return st.voice if st.voice is not None else self.voice

    @torch.no_grad()
    def speak(self, results: Sequence[UnitResult]) -> list[SpeechOut | None]:
        """TTS (+ vocoder when there is one) for every speaking unit of the tick. Each session's speech turn
        (TTS turn open, vocoder turn, voice) is in its `DuplexState`."""
        out: list[SpeechOut | None] = [None] * len(results)
        self.vocoder_s = 0.0
        for r in results:
            if r.closed_turn_by_force:  # an interrupted turn: token2wav restarts, the TTS LM keeps its cache
                _state(r.session).vocoder_turn = None
        speaking = [k for k, r in enumerate(results) if r.prefilled and not r.is_listen]
        if not speaking or self.tts is None:
            return out
        slots = [results[k].session.slot for k in speaking]
        states = [_state(results[k].session) for k in speaking]
        self.tts.reset([s for s, st in zip(slots, states, strict=True) if not st.tts_open])
        mins = [
            0 if (not st.tts_open or results[k].end_of_turn) else DUPLEX_MAX_DRAWS
            for k, st in zip(speaking, states, strict=True)
        ]
        for st in states:
            st.tts_open = True
        codes = self.tts.generate_codes(slots, self.conditions([results[k] for k in speaking]), mins)
        t_voc = time.perf_counter()
        eots = [results[k].end_of_turn for k in speaking]
        pcm: list[list[np.ndarray]] = [[] for _ in speaking]
        voiced = [k for k, st in enumerate(states) if self.voice_of(st) is not None]
        if self.vocoder is not None and voiced:
            requests = []
            for k in voiced:
                st = states[k]
                if st.vocoder_turn is None:
                    voice = self.voice_of(st)
                    assert voice is not None
                    # in the session's tick phase's half of the store: the phase's flow batch stays small
                    phase = results[speaking[k]].session.phase
                    st.vocoder_turn = self.vocoder.start_turn(voice, rule="duplex", phase=phase)
                # the official duplex path flushes short windows when the unit's codes ended at EOS
                requests.append(
                    PushRequest(
                        st.vocoder_turn, codes[k], end_of_turn=eots[k], flush=self.tts.last_hit_eos[k]
                    )
                )
            for k, pieces in zip(voiced, self.vocoder.push_codes_batch(requests), strict=True):
                pcm[k] = pieces
        t_pcm = time.perf_counter()
        for k, st, c, eot, pieces in zip(speaking, states, codes, eots, pcm, strict=True):
            speech = SpeechOut(codes=c, pcm=pieces, end_of_turn=eot, first_pcm_s=t_pcm if pieces else None)
            if eot:
                st.end_speech()
            speech.done_s = t_pcm
            out[k] = speech
        self.vocoder_s = time.perf_counter() - t_voc
        return out
