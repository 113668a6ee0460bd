"""How a speech-code distribution is made from the TTS logits, batched over sessions.

Order (official): divide by temperature; repetition penalty over the last `window` codes of the history
(a logit seen n times is multiplied by penalty**n when negative and divided by it otherwise); then, where
enabled, top-p and then top-k, each keeping at least `min_tokens_to_keep` codes; then the caller may forbid EOS;
then softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..host_copy import upload


@dataclass(frozen=True)
class CodeSampling:
    temperature: float = 0.8
    repetition_penalty: float = 1.05
    window: int = 16
    top_p: float | None = None
    top_k: int | None = None
    min_tokens_to_keep: int = 3

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")


# §3.3.3: duplex units sample with temperature and repetition penalty only.
DUPLEX_SAMPLING = CodeSampling(temperature=0.8, repetition_penalty=1.05, window=16)
# §3.1 / §3.4: turn-based streaming, half-duplex and the non-streaming `generate` also use top-p and top-k.
TURN_SAMPLING = CodeSampling(temperature=0.8, repetition_penalty=1.05, window=16, top_p=0.85, top_k=25)


def penalize_repeats(
    logits: torch.Tensor, history: list[list[int]], penalty: float, window: int
) -> torch.Tensor:
    """logits `[B, V]`; history[b] the codes row b has produced (only the last `window` count)."""
    if penalty == 1.0 or not any(history):
        return logits
    b, vocab = logits.shape
    recent = [h[-window:] for h in history]
    width = max(len(r) for r in recent)
    # pad with an extra column index `vocab` that is dropped after counting
    padded = [r + [vocab] * (width - len(r)) for r in recent]
    ids = upload(padded, logits.device)  # queued, not a pageable copy that waits for the device
    counts = torch.zeros(b, vocab + 1, dtype=torch.long, device=logits.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids))
    alpha = torch.pow(penalty, counts[:, :vocab]).to(logits.dtype)
    return torch.where(logits < 0, logits * alpha, logits / alpha)


def keep_top_p(logits: torch.Tensor, top_p: float, min_keep: int) -> torch.Tensor:
    """Drop the least likely codes whose cumulative probability stays within 1 - top_p."""
    ascending, order = torch.sort(logits, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -min_keep:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def keep_top_k(logits: torch.Tensor, top_k: int, min_keep: int) -> torch.Tensor:
    k = min(max(top_k, min_keep), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def code_distribution(
    logits: torch.Tensor,
    history: list[list[int]],
    params: CodeSampling,
    warp: list[bool],
    forbid_eos: list[bool],
    eos_id: int,
) -> torch.Tensor:
    """Probabilities `[B, V]` from raw head logits `[B, V]` (float32 math)."""
    # a [1, 1] tensor, not a Python scalar: scalar division may be computed as a multiply by the reciprocal
    temperature = torch.full((1, 1), params.temperature, dtype=torch.float32, device=logits.device)
    scores = logits.float() / temperature
    scores = penalize_repeats(scores, history, params.repetition_penalty, params.window)
    if (params.top_p is not None or params.top_k is not None) and any(warp):
        warped = scores
        if params.top_p is not None:
            warped = keep_top_p(warped, params.top_p, params.min_tokens_to_keep)
        if params.top_k is not None:
            warped = keep_top_k(warped, params.top_k, params.min_tokens_to_keep)
        rows = upload(warp, scores.device, torch.bool)[:, None]
        scores = torch.where(rows, warped, scores)
    if any(forbid_eos):
        # a mask fill, not boolean indexing: that reads the mask back to the host (a sync per draw on a GPU)
        scores[:, eos_id].masked_fill_(upload(forbid_eos, scores.device, torch.bool), float("-inf"))
    return torch.softmax(scores, dim=-1)
