"""`MiniCPMTTS`: the speech-token LM that turns the LLM's spoken tokens (and their hidden states) into 25 Hz codes.

Weights: the `tts.*` tensors of the official checkpoint, by their official names. `tts.model.embed_tokens` (the
unused Llama token table) and `tts.projector_spk.*` (no speaker embedding at inference) are read past on purpose.
`head_code.0` is weight-normalised in the file (`parametrizations.weight.original0/1`, i.e. g and v); its
effective weight g * v / ||v|| is computed once at load.

Per-session state (`TTSSession`), so one set of weights serves many sessions:
- `slot`: the session's row in a shared `TTSKVCache` (keys/values of every layer), held until `close()`;
- `length`: how many positions of that slot are valid. Positions are never skipped, so this is also the RoPE
  position of the next token, i.e. the official `text_start_pos`; `end_turn()` sets it back to 0;
- `generator`: the session's own `torch.Generator`, so its code draws are reproducible and independent of the
  other sessions in the batch.
The repetition-penalty window is per call in duplex (`generate_chunk` only looks at the codes it drew itself) and
per turn in turn-based streaming, where `TTSStreamer` keeps the turn's codes, the previous text chunk's condition
and codes (for sliding_recompute) and the buffer of codes not yet handed out in 25-code pieces.

Entry points: `condition()` builds a condition; `speak_units()` runs one duplex unit for a batch of sessions with
the official rules (`generate_chunks()` / `generate_chunk()` underneath); `streamer()` gives turn-based streaming;
`generate()` is the non-streaming utterance. All run through one batched step loop; teacher forcing runs the same
loop with given codes instead of draws and records the distributions the sampler would have drawn from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MiniCPMOConfig, TTSConfig
from ..loader import CheckpointError, load_weights, read_checkpoint
from .tts_backbone import CacheFullError, LlamaBackbone, TTSKVCache
from .tts_sampling import DUPLEX_SAMPLING, TURN_SAMPLING, CodeSampling, code_distribution

__all__ = [
    "CacheFullError",
    "ChunkResult",
    "CodeSampling",
    "DUPLEX_SAMPLING",
    "MiniCPMTTS",
    "TTSKVCache",
    "TTSSession",
    "TTSStreamer",
    "TURN_SAMPLING",
    "duplex_min_new",
    "next_pieces",
]

# checkpoint entries the runtime does not use (relative to the `tts.` prefix)
UNUSED_TENSORS = ("model.embed_tokens.", "projector_spk.")
_WEIGHT_NORM_G = "head_code.{i}.parametrizations.weight.original0"
_WEIGHT_NORM_V = "head_code.{i}.parametrizations.weight.original1"

# §3.3.3: a duplex unit draws at most 26 codes and returns all but the last, so exactly 25 (1 s) mid-turn.
DUPLEX_MAX_DRAWS = 26


def duplex_min_new(session: TTSSession, end_of_turn: bool) -> int:
    """Draws before EOS is allowed in a duplex unit: none at a turn's first unit or its last, else all 26."""
    return 0 if session.length == 0 or end_of_turn else DUPLEX_MAX_DRAWS


class SemanticProjector(nn.Module):
    """`projector_semantic`: Linear(llm_dim → hidden) + ReLU + Linear(hidden → hidden)."""

    def __init__(self, llm_dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(llm_dim, hidden)
        self.linear2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))


class TTSSession:
    """One session's TTS state: a cache slot, its filled length and a private random generator."""

    def __init__(
        self,
        cache: TTSKVCache,
        seed: int | None = None,
        device: str | torch.device = "cpu",
        slot: int | None = None,
    ) -> None:
        """`slot`: a slot the caller owns (e.g. the session's LLM slot in the static steps' cache, which nobody
        allocates from); else one is allocated from `cache` and released on `close`."""
        self.cache = cache
        self.owns_slot = slot is None
        self.slot = cache.allocate() if slot is None else slot
        self.length = 0
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.closed = False

    @property
    def text_start_pos(self) -> int:
        """The official name for the position where the next condition starts."""
        return self.length

    def close(self) -> None:
        if not self.closed:
            if self.owns_slot:
                self.cache.release(self.slot)
            self.closed = True


@dataclass
class ChunkResult:
    """What one session got from a generation call."""

    codes: torch.Tensor  # [n] long: the codes to play (the final draw is never included)
    draws: list[int]  # every code drawn (or forced), in order, including the final one
    hit_eos: bool
    probs: torch.Tensor | None = None  # [len(draws), num_audio_tokens] when recorded


@dataclass
class _Run:
    """One session's generation call while the batched loop advances it."""

    session: TTSSession
    condition: torch.Tensor  # [L, hidden]
    min_new: int
    max_new: int
    history: list[int]  # codes the repetition penalty can see; draws are appended
    warp_first: bool  # apply top-p/top-k on the first draw too (turn-based chunks after the first code)
    forced: list[int] | None = None
    record: bool = False
    draws: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)
    done: bool = False


class MiniCPMTTS(nn.Module):
    def __init__(self, config: TTSConfig) -> None:
        super().__init__()
        if config.num_vq != 1:
            raise NotImplementedError(f"only num_vq == 1 is supported, config has {config.num_vq}")
        if config.condition_type != "hidden_text_merge":
            raise NotImplementedError(f"condition_type {config.condition_type!r} (only hidden_text_merge)")
        if config.projector_type != "mlp":
            raise NotImplementedError(f"projector_type {config.projector_type!r} (only mlp)")
        self.config = config
        h = config.hidden_size
        self.emb_text = nn.Embedding(config.num_text_tokens, h)
        self.emb_code = nn.ModuleList([nn.Embedding(config.num_audio_tokens, h)])
        self.head_code = nn.ModuleList([nn.Linear(h, config.num_audio_tokens, bias=False)])
        self.projector_semantic = SemanticProjector(config.llm_dim, h)
        self.model = LlamaBackbone(
            h,
            config.intermediate_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            config.num_key_value_heads,
        )
        # static-shape steps over their own slot cache (`engine.static_tts.StaticTTS`, set by the duplex
        # batcher): a session whose cache is theirs runs its draws through them
        self.static: Any = None

    # ---- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        model_dir: str | Path,
        config: TTSConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> MiniCPMTTS:
        config = config or MiniCPMOConfig.from_file(model_dir).tts
        tts = cls(config).to(dtype=dtype, device=device)
        tensors = read_checkpoint(model_dir, prefixes=["tts."], dtype=torch.float32)
        tts.load_tensors(tensors)
        return tts.eval()

    def load_tensors(self, tensors: dict[str, torch.Tensor], prefix: str = "tts.") -> None:
        """Load official `tts.*` tensors (any float dtype); folds the head's weight norm first."""
        tensors = dict(tensors)
        for i in range(len(self.head_code)):
            g_name, v_name = prefix + _WEIGHT_NORM_G.format(i=i), prefix + _WEIGHT_NORM_V.format(i=i)
            if g_name not in tensors or v_name not in tensors:
                raise CheckpointError(f"missing tensors: {g_name} and/or {v_name}")
            g, v = tensors.pop(g_name).float(), tensors.pop(v_name).float()
            # weight_norm over dim 0: every output row is rescaled to length g
            tensors[f"{prefix}head_code.{i}.weight"] = v * (g / v.norm(dim=1, keepdim=True))
        load_weights(self, tensors, prefix=prefix, ignore=UNUSED_TENSORS)

    # ---- sessions -------------------------------------------------------------------------------------------------
    @property
    def eos_id(self) -> int:
        return self.config.audio_eos_id

    def new_cache(self, num_slots: int, capacity: int | None = None) -> TTSKVCache:
        """A cache for `num_slots` sessions of up to `capacity` positions (default max_position_embeddings)."""
        w = self.emb_text.weight
        capacity = capacity or self.config.max_position_embeddings
        return self.model.new_cache(num_slots, capacity, w.dtype, w.device)

    def new_session(self, cache: TTSKVCache, seed: int | None = None, slot: int | None = None) -> TTSSession:
        return TTSSession(cache, seed=seed, device=self.emb_text.weight.device, slot=slot)

    @staticmethod
    def end_turn(session: TTSSession) -> None:
        """Forget the turn: the next condition starts at position 0 of an empty cache slot."""
        session.length = 0

    # ---- condition ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def condition(self, token_ids: torch.Tensor, hidden: torch.Tensor, text_finished: bool) -> torch.Tensor:
        """`[N + (1 if text_finished) + 1, hidden]`: emb_text(t) + L2norm(projector_semantic(h)) per spoken
        token, then emb_text(text_eos) when the text is finished, then emb_text(audio_bos)."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.emb_text.weight.device).reshape(
            -1
        )
        n = token_ids.numel()
        if hidden.dim() != 2 or hidden.shape != (n, self.config.llm_dim):
            raise ValueError(
                f"hidden must be [{n}, {self.config.llm_dim}] (one LLM state per token), got {tuple(hidden.shape)}"
            )
        if n and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.config.num_text_tokens):
            raise ValueError(
                f"token ids must lie in [0, {self.config.num_text_tokens}), got {token_ids.tolist()}"
            )
        w = self.emb_text.weight
        semantic = self.projector_semantic(hidden.to(dtype=w.dtype, device=w.device))
        if self.config.normalize_projected_hidden:
            semantic = F.normalize(semantic, p=2, dim=-1)
        tail = [self.config.text_eos_token_id] if text_finished else []
        tail.append(self.config.audio_bos_token_id)
        tail_emb = self.emb_text(torch.tensor(tail, dtype=torch.long, device=w.device))
        return torch.cat([self.emb_text(token_ids) + semantic, tail_emb], dim=0)

    # ---- the batched step loop ------------------------------------------------------------------------------------
    def _code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head_code[0](hidden).float()

    def _step(self, runs: list[_Run], sampling: CodeSampling) -> None:
        """Advance every unfinished run by one draw: feed its condition (first step) or its last code."""
        active = [r for r in runs if not r.done]
        if not active:
            return
        cache = active[0].session.cache
        if any(r.session.cache is not cache for r in active):
            raise ValueError("all sessions of one batched call must share one TTSKVCache")
        w = self.emb_text.weight
        if all(r.draws for r in active):  # the common case: every row feeds its last code
            codes = torch.tensor([r.draws[-1] for r in active], dtype=torch.long, device=w.device)
            embeds = self.emb_code[0](codes)[:, None]
            valid = [1] * len(active)
        else:
            inputs = []
            for r in active:
                if r.draws:
                    code = torch.tensor([r.draws[-1]], dtype=torch.long, device=w.device)
                    inputs.append(self.emb_code[0](code))
                else:
                    inputs.append(r.condition.to(dtype=w.dtype, device=w.device))
            valid = [x.shape[0] for x in inputs]
            embeds = nn.utils.rnn.pad_sequence(inputs, batch_first=True)
        slots = [r.session.slot for r in active]
        starts = [r.session.length for r in active]
        static = self.static
        if (
            static is not None and cache is static.cache
        ):  # static steps (CUDA graphs on a GPU) over that cache
            logits = static.feed(slots, [e[:n] for e, n in zip(embeds, valid, strict=True)], starts)
        else:
            hidden = self.model(embeds, cache, slots, starts, valid)
            rows = torch.arange(len(active), device=w.device)
            logits = self._code_logits(hidden[rows, torch.tensor(valid, device=w.device) - 1])
        probs = code_distribution(
            logits,
            [r.history for r in active],
            sampling,
            warp=[bool(r.draws) or r.warp_first for r in active],
            forbid_eos=[len(r.draws) < r.min_new for r in active],
            eos_id=self.eos_id,
        )
        drawn: list[int] = []
        if any(r.forced is None for r in active):
            picks = [
                torch.multinomial(probs[row], 1, generator=r.session.generator)
                if r.forced is None
                else torch.zeros(1, dtype=torch.long, device=probs.device)
                for row, r in enumerate(active)
            ]
            drawn = torch.cat(picks).tolist()  # one host sync for the whole batch
        for row, r in enumerate(active):
            r.session.length += valid[row]
            if r.forced is not None:
                if len(r.draws) >= len(r.forced):
                    raise ValueError(
                        f"forced codes ran out after {len(r.draws)} steps before the run stopped"
                    )
                code = r.forced[len(r.draws)]
            else:
                code = drawn[row]
            if r.record:
                r.probs.append(probs[row])
            r.draws.append(code)
            r.history.append(code)
            r.done = code == self.eos_id or len(r.draws) >= r.max_new

    def _results(self, runs: list[_Run]) -> list[ChunkResult]:
        out = []
        for r in runs:
            codes = torch.tensor(r.draws[:-1], dtype=torch.long)
            probs = torch.stack(r.probs) if r.record else None
            out.append(ChunkResult(codes, list(r.draws), bool(r.draws) and r.draws[-1] == self.eos_id, probs))
        return out

    @torch.inference_mode()
    def generate_chunks(
        self,
        sessions: Sequence[TTSSession],
        conditions: Sequence[torch.Tensor],
        *,
        min_new: int | Sequence[int],
        max_new: int,
        sampling: CodeSampling = DUPLEX_SAMPLING,
        forced: Sequence[Sequence[int]] | None = None,
        record_probs: bool = False,
    ) -> list[ChunkResult]:
        """Batched duplex unit (official `generate_chunk`), one row per session.

        Each session's condition `[L, hidden]` is appended at its current length; then codes are drawn until EOS
        or `max_new` draws. Drawing EOS is forbidden for the first `min_new` draws. The last draw is neither
        returned nor fed, so the cache grows by L + len(codes). The repetition penalty sees only this call's
        codes. With `forced`, those codes replace the draws (teacher forcing).
        """
        if len(sessions) != len(conditions):
            raise ValueError(f"{len(sessions)} sessions but {len(conditions)} conditions")
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("a session appears twice in one batch")
        if max_new < 1:
            raise ValueError(f"max_new must be at least 1, got {max_new}")
        mins = [min_new] * len(sessions) if isinstance(min_new, int) else list(min_new)
        if len(mins) != len(sessions):
            raise ValueError(f"{len(sessions)} sessions but {len(mins)} min_new values")
        if forced is not None and len(forced) != len(sessions):
            raise ValueError(f"{len(sessions)} sessions but {len(forced)} forced code lists")
        runs = []
        for i, (s, c) in enumerate(zip(sessions, conditions, strict=True)):
            if s.closed:
                raise ValueError("session is closed")
            if c.dim() != 2 or c.shape[0] < 1 or c.shape[1] != self.config.hidden_size:
                raise ValueError(f"condition must be [L>=1, {self.config.hidden_size}], got {tuple(c.shape)}")
            runs.append(
                _Run(
                    session=s,
                    condition=c,
                    min_new=mins[i],
                    max_new=max_new,
                    history=[],
                    warp_first=False,
                    forced=None if forced is None else [int(x) for x in forced[i]],
                    record=record_probs,
                )
            )
        for r in runs:
            self._check_room(r)
        while any(not r.done for r in runs):
            self._step(runs, sampling)
        return self._results(runs)

    @staticmethod
    def _check_room(run: _Run) -> None:
        """Fail before any work (and any state change) if the run could outgrow its cache slot."""
        session = run.session
        worst = session.length + run.condition.shape[0] + run.max_new - 1
        if worst > session.cache.capacity:
            raise CacheFullError(
                f"TTS session at position {session.length} needs up to {worst} cache positions "
                f"(condition {run.condition.shape[0]} + {run.max_new - 1} fed codes), capacity is "
                f"{session.cache.capacity}; end the turn or use a larger cache"
            )

    def generate_chunk(
        self,
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
        result = self.generate_chunks(
            [session], [condition], min_new=min_new, max_new=max_new, sampling=sampling
        )
        return result[0].codes

    def speak_units(
        self,
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
        results = self.generate_chunks(
            sessions, conditions, min_new=mins, max_new=DUPLEX_MAX_DRAWS, sampling=sampling
        )
        for s, eot in zip(sessions, end_of_turn, strict=True):
            if eot:
                self.end_turn(s)
        return results

    def teacher_force_chunk(
        self,
        session: TTSSession,
        condition: torch.Tensor,
        codes: Sequence[int],
        *,
        min_new: int,
        max_new: int,
        sampling: CodeSampling = DUPLEX_SAMPLING,
    ) -> torch.Tensor:
        """`generate_chunk` with recorded draws: returns the distributions `[n_draws, V]` it would have sampled."""
        result = self.generate_chunks(
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

    # ---- non-streaming (official `generate`) ---------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
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
        self.end_turn(session)
        result = self.generate_chunks(
            [session],
            [condition],
            min_new=min_new,
            max_new=max_new,
            sampling=sampling,
            forced=None if forced is None else [forced],
            record_probs=record_probs,
        )[0]
        self.end_turn(session)
        return result

    # ---- turn-based streaming ------------------------------------------------------------------------------------
    def streamer(
        self,
        session: TTSSession,
        sampling: CodeSampling = TURN_SAMPLING,
        chunk_size: int = 25,
        max_new_per_text_chunk: int = 500,
    ) -> TTSStreamer:
        return TTSStreamer(self, session, sampling, chunk_size, max_new_per_text_chunk)


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
