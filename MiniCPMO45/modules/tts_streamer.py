"""Turn-based streaming TTS (`TTSStreamer`, one turn of one session) and `next_pieces`, which draws the next
piece of many streamers together: in the static steps' piece loop when their sessions are in its cache (the
chat tick's case: a whole piece per row in one call, one CUDA graph and one host sync on a GPU), else in batched
steps of `MiniCPMTTS.generate_chunks`' loop, one draw and one host sync at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .tts import MiniCPMTTS, TTSSession, _Run
from .tts_sampling import TURN_SAMPLING, CodeSampling


class TTSStreamer:
    """Turn-based streaming TTS for one turn of one session (§3.1 step 4, attention_type sliding_recompute).

    `feed(condition, text_finished)` takes the condition of each LLM text chunk (built by `condition()`, so it
    already ends with audio_bos, and with text_eos on the last chunk) and yields `(codes, is_last)` pieces of
    exactly `chunk_size` codes, plus a shorter last piece once the text is finished and EOS is drawn. From the
    second text chunk on, the cache is dropped and recomputed over [previous condition + its codes + this
    condition] from position 0. The repetition penalty looks at the turn's last `window` codes. `finish()`
    returns the codes still buffered when the LLM stops without the TTS having drawn EOS.

    It runs under `no_grad`, not `inference_mode`: its draws may go through the static steps, whose buffers
    the duplex ticks also update in place.
    """

    def __init__(
        self,
        tts: MiniCPMTTS,
        session: TTSSession,
        sampling: CodeSampling = TURN_SAMPLING,
        chunk_size: int = 25,
        max_new_per_text_chunk: int = 500,
    ) -> None:
        if tts.config.attention_type != "sliding_recompute":
            raise NotImplementedError(
                f"streaming TTS attention_type {tts.config.attention_type!r} (only sliding_recompute)"
            )
        if chunk_size < 1 or max_new_per_text_chunk < 1:
            raise ValueError("chunk_size and max_new_per_text_chunk must be positive")
        self.tts = tts
        self.session = session
        self.sampling = sampling
        self.chunk_size = chunk_size
        self.max_new = max_new_per_text_chunk
        self.turn_codes: list[int] = []
        self.buffer: list[int] = []
        self.finished = False
        self._prev_condition: torch.Tensor | None = None
        self._prev_codes: list[int] = []
        self.chunk_probs: torch.Tensor | None = None
        self._run: _Run | None = None  # the text chunk being spoken
        self._condition: torch.Tensor | None = None
        self._chunk_codes: list[int] = []
        # the logits of the next draw when the static piece loop drew the chunk so far (`_static_pieces`)
        self._next_logits: torch.Tensor | None = None
        tts.end_turn(session)

    def _full_condition(self, condition: torch.Tensor) -> torch.Tensor:
        if self._prev_condition is None:
            return condition
        self.tts.end_turn(self.session)
        parts = [self._prev_condition]
        if self._prev_codes:
            codes = torch.tensor(self._prev_codes, dtype=torch.long, device=condition.device)
            parts.append(self.tts.emb_code[0](codes))
        parts.append(condition)
        return torch.cat(parts, dim=0)

    @property
    def feeding(self) -> bool:
        """A text chunk is being spoken (`begin` was called and its draws have not ended)."""
        return self._run is not None

    @torch.no_grad()
    def begin(
        self,
        condition: torch.Tensor,
        text_finished: bool,
        forced: Sequence[int] | None = None,
        record_probs: bool = False,
    ) -> None:
        """Start speaking one text chunk; `next_pieces` (or `feed`) then draws its codes. With `forced`, those
        codes replace the draws (teacher forcing); with `record_probs`, this chunk's sampling distributions are
        kept in `self.chunk_probs` `[draws, V]`."""
        if self.finished:
            raise RuntimeError("this turn's text is already finished; start a new streamer")
        if self._run is not None:
            raise RuntimeError("the previous text chunk is still being spoken")
        run = _Run(
            session=self.session,
            condition=self._full_condition(condition),
            min_new=0,
            max_new=self.max_new,
            history=list(self.turn_codes),
            warp_first=bool(self.turn_codes),
            forced=None if forced is None else [int(x) for x in forced],
            record=record_probs,
        )
        MiniCPMTTS._check_room(run)
        self.chunk_probs = None
        self.finished = text_finished
        self._run, self._condition, self._chunk_codes = run, condition, []

    def _take_draw(self) -> tuple[tuple[torch.Tensor, bool] | None, bool]:
        """After a step: file the run's last draw. Returns the piece now complete (if any) and whether the
        chunk is over (EOS, or its draw budget spent)."""
        run = self._run
        assert run is not None
        code, eos = run.draws[-1], self.tts.eos_id
        if code != eos:
            self._chunk_codes.append(code)
            self.turn_codes.append(code)
            self.buffer.append(code)
        piece: tuple[torch.Tensor, bool] | None = None
        over = run.done
        if not self.buffer:  # EOS with nothing buffered
            if self.finished:
                piece = (torch.empty(0, dtype=torch.long), True)
            over = True
        elif len(self.buffer) >= self.chunk_size:
            codes, self.buffer = self.buffer[: self.chunk_size], self.buffer[self.chunk_size :]
            piece = (torch.tensor(codes, dtype=torch.long), False)
        elif code == eos:
            if self.finished:
                codes, self.buffer = self.buffer, []
                piece = (torch.tensor(codes, dtype=torch.long), True)
            over = True
        if over:
            self.end_chunk()
        return piece, over

    def end_chunk(self) -> None:
        """Stop drawing for the current text chunk (also when its speech is dropped, e.g. a barge-in): what it
        drew becomes the previous chunk of the sliding recompute."""
        run, self._run = self._run, None
        self._next_logits = None
        if run is None:
            return
        self._prev_condition = self._condition
        self._prev_codes = self._chunk_codes
        if run.record and run.probs:
            self.chunk_probs = torch.stack(run.probs)

    @torch.no_grad()
    def feed(
        self,
        condition: torch.Tensor,
        text_finished: bool,
        forced: Sequence[int] | None = None,
        record_probs: bool = False,
    ) -> Iterator[tuple[torch.Tensor, bool]]:
        """Generate for one text chunk: `begin`, then `(codes, is_last)` pieces as they complete (`next_pieces`
        of this streamer alone)."""
        self.begin(condition, text_finished, forced, record_probs)
        try:
            while self.feeding:
                piece = next_pieces([self])[0]
                if piece is not None:
                    yield piece
        finally:
            self.end_chunk()

    def finish(self) -> torch.Tensor:
        """Codes left in the buffer (the official flush after the LLM loop); empties it."""
        piece, self.buffer = self.buffer, []
        return torch.tensor(piece, dtype=torch.long)


@torch.no_grad()
def next_pieces(streamers: Sequence[TTSStreamer]) -> list[tuple[torch.Tensor, bool] | None]:
    """Advance every streamer that is speaking a text chunk until it has its next piece or the chunk ends, the
    streamers drawing together in batched steps (they must share one TTS model, cache and sampling). Returns
    each streamer's piece, or None (no chunk in progress, or it ended with nothing left to hand out)."""
    out: list[tuple[torch.Tensor, bool] | None] = [None] * len(streamers)
    waiting = [i for i, s in enumerate(streamers) if s.feeding]
    if not waiting:
        return out
    tts, sampling = streamers[waiting[0]].tts, streamers[waiting[0]].sampling
    if any(streamers[i].tts is not tts or streamers[i].sampling != sampling for i in waiting):
        raise ValueError("streamers drawn together must share the TTS model and the sampling settings")
    static = tts.static
    in_loop = [
        i
        for i in waiting
        if _static_ok(streamers[i], static) and streamers[i].chunk_size == streamers[waiting[0]].chunk_size
    ]
    if in_loop:
        for i, piece in zip(in_loop, _static_pieces(static, [streamers[i] for i in in_loop]), strict=True):
            out[i] = piece
        waiting = [i for i in waiting if i not in in_loop]
    while waiting:
        runs = [streamers[i]._run for i in waiting]
        tts._step([r for r in runs if r is not None], sampling)
        still = []
        for i in waiting:
            piece, over = streamers[i]._take_draw()
            if piece is not None:
                out[i] = piece
            elif not over:
                still.append(i)
        waiting = still
    return out


def _static_ok(streamer: TTSStreamer, static: Any) -> bool:
    """Whether the streamer's chunk draws in the static piece loop (`StaticTTS.draw_pieces`): the loop is on (a
    GPU), its session is in the static steps' cache and it is neither teacher-forced nor recording its
    distributions (the reference paths of the tests)."""
    run = streamer._run
    return (
        static is not None
        and static.piece_loop
        and run is not None
        and run.forced is None
        and not run.record
        and streamer.session.cache is static.cache
    )


def _static_pieces(static: Any, streamers: Sequence[TTSStreamer]) -> list[tuple[torch.Tensor, bool] | None]:
    """`next_pieces` for streamers in the static steps' cache: their draws in `StaticTTS.draw_pieces` calls
    (one host sync each) until every one has its next piece or its chunk ended. The draws are Gumbel-max draws
    from noise of each session's own generator: the same distribution as the per-draw path, other random
    numbers. A call draws up to a whole piece; codes past a piece wait in the buffer for the next one."""
    out: list[tuple[torch.Tensor, bool] | None] = [None] * len(streamers)
    waiting = list(range(len(streamers)))
    while waiting:
        runs = [streamers[k]._run for k in waiting]
        assert all(r is not None for r in runs)
        conditions = [
            r.condition if streamers[k]._next_logits is None else None
            for k, r in zip(waiting, runs, strict=True)
        ]
        codes, logits = static.draw_pieces(
            [r.session.slot for r in runs],
            conditions,
            [r.session.length for r in runs],
            [streamers[k]._next_logits for k in waiting],
            [r.history for r in runs],
            [bool(r.draws) or r.warp_first for r in runs],
            [r.min_new - len(r.draws) for r in runs],
            [r.max_new - len(r.draws) for r in runs],
            [r.session.generator for r in runs],
            streamers[waiting[0]].sampling,
            streamers[waiting[0]].chunk_size,
        )
        still = []
        for row, (k, run) in enumerate(zip(waiting, runs, strict=True)):
            streamer, eos = streamers[k], streamers[k].tts.eos_id
            if conditions[row] is not None:
                run.session.length += int(conditions[row].shape[0])
            over = False
            for code in codes[row]:
                run.take(code, eos)
                piece, over = streamer._take_draw()
                if piece is not None:
                    if out[k] is not None:
                        raise RuntimeError("one call completed two pieces")
                    out[k] = piece
                if over:
                    break
            # every draw but the chunk's last was fed back; while the chunk goes on, its last one was too
            run.session.length += len(codes[row]) - (1 if over else 0)
            if not over:
                streamer._next_logits = logits[row]
                if out[k] is None:
                    still.append(k)
        waiting = still
    return out
