"""The engine: one loaded model, one slot KV cache, many sessions, batched forward steps."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import PreprocessorConfig
from ..host_copy import upload
from ..model import MiniCPMO
from ..modules.kv_cache import SlotKVCache
from ..processor.processor import MiniCPMOProcessor
from ..tokenizer import MiniCPMOTokenizer
from .session import HalfDuplexState, Mode, Session
from .static_decode import StaticLLM


class Engine:
    def __init__(
        self,
        model: MiniCPMO,
        tokenizer: MiniCPMOTokenizer,
        max_sessions: int = 4,
        max_len: int = 8192,
        preprocessor: PreprocessorConfig | None = None,
    ) -> None:
        self.model = model
        if model.device.type == "cuda":
            # cuDNN's SDPA plans a graph for every new (batch, query, key) shape: measured ~1.1 ms of host time
            # per attention call on an H200, most of an eager decode step. Eager steps change shape every token.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.processor = MiniCPMOProcessor(tokenizer, preprocessor or PreprocessorConfig())
        self.images = self.processor.images
        self.tokenizer = tokenizer
        self.special = tokenizer.special
        # "</s>" is a reply terminator of the real vocabulary; a vocabulary without it (the embedded tiny
        # builder's) ends replies on <|endoftext|> instead.
        self.eos_s = tokenizer.token_to_id("</s>") if tokenizer.has_token("</s>") else self.special.endoftext
        sp = self.special
        # Banned in every duplex decision after the raw draw: <|tts_pad|>, the bad ids, <|chunk_eos|> (kept where
        # the logits are, so a decision step copies nothing from the host).
        self.duplex_bans = torch.tensor(
            [sp.tts_pad, *tokenizer.bad_token_ids, sp.chunk_eos], dtype=torch.long, device=model.device
        )
        self.cache: SlotKVCache = model.llm.new_cache(max_sessions, max_len)
        self.sessions: dict[str, Session] = {}
        self._ids = itertools.count()
        # Static-shape (CUDA-graph) steps for `feed`, set by `engine.batcher.enable_static_steps`.
        self.static: StaticLLM | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        max_sessions: int = 4,
        max_len: int = 8192,
    ) -> Engine:
        model = MiniCPMO.from_pretrained(model_dir, dtype=dtype, device=device)
        tokenizer = MiniCPMOTokenizer.from_dir(model_dir)
        return cls(model, tokenizer, max_sessions, max_len, PreprocessorConfig.from_file(model_dir))

    # ---- sessions ---------------------------------------------------------------------------------------------
    def open_session(
        self,
        mode: Mode = Mode.CHAT,
        session_id: str | None = None,
        seed: int | None = None,
        top_slot: bool = False,
    ) -> Session:
        """A new session on the lowest free KV slot (with `top_slot`, the highest: a second tick phase)."""
        sid = session_id or f"s{next(self._ids)}"
        if sid in self.sessions:
            raise ValueError(f"session {sid!r} already exists")
        # The session's sampling generator lives where the logits are (multinomial needs the same device).
        generator = torch.Generator(device=self.model.device)
        session = Session(
            session_id=sid, slot=self.cache.allocate(top_slot), mode=mode, generator=generator, top=top_slot
        )
        if seed is not None:
            session.seed(seed)
        self.sessions[sid] = session
        return session

    def close_session(self, session: Session) -> None:
        if session.closed:
            return
        self.cache.release(session.slot)
        self.sessions.pop(session.session_id, None)
        session.closed = True

    def reset_session(self, session: Session) -> None:
        """Forget the conversation (KV, audio cache, mode state) but keep the slot."""
        self._check_open(session)
        self.cache.reset(session.slot)
        session.audio_cache.clear()
        session.half_duplex = HalfDuplexState()
        session.duplex = None
        session.history = []

    def switch_mode(self, session: Session, mode: Mode) -> None:
        """Change what the session is doing. Nothing is loaded: only its own state is reset."""
        self.reset_session(session)
        session.mode = mode

    def kv_length(self, session: Session) -> int:
        return self.cache.length(session.slot)

    def kv_lengths(self, sessions: Sequence[Session]) -> list[int]:
        """The KV lengths of several sessions in one device read."""
        if not sessions:
            return []
        return self.cache.lengths[[s.slot for s in sessions]].tolist()

    def kv_room(self, session: Session) -> int:
        """Positions left in the session's slot (a scheduler stops or trims a session before it runs out, so
        that one full session does not fail a whole batched step)."""
        return self.cache.max_len - self.cache.length(session.slot)

    def _check_open(self, session: Session) -> None:
        if session.closed:
            raise RuntimeError(f"session {session.session_id!r} is closed")

    # ---- batched LLM steps ------------------------------------------------------------------------------------
    @torch.no_grad()
    def feed(self, sessions: Sequence[Session], pieces: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Append `pieces[i]` (`[T_i, D]` embeddings) to session i's KV slot in one batched forward.

        Returns each session's final-norm hidden states `[T_i, D]`.
        """
        if len(sessions) != len(pieces):
            raise ValueError("one embedding piece per session")
        if not sessions:
            return []
        for s in sessions:
            self._check_open(s)
        if len({s.slot for s in sessions}) != len(sessions):
            raise ValueError("a session appears twice in one step")
        lengths = [p.shape[0] for p in pieces]
        if self.static is not None and self.static.accepts([s.slot for s in sessions], lengths):
            rows = self.static.feed([s.slot for s in sessions], pieces)["hidden"]
            return [rows[i, :n] for i, n in enumerate(lengths)]
        t = max(lengths)
        d = pieces[0].shape[-1]
        batch = pieces[0].new_zeros(len(pieces), t, d)
        for i, p in enumerate(pieces):
            batch[i, : p.shape[0]] = p
        slots = upload([s.slot for s in sessions], self.model.device)
        num_new = upload(lengths, self.model.device)
        hidden = self.model.llm(batch, self.cache, slots, num_new)
        return [hidden[i, :n] for i, n in enumerate(lengths)]

    def feeds_in_one_step(self, sessions: Sequence[Session], counts: Sequence[int]) -> bool:
        """Whether `feed` runs pieces of `counts` positions for these sessions as one step over only their rows,
        wherever their slots are (the eager forward, or a gathered static step); if not, its static step runs
        every slot between the lowest and the highest of them."""
        slots = [s.slot for s in sessions]
        if self.static is None or not slots or not self.static.accepts(slots, counts):
            return True
        return self.static.gathered_shape(len(slots), max(counts)) is not None

    def feed_ids(self, sessions: Sequence[Session], ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return self.feed(sessions, [self.model.embed_ids(list(x)) for x in ids])

    @torch.no_grad()
    def feed_for_logits(
        self, sessions: Sequence[Session], pieces: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`feed`, plus float32 logits `[B, V]` at each piece's last position: a static step computes them
        already, so they are not computed twice."""
        lengths = [p.shape[0] for p in pieces]
        if sessions and self.static is not None and self.static.accepts([s.slot for s in sessions], lengths):
            for s in sessions:
                self._check_open(s)
            out = self.static.feed([s.slot for s in sessions], pieces)
            return [out["hidden"][i, :n] for i, n in enumerate(lengths)], out["logits"]
        hidden = self.feed(sessions, pieces)
        return hidden, self.last_logits(hidden)

    def last_logits(self, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """float32 logits `[B, V]` at the last position of each session's hidden states."""
        return self.model.llm.logits(torch.stack([h[-1] for h in hidden]))
