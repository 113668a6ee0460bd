"""`Token2Wav`: the loaded vocoder (shared, read-only) and its per-voice / per-turn state objects.

See the package docstring (`MiniCPMO45/token2wav/__init__.py`) for the call protocol. Over ~500 lines on purpose:
`Token2Wav` is one class whose turn methods (single and batched pushes) share its flow, vocoder and graph state.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..audio.rates import SPEECH_RATE
from ..host_copy import upload
from ..loader import CheckpointError, load_weights
from .assets import AssetLayout, detect_layout, read_weights
from .causal_hift import CausalHiFTGenerator
from .cfm import default_noise_table
from .crossfade_vocoder import CrossfadeState, CrossfadeVocoder
from .flow import (
    Flow,
    FlowCache,
    stack_flow_caches,
    trim_flow_cache,
    unstack_flow_cache,
)
from .flow_graphs import FlowGraphs, WindowRow
from .fold import fold_weight_norms
from .hift import HiFTGenerator, SourceNoise
from .hift_layers import fuse_snakes
from .hparams import F0PredictorParams, HiFTParams, causal_hift_params_from_yaml, flow_params_from_yaml
from .kv_store import KVSlot
from .streaming_vocoder import StreamingVocoder, VocoderState, default_source_noise_table

SILENCE_TOKEN = 4218
TURN_PREFIX = (SILENCE_TOKEN,) * 3
WINDOW_TOKENS = 28  # 25 new tokens + 3 look-ahead
WINDOW_ADVANCE = 25
DUPLEX_MIN_TOKENS = 8
HISTORY_FRAMES = 100  # flow attention history kept beyond the prompt (mel frames)

WindowRule = Literal["turn", "duplex"]


@dataclass(eq=False)
class PromptCache:
    """Everything derived from one reference voice; build once with `prepare_prompt`, share read-only."""

    prompt_tokens: torch.Tensor  # (1, n) long
    prompt_mel: torch.Tensor  # (1, 2n, 80)
    spk_embedding: torch.Tensor  # (1, 192)
    flow_cache: FlowCache  # after running the prompt (+ 3 look-ahead tokens) through the streaming flow

    @property
    def prompt_frames(self) -> int:
        return self.prompt_mel.shape[1]


@dataclass
class PushRequest:
    """One turn's share of a `push_codes_batch` call."""

    state: TurnState
    codes: Sequence[int]
    end_of_turn: bool = False
    flush: bool = False


@dataclass(eq=False)
class TurnState:
    """One spoken turn: token buffer, flow caches and vocoder state (owned, never shared).

    On the padded path (`use_graphs`) the estimator's keys live in the flow's `EstimatorStore` under
    `kv_slot` (its `flow_cache.estimator_kv` is then an empty placeholder; `Token2Wav.flow_cache_of` gives the
    official layout). The slot is given back when the turn's last chunk ran or the state is dropped."""

    prompt: PromptCache
    flow_cache: FlowCache
    vocoder: VocoderState | CrossfadeState
    rule: WindowRule
    buffer: list[int] = field(default_factory=lambda: list(TURN_PREFIX))
    finished: bool = False
    windows: int = 0
    kv_slot: KVSlot | None = None
    # the vocoder's first output starts with `delay_samples` zeros (the official streaming rule, which keeps
    # the audio aligned with the mel); a turn started with `lead_in=False` drops them: its speech starts at once
    drop_lead_in: bool = False

    def __post_init__(self) -> None:
        if self.kv_slot is not None:
            weakref.finalize(self, self.kv_slot.close)

    def clone(self) -> TurnState:
        """An independent snapshot (for rollback); the voice prompt stays shared."""
        return TurnState(
            self.prompt,
            self.flow_cache.clone(),
            self.vocoder.clone(),
            self.rule,
            list(self.buffer),
            self.finished,
            self.windows,
            None if self.kv_slot is None or self.kv_slot.closed else self.kv_slot.copy(),
            self.drop_lead_in,
        )


def fit_prompt_mel(prompt_mel: torch.Tensor, frames: int) -> torch.Tensor:
    """Trim, or pad by repeating the last frame, a (1, t, 80) mel to `frames` frames."""
    have = prompt_mel.shape[1]
    if have >= frames:
        return prompt_mel[:, :frames]
    if have == 0:
        raise ValueError("prompt mel is empty")
    tail = prompt_mel[:, -1:].expand(-1, frames - have, -1)
    return torch.cat([prompt_mel, tail], dim=1)


def _tensor(value: object, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype, device=device)


def pcm16_roundtrip(wav: np.ndarray) -> np.ndarray:
    """The duplex path's int16 trip: clip to [-1, 1], x32767 to int16 (truncating), back by /32768."""
    pcm = (np.clip(wav, -1.0, 1.0) * 32767.0).astype(np.int16)
    return pcm.astype(np.float32) / 32768.0


def duplex_unit_audio(pieces: Sequence[np.ndarray], last_unit: bool) -> np.ndarray | None:
    """The official duplex post-processing of one unit's pieces: join, int16 round trip, and left-pad a
    non-final unit with zeros to at least 1 s. None when the unit produced no audio."""
    if not pieces:
        return None
    audio = pcm16_roundtrip(np.concatenate(pieces))
    if audio.size == 0:
        return None
    if not last_unit and audio.size < SPEECH_RATE:
        audio = np.concatenate([np.zeros(SPEECH_RATE - audio.size, np.float32), audio])
    return audio


def _original_hift_params(state: dict[str, torch.Tensor]) -> HiFTParams:
    """Class defaults (the real sizes), with widths read from the weights so tiny checkpoints load too."""
    try:
        pre = state["conv_pre.parametrizations.weight.original1"]
        classifier = state["f0_predictor.classifier.weight"]
    except KeyError as exc:
        raise CheckpointError(f"original HiFT weights lack {exc}") from exc
    return HiFTParams(
        in_channels=pre.shape[1],
        base_channels=pre.shape[0],
        f0_predictor=F0PredictorParams(
            num_class=classifier.shape[0], in_channels=pre.shape[1], cond_channels=classifier.shape[1]
        ),
    )


class Token2Wav:
    """Speech tokens (25 Hz, ids 0..6560) -> 24 kHz float32 audio. Holds weights only; no session state."""

    def __init__(
        self,
        flow: Flow,
        original_hift: HiFTGenerator,
        streaming: StreamingVocoder | CrossfadeVocoder,
        layout: str,
        n_timesteps: int = 5,
        use_graphs: bool | None = None,
    ) -> None:
        """use_graphs: True runs all due flow windows of a round as one padded batch through `flow_graphs`
        (any window size, last-chunk flag, voice and cache length; CUDA graphs per padded shape when on
        CUDA, the same padded code eagerly elsewhere) and the causal HiFT's decoder network through
        `padded_graphs`. None (the default for now) and False keep the plain path, which batches only
        windows of equal shapes (kept for comparison). `flow_batches` counts flow batches run."""
        if n_timesteps <= 0:
            raise ValueError("n_timesteps must be positive")
        self.flow = flow
        self.original_hift = original_hift
        self.streaming = streaming
        self.layout = layout
        self.n_timesteps = n_timesteps
        self.sample_rate = SPEECH_RATE
        self.flow_graphs = FlowGraphs(flow, graphs=torch.cuda.is_available()) if use_graphs else None
        self.flow_batches = 0  # flow forward calls run so far (one per batch), for tests and benchmarks
        if use_graphs and isinstance(streaming, StreamingVocoder):
            streaming.use_padded_decode(graphs=torch.cuda.is_available())

    def fuse_kernels(self) -> None:
        """The flow estimator's blocks (`DiT.fuse_blocks`; a GPU's padded flow graphs are bound by their kernel
        count) and the HiFT's Snake activations (`fuse_snakes`; bound by memory traffic) as kernels fused by
        `torch.compile`. Compiles now (seconds)."""
        self.flow.decoder.estimator.fuse_blocks()
        fuse_snakes(self.streaming.model)

    @property
    def device(self) -> torch.device:
        return self.flow.input_embedding.weight.device

    @property
    def flow_dtype(self) -> torch.dtype:
        return self.flow.input_embedding.weight.dtype

    @classmethod
    def from_assets(
        cls,
        folder: str | Path,
        n_timesteps: int = 5,
        device: str | torch.device = "cpu",
        flow_noise: torch.Tensor | None = None,
        source_noise_table: torch.Tensor | None = None,
        use_graphs: bool | None = None,
        fold_weights: bool = True,
        flow_dtype: torch.dtype = torch.float32,
    ) -> Token2Wav:
        """Load `assets/token2wav/` (either layout). The noise tables default to fixed-seed draws.

        fold_weights: store the weight-normed convs' g * v / ||v|| once instead of per forward (inference
        only; False keeps the parametrizations, for comparisons). use_graphs: see `__init__`. flow_dtype:
        float16 halves the flow's weights and its per-turn caches (the official Token2wav offers float16 too;
        the vocoder after it stays float32)."""
        layout = detect_layout(folder)
        return cls.from_layout(
            layout, n_timesteps, device, flow_noise, source_noise_table, use_graphs, fold_weights, flow_dtype
        )

    @classmethod
    def from_layout(
        cls,
        layout: AssetLayout,
        n_timesteps: int = 5,
        device: str | torch.device = "cpu",
        flow_noise: torch.Tensor | None = None,
        source_noise_table: torch.Tensor | None = None,
        use_graphs: bool | None = None,
        fold_weights: bool = True,
        flow_dtype: torch.dtype = torch.float32,
    ) -> Token2Wav:
        params = flow_params_from_yaml(layout.flow_yaml)
        noise = flow_noise if flow_noise is not None else default_noise_table(params.output_size)
        flow = Flow(params, noise)
        load_weights(flow, read_weights(layout.flow_weights))

        streaming: StreamingVocoder | CrossfadeVocoder
        if layout.kind == "new":
            assert layout.config_yaml is not None and layout.hift_original_weights is not None
            original_state = read_weights(layout.hift_original_weights, strip_prefix="generator.")
            causal_params, _ = causal_hift_params_from_yaml(layout.config_yaml)
            causal = CausalHiFTGenerator(causal_params)
            load_weights(causal, read_weights(layout.hift_weights))
            causal = causal.to(device).eval()
            table = (
                source_noise_table
                if source_noise_table is not None
                else default_source_noise_table(causal.harmonics, causal_params.sampling_rate)
            )
            streaming = StreamingVocoder(causal, table.to(device))  # takes its float64 F0 copy first
            if fold_weights:
                fold_weight_norms(causal)
        else:
            original_state = read_weights(layout.hift_weights, strip_prefix="generator.")
        original = HiFTGenerator(_original_hift_params(original_state))
        load_weights(original, original_state)
        original = original.to(device).eval()
        if fold_weights:
            fold_weight_norms(original)
        flow = flow.to(device).eval()
        if fold_weights:
            fold_weight_norms(flow)
        for param in flow.parameters():  # buffers (noise, time frequencies) stay float32
            param.data = param.data.to(flow_dtype)
        if layout.kind == "old":
            streaming = CrossfadeVocoder(original)
        return cls(flow, original, streaming, layout.kind, n_timesteps, use_graphs)

    # ---- per voice -------------------------------------------------------------------------------

    @torch.inference_mode()
    def prepare_prompt(
        self,
        prompt_tokens: Sequence[int] | np.ndarray | torch.Tensor,
        prompt_mel: np.ndarray | torch.Tensor,
        spk_embedding: np.ndarray | torch.Tensor,
    ) -> PromptCache:
        """Run the voice prompt through the streaming flow once (prompt tokens + their first 3 as look-ahead).

        prompt_mel (1, t, 80) or (t, 80) is fitted to 2 frames per prompt token; spk_embedding (1, 192).
        """
        tokens = _tensor(prompt_tokens, torch.long, self.device).reshape(1, -1)
        lookahead = self.flow.lookahead
        if tokens.shape[1] < lookahead:
            raise ValueError(f"a voice prompt needs at least {lookahead} tokens, got {tokens.shape[1]}")
        mel = _tensor(prompt_mel, self.flow_dtype, self.device)
        if mel.ndim == 2:
            mel = mel[None]
        if mel.ndim != 3 or mel.shape[0] != 1 or mel.shape[2] != self.flow.p.output_size:
            raise ValueError(
                f"prompt mel must have shape (1, t, {self.flow.p.output_size}), got {tuple(mel.shape)}"
            )
        mel = fit_prompt_mel(mel, tokens.shape[1] * self.flow.up_rate)
        spk = _tensor(spk_embedding, self.flow_dtype, self.device).reshape(1, -1)
        if spk.shape[1] != self.flow.p.spk_embed_dim:
            raise ValueError(
                f"speaker embedding must have {self.flow.p.spk_embed_dim} values, got {spk.shape[1]}"
            )
        with_lookahead = torch.cat([tokens, tokens[:, :lookahead]], dim=1)
        cache = self.flow.setup_cache(with_lookahead, mel, spk, self.n_timesteps)
        return PromptCache(tokens, mel, spk, cache)

    # ---- whole utterance -------------------------------------------------------------------------

    @torch.inference_mode()
    def synthesize(
        self, tokens: Sequence[int] | np.ndarray, prompt: PromptCache, source_noise: SourceNoise | None = None
    ) -> np.ndarray:
        """The official `__call__`: flow over [prompt ; tokens], then the original HiFT. float32 (n*960,)."""
        gen = _tensor(tokens, torch.long, self.device).reshape(1, -1)
        if gen.shape[1] == 0:
            raise ValueError("whole-utterance synthesis needs at least one speech token")
        mel = self.flow.inference(
            gen, prompt.prompt_tokens, prompt.prompt_mel, prompt.spk_embedding, self.n_timesteps
        )
        wav, _, _ = self.original_hift(mel.float(), source_noise)
        return wav[0].float().cpu().numpy()

    # ---- streaming -------------------------------------------------------------------------------

    def start_turn(
        self, prompt: PromptCache, rule: WindowRule = "turn", phase: int | None = None, lead_in: bool = True
    ) -> TurnState:
        """A new spoken turn: the prompt's flow caches cloned, fresh vocoder state, 3 silence tokens. `phase`:
        the tick phase of the turn's session, whose half of the estimator store it takes a row in
        (`reserve_turns`, `EstimatorStore.open_empty`). `lead_in=False`: the turn's first audio comes without
        the vocoder's `delay_samples` of leading zeros (160 ms at 24 kHz), the same samples otherwise.

        New layout: the causal HiFT with bounded history. Old layout: the original HiFT with the 8-frame
        cross-fade rule (`crossfade_vocoder`).
        """
        if rule not in ("turn", "duplex"):
            raise ValueError(f"rule must be 'turn' or 'duplex', got {rule!r}")
        state = self.streaming.new_state()
        if self.flow_graphs is None:
            return TurnState(prompt, prompt.flow_cache.clone(), state, rule, drop_lead_in=not lead_in)
        base = prompt.flow_cache
        kv_slot = self.flow_graphs.store.open(base.estimator_kv, prompt.prompt_frames, HISTORY_FRAMES, phase)
        cache = FlowCache(
            base.conformer_cnn.clone(),
            base.conformer_att.clone(),
            base.estimator_conv.clone(),
            base.estimator_kv[:, :, :, :, :0],
        )
        return TurnState(prompt, cache, state, rule, kv_slot=kv_slot, drop_lead_in=not lead_in)

    def reserve_turns(self, prompt: PromptCache, turns: int, phases: int = 1) -> None:
        """Padded path: allocate the estimator store for `turns` concurrent turns of this voice up front, in one
        half per tick phase with two `phases` (no-op on the plain path)."""
        if self.flow_graphs is not None:
            base = prompt.flow_cache.estimator_kv
            self.flow_graphs.store.reserve(base, prompt.prompt_frames, HISTORY_FRAMES, turns, phases)

    def flow_cache_of(self, state: TurnState) -> FlowCache:
        """The turn's flow cache in the official layout (the estimator keys gathered from the store in their
        stored order on the padded path): for comparisons and inspection."""
        if state.kv_slot is None or state.kv_slot.closed:
            return state.flow_cache
        cache = state.flow_cache
        return FlowCache(cache.conformer_cnn, cache.conformer_att, cache.estimator_conv, state.kv_slot.keys())

    @torch.inference_mode()
    def stream_window(self, state: TurnState, tokens: Sequence[int], last_chunk: bool) -> np.ndarray:
        """The official `stream()`: one window (new tokens + 3 look-ahead unless last) -> float32 audio."""
        return self.stream_windows([(state, tokens, last_chunk)])[0]

    @torch.inference_mode()
    def stream_windows(self, windows: Sequence[tuple[TurnState, Sequence[int], bool]]) -> list[np.ndarray]:
        """One window for each of several turns. With `use_graphs` the flow runs every non-empty window as
        one padded batch (at most 64 rows each); the plain path batches turns whose windows have the same
        size, kind and cache shapes. The vocoder runs one batch per block round. Each turn may appear once.
        Returns the audio of each window, in order."""
        if len({id(state) for state, _, _ in windows}) != len(windows):
            raise ValueError("a turn can have only one window per call")
        vocab = self.flow.p.vocab_size
        token_lists = []
        for state, tokens, last_chunk in windows:
            if state.finished:
                raise ValueError("this turn has already been flushed; start a new turn")
            if not last_chunk and len(tokens) <= self.flow.lookahead:
                raise ValueError(
                    f"a non-final window needs more than {self.flow.lookahead} tokens, got {len(tokens)}"
                )
            ids = [int(t) for t in tokens]
            if any(not 0 <= t < vocab for t in ids):  # checked here, not on the device (no sync)
                raise ValueError(f"speech tokens must lie in 0..{vocab - 1}")
            token_lists.append(ids)
        mels: list[torch.Tensor | None] = [None] * len(windows)
        if self.flow_graphs is not None:
            self._static_flow(windows, token_lists, mels)
        else:
            self._plain_flow(windows, token_lists, mels)
        full_mels = [
            mel.float() if mel is not None else torch.zeros(1, self.flow.p.output_size, 0, device=self.device)
            for mel in mels
        ]
        states = [state for state, _, _ in windows]
        finals = [last_chunk for _, _, last_chunk in windows]
        wavs = self.streaming.stream_batch([st.vocoder for st in states], full_mels, finals)  # type: ignore[arg-type]
        # One finiteness check and one device-to-host copy for all turns (each was a sync per turn).
        joined = torch.cat([wav[0].float() for wav in wavs]) if wavs else torch.zeros(0)
        if not torch.isfinite(joined).all():
            raise RuntimeError("the streaming vocoder returned non-finite audio")
        host = joined.cpu().numpy()
        out, start = [], 0
        for state, last_chunk, wav in zip(states, finals, wavs, strict=True):
            state.windows += 1
            if last_chunk:
                state.finished = True
                if state.kv_slot is not None:
                    state.kv_slot.close()
            audio = host[start : start + wav.shape[1]]
            start += wav.shape[1]
            if state.drop_lead_in and audio.size:  # its first output: zeros led it unless it was the last
                state.drop_lead_in = False
                audio = audio if last_chunk else audio[self.streaming.delay_samples :]
            out.append(audio)
        return out

    @staticmethod
    def _flow_groups(
        windows: Sequence[tuple[TurnState, Sequence[int], bool]],
    ) -> dict[tuple[int, bool, int, tuple[tuple[int, ...], ...]], list[int]]:
        """Plain path: windows that can share a flow batch (equal size, kind, prompt length, cache shapes)."""
        groups: dict[tuple[int, bool, int, tuple[tuple[int, ...], ...]], list[int]] = {}
        for i, (state, tokens, last_chunk) in enumerate(windows):
            if len(tokens):
                key = (len(tokens), last_chunk, state.prompt.prompt_frames, state.flow_cache.shape_key())
                groups.setdefault(key, []).append(i)
        return groups

    def _plain_flow(
        self,
        windows: Sequence[tuple[TurnState, Sequence[int], bool]],
        token_lists: list[list[int]],
        mels: list[torch.Tensor | None],
    ) -> None:
        low_layers = len(self.flow.encoder.encoders)
        for (_, last_chunk, _, _), members in self._flow_groups(windows).items():
            states = [windows[i][0] for i in members]
            ids = upload([token_lists[i] for i in members], self.device, torch.long)
            spk = torch.cat([st.prompt.spk_embedding for st in states], dim=0)
            batched = stack_flow_caches([st.flow_cache for st in states])
            self.flow_batches += 1
            mel, new = self.flow.chunk_forward(ids, spk, batched, last_chunk, self.n_timesteps)
            caches = unstack_flow_cache(new, len(members))
            for row, (i, st, cache) in enumerate(zip(members, states, caches, strict=True)):
                st.flow_cache = trim_flow_cache(cache, st.prompt.prompt_frames, HISTORY_FRAMES, low_layers)
                mels[i] = mel[row : row + 1]

    def _static_flow(
        self,
        windows: Sequence[tuple[TurnState, Sequence[int], bool]],
        token_lists: list[list[int]],
        mels: list[torch.Tensor | None],
    ) -> None:
        """The flow part of `stream_windows` through `flow_graphs`: every non-empty window in one padded
        batch (one per 64 store slots), whatever its size, kind and cache length. Fills `mels` and each
        turn's conformer caches (cut to prompt + history); the estimator keys stay in the store."""
        assert self.flow_graphs is not None
        due = [i for i, tokens in enumerate(token_lists) if tokens]
        if not due:
            return
        rows = []
        for i in due:
            state, _, last_chunk = windows[i]
            if state.kv_slot is None or state.kv_slot.closed:
                raise ValueError("this turn was not started by this vocoder's padded path")
            prompt = state.prompt
            rows.append(
                WindowRow(
                    token_lists[i],
                    last_chunk,
                    state.flow_cache,
                    prompt.spk_embedding,
                    prompt.prompt_frames + HISTORY_FRAMES,
                    state.kv_slot,
                    prompt.prompt_frames,
                )
            )

        def done(k: int, mel: torch.Tensor, cache: FlowCache) -> None:
            # the turn drops its old cache here (already cut to prompt + history by `split_rows`)
            windows[due[k]][0].flow_cache = cache
            mels[due[k]] = mel

        before = self.flow_graphs.calls
        self.flow_graphs.run(rows, self.n_timesteps, done)
        self.flow_batches += self.flow_graphs.calls - before

    def _take_codes(self, state: TurnState, codes: Sequence[int]) -> None:
        if state.finished:
            raise ValueError("this turn has already been flushed; start a new turn")
        vocab = self.flow.p.vocab_size
        for code in codes:
            if not 0 <= int(code) < vocab:
                raise ValueError(f"speech token {code} is outside 0..{vocab - 1}")
        state.buffer.extend(int(c) for c in codes)

    def _next_window(self, state: TurnState, flush: bool) -> tuple[int, int] | None:
        """(tokens to send, tokens to drop) of the next non-final window, or None if none is due."""
        n = len(state.buffer)
        if n >= WINDOW_TOKENS:
            return WINDOW_TOKENS, WINDOW_ADVANCE
        if state.rule == "duplex" and flush and n >= DUPLEX_MIN_TOKENS:
            return n, min(WINDOW_ADVANCE, n - self.flow.lookahead)
        return None

    def iter_push_codes(
        self, state: TurnState, codes: Sequence[int], end_of_turn: bool = False, flush: bool = False
    ) -> Iterator[np.ndarray]:
        """Like `push_codes`, but yields each window's audio as soon as it is computed."""
        self._take_codes(state, codes)
        while (window := self._next_window(state, flush)) is not None:
            size, advance = window
            wav = self.stream_window(state, state.buffer[:size], last_chunk=False)
            del state.buffer[:advance]
            if wav.size:
                yield wav
        if end_of_turn:
            rest, state.buffer = state.buffer, []
            wav = self.stream_window(state, rest, last_chunk=True)
            if wav.size:
                yield wav

    def push_codes(
        self, state: TurnState, codes: Sequence[int], end_of_turn: bool = False, flush: bool = False
    ) -> list[np.ndarray]:
        """Append speech tokens to the turn and return the audio pieces (float32, 24 kHz) now ready.

        Windows of 28 tokens (25 new + 3 look-ahead) go out whenever 28 are buffered, then 25 are dropped.
        `flush` (duplex rule only; the official duplex path does this when a unit's codes carry a chunk
        terminator, or on force-flush) also sends shorter windows: min(28, n) tokens while n >= 8,
        dropping min(25, n - 3). `end_of_turn` sends the rest as the last chunk and flushes the vocoder.
        """
        return list(self.iter_push_codes(state, codes, end_of_turn, flush))

    def push_codes_batch(self, requests: Sequence[PushRequest]) -> list[list[np.ndarray]]:
        """`push_codes` for several turns at once, running their windows round by round through
        `stream_windows`: each round takes every turn's next due window, or its last chunk once no window
        is due and the request ends the turn. Same audio as one call per turn."""
        if len({id(r.state) for r in requests}) != len(requests):
            raise ValueError("a turn can appear only once per batch")
        for r in requests:
            self._take_codes(r.state, r.codes)
        results: list[list[np.ndarray]] = [[] for _ in requests]
        closed: set[int] = set()
        while True:
            batch: list[tuple[TurnState, Sequence[int], bool]] = []
            advance: list[tuple[int, int | None]] = []
            for i, r in enumerate(requests):
                window = self._next_window(r.state, r.flush)
                if window is not None:
                    batch.append((r.state, r.state.buffer[: window[0]], False))
                    advance.append((i, window[1]))
                elif r.end_of_turn and i not in closed:
                    rest, r.state.buffer = r.state.buffer, []
                    batch.append((r.state, rest, True))
                    advance.append((i, None))
                    closed.add(i)
            if not batch:
                return results
            for (i, drop), wav in zip(advance, self.stream_windows(batch), strict=True):
                if drop is not None:
                    del requests[i].state.buffer[:drop]
                if wav.size:
                    results[i].append(wav)
