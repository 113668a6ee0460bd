"""`Token2Wav.push_codes` for many turns at once: the flow (conformer + 5 DiT steps with CFG) of every window
that has the same shape runs as one batch; the causal HiFT then streams each session's mel on its own state.

Windows follow the same rules as `Token2Wav.iter_push_codes` (duplex: while >= 8 tokens are buffered, send
min(28, n) and drop min(25, n - 3); turn: 28 / 25; end of turn: the rest with `last_chunk`), taken in rounds:
round r computes every turn's r-th window. Windows are batched when their token count, last-chunk flag and
flow-cache shapes agree (lockstep sessions at the same point of a turn always do). The flow's per-session
caches are stacked along their batch axes (the estimator's axis holds CFG [cond; uncond] pairs, so the batch
is laid out [cond_1..cond_B; uncond_1..uncond_B], matching `mu` and its zero twin).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..token2wav import Token2Wav, TurnState
from ..token2wav.cfm import FlowSampler, cosine_time_grid
from ..token2wav.flow import Flow, FlowCache, trim_flow_cache
from ..token2wav.model import DUPLEX_MIN_TOKENS, HISTORY_FRAMES, WINDOW_ADVANCE, WINDOW_TOKENS


def _sample_chunk(
    sampler: FlowSampler,
    mu: torch.Tensor,
    spks: torch.Tensor,
    n_steps: int,
    conv: torch.Tensor,
    kv: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`FlowSampler.sample_chunk` for a batch of B rows (the same noise offset for all of them)."""
    b = mu.shape[0]
    x = sampler._noise(kv.shape[4], mu.shape[2], mu).expand(b, -1, -1)
    grid = cosine_time_grid(n_steps, mu.dtype).to(mu.device)
    mu2 = torch.cat([mu, torch.zeros_like(mu)], dim=0)
    spks2 = torch.cat([spks, torch.zeros_like(spks)], dim=0)
    cond2 = torch.zeros_like(mu2)
    t = grid[0:1]
    dt = grid[1] - grid[0]
    new_conv, new_kv = [], []
    for step in range(1, n_steps + 1):
        v, c, k = sampler.estimator.forward_chunk(
            x.repeat(2, 1, 1), mu2, t.repeat(2 * b), spks2, cond2, conv[step - 1], kv[step - 1]
        )
        new_conv.append(c)
        new_kv.append(k)
        x = x + dt * sampler._guided(v)
        t = t + dt
        if step < n_steps:
            dt = grid[step + 1] - t
    return x, torch.stack(new_conv, dim=0), torch.stack(new_kv, dim=0)


def _pairs(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t.narrow(axis, 0, 1), t.narrow(axis, 1, 1)


def flow_chunk_batched(
    flow: Flow,
    tokens: torch.Tensor,
    spks: torch.Tensor,
    caches: Sequence[FlowCache],
    last_chunk: bool,
    n_steps: int,
) -> tuple[torch.Tensor, list[FlowCache]]:
    """`Flow.inference_chunk` for B windows of equal shape: tokens `[B, n]`, spks `[B, 192]`."""
    if tokens.ndim != 2 or (tokens.numel() and int(tokens.max()) >= flow.p.vocab_size):
        raise ValueError(f"tokens must be [B, n] ids below {flow.p.vocab_size}")
    b = tokens.shape[0]
    cnn = torch.cat([c.conformer_cnn for c in caches], dim=0)
    att = torch.cat([c.conformer_att for c in caches], dim=1)
    conv_pairs = [_pairs(c.estimator_conv, 2) for c in caches]
    kv_pairs = [_pairs(c.estimator_kv, 2) for c in caches]
    conv = torch.cat([p[0] for p in conv_pairs] + [p[1] for p in conv_pairs], dim=2)
    kv = torch.cat([p[0] for p in kv_pairs] + [p[1] for p in kv_pairs], dim=2)
    h, cnn_new, att_new = flow.encoder.forward_chunk(flow.input_embedding(tokens), last_chunk, cnn, att)
    mu = flow.encoder_proj(h).transpose(1, 2)
    mel, conv_new, kv_new = _sample_chunk(flow.decoder, mu, flow._speaker(spks), n_steps, conv, kv)
    out = []
    for i in range(b):
        out.append(
            FlowCache(
                cnn_new[i : i + 1],
                att_new[:, i : i + 1],
                torch.cat([conv_new[:, :, i : i + 1], conv_new[:, :, b + i : b + i + 1]], dim=2),
                torch.cat([kv_new[:, :, i : i + 1], kv_new[:, :, b + i : b + i + 1]], dim=2),
            )
        )
    return mel, out


def _next_window(turn: TurnState, lookahead: int, flush: bool) -> tuple[list[int], bool] | None:
    """The turn's next window (tokens, last_chunk), its buffer advanced; None when nothing is due."""
    buf = turn.buffer
    if turn.rule == "duplex" and len(buf) >= DUPLEX_MIN_TOKENS:
        size = min(WINDOW_TOKENS, len(buf))
        tokens = buf[:size]
        del buf[: min(WINDOW_ADVANCE, len(buf) - lookahead)]
        return tokens, False
    if turn.rule == "turn" and len(buf) >= WINDOW_TOKENS:
        tokens = buf[:WINDOW_TOKENS]
        del buf[:WINDOW_ADVANCE]
        return tokens, False
    if flush:
        tokens, turn.buffer = list(buf), []
        return tokens, True
    return None


@torch.inference_mode()
def push_codes_batched(
    t2w: Token2Wav, turns: Sequence[TurnState], codes: Sequence[Sequence[int]], end_of_turn: Sequence[bool]
) -> list[list[np.ndarray]]:
    """Append codes to every turn and return each turn's audio pieces now ready (as `push_codes` would)."""
    if not (len(turns) == len(codes) == len(end_of_turn)):
        raise ValueError("one code list and one end_of_turn flag per turn")
    if t2w.layout != "new":  # the old layout's cross-fade vocoder: per session
        return [t2w.push_codes(t, list(c), e) for t, c, e in zip(turns, codes, end_of_turn, strict=True)]
    vocab = t2w.flow.p.vocab_size
    for turn, cs in zip(turns, codes, strict=True):
        if turn.finished:
            raise ValueError("this turn has already been flushed; start a new turn")
        for code in cs:
            if not 0 <= int(code) < vocab:
                raise ValueError(f"speech token {code} is outside 0..{vocab - 1}")
        turn.buffer.extend(int(c) for c in cs)
    out: list[list[np.ndarray]] = [[] for _ in turns]
    flush = list(end_of_turn)
    lookahead = t2w.flow.lookahead
    while True:
        jobs: dict[tuple, list[tuple[int, list[int]]]] = {}
        for k, turn in enumerate(turns):
            if turn.finished:
                continue
            window = _next_window(turn, lookahead, flush[k])
            if window is None:
                continue
            tokens, last = window
            if last:
                flush[k] = False
            c = turn.flow_cache
            key = (len(tokens), last, c.conformer_att.shape, c.estimator_kv.shape, c.conformer_cnn.shape)
            jobs.setdefault(key, []).append((k, tokens))
        if not jobs:
            return out
        for (count, last, *_), group in jobs.items():
            rows = [turns[k] for k, _ in group]
            if count:
                ids = torch.tensor([t for _, t in group], dtype=torch.long, device=t2w.device)
                spks = torch.cat([r.prompt.spk_embedding for r in rows])
                mel, caches = flow_chunk_batched(
                    t2w.flow, ids, spks, [r.flow_cache for r in rows], last, t2w.n_timesteps
                )
                for r, cache in zip(rows, caches, strict=True):
                    r.flow_cache = trim_flow_cache(
                        cache, r.prompt.prompt_frames, HISTORY_FRAMES, len(t2w.flow.encoder.encoders)
                    )
            else:
                mel = torch.zeros(len(rows), t2w.flow.p.output_size, 0, device=t2w.device)
            for i, ((k, _), r) in enumerate(zip(group, rows, strict=True)):
                wav = t2w.streaming.stream(r.vocoder, mel[i : i + 1], final=last)  # type: ignore[arg-type]
                if not torch.isfinite(wav).all():
                    raise RuntimeError("the streaming vocoder returned non-finite audio")
                r.windows += 1
                if last:
                    r.finished = True
                pcm = wav[0].float().cpu().numpy()
                if pcm.size:
                    out[k].append(pcm)
