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
The repetition-penalty window is per call in duplex (a unit only looks at the codes it drew itself) and
per turn in turn-based streaming, where `TTSStreamer` keeps the turn's codes, the previous text chunk's condition
and codes (for sliding_recompute) and the buffer of codes not yet handed out in 25-code pieces.

Entry points: `condition()` builds a condition; `generate_chunks()` runs the batched step loop (draws, or given
codes with the distributions recorded: teacher forcing) for many sessions; `tts_streamer.TTSStreamer` gives
turn-based streaming on top of it. The duplex tick draws through `engine.static_tts` (the same step as static,
graph-captured shapes); the per-session wrappers the tests use as oracles (`generate_chunk`, `speak_units`, the
non-streaming `generate`) are in `tests/reference_tts.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MiniCPMOConfig, TTSConfig
from ..host_copy import upload
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
    "TURN_SAMPLING",
]

# checkpoint entries the runtime does not use (relative to the `tts.` prefix)
UNUSED_TENSORS = ("model.embed_tokens.", "projector_spk.")
_WEIGHT_NORM_G = "head_code.{i}.parametrizations.weight.original0"
_WEIGHT_NORM_V = "head_code.{i}.parametrizations.weight.original1"

# §3.3.3: a duplex unit draws at most 26 codes and returns all but the last, so exactly 25 (1 s) mid-turn.
DUPLEX_MAX_DRAWS = 26


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

    def take(self, code: int, eos_id: int) -> None:
        """File one draw: the penalty's history sees it; the run is done at EOS or its draw budget."""
        self.draws.append(code)
        self.history.append(code)
        self.done = code == eos_id or len(self.draws) >= self.max_new


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
            codes = upload([r.draws[-1] for r in active], w.device)
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
            r.take(code, self.eos_id)

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
