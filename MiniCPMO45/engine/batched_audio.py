"""The streaming audio encoder for many sessions at once.

Sessions whose chunk has the same shape (mel frames, redundancy frames) and whose encoder caches have the same
length run as one batch through `WhisperEncoder`: the same operations as `forward_stream`, with the batch
dimension filled by sessions. Lockstep sessions (started in the same unit) always share one group; sessions
at different points of their call form one group per cache length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model import MiniCPMO
from ..modules.whisper import WhisperStreamCache, cnn_frames


def _stream_group(
    model: MiniCPMO, mel: torch.Tensor, caches: Sequence[WhisperStreamCache], prefix: int, suffix: int
) -> torch.Tensor:
    enc = model.apm
    assert enc is not None
    if caches[0].layers and caches[0].length + cnn_frames(mel.shape[-1]) >= enc.max_positions:
        for c in caches:
            c.clear()
            c.resets += 1
    x = enc._cnn(mel.to(model.device, model.dtype))
    drop_front = (prefix + 1) // 2 if prefix > 0 else 0
    drop_back = (suffix + 1) // 2 if suffix > 0 else 0
    x = x[:, drop_front:]
    if 0 < drop_back < x.shape[1]:
        x = x[:, :-drop_back]
    past, n = caches[0].length, x.shape[1]
    idx = torch.arange(past, past + n, device=x.device).clamp(max=enc.max_positions - 1)
    x = x + enc.embed_positions.weight[idx]
    stacked = [
        (torch.cat([c.layers[i][0] for c in caches]), torch.cat([c.layers[i][1] for c in caches]))
        if past
        else None
        for i in range(len(enc.layers))
    ]
    new_layers = []
    for i, layer in enumerate(enc.layers):
        x, kv = layer(x, None, stacked[i])
        new_layers.append(kv)
    for b, c in enumerate(caches):
        c.layers = [(k[b : b + 1], v[b : b + 1]) for k, v in new_layers]
    return model._project_audio(enc.layer_norm(x))


def stream_audio_embeds(
    model: MiniCPMO,
    mels: Sequence[torch.Tensor],
    caches: Sequence[WhisperStreamCache],
    prefix_frames: Sequence[int],
    suffix_frames: Sequence[int],
) -> list[torch.Tensor]:
    """`model.audio_embeds_stream` for many sessions: mels[i] `[n_mels, F_i]` → `[P_i, D]` each."""
    if model.apm is None:
        raise RuntimeError("this model was built without the audio encoder")
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    for i, (m, c, p, s) in enumerate(zip(mels, caches, prefix_frames, suffix_frames, strict=True)):
        groups.setdefault((int(m.shape[-1]), c.length, int(p), int(s)), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(mels)
    for (_, _, p, s), rows in groups.items():
        mel = torch.stack([mels[i] for i in rows])
        emb = _stream_group(model, mel, [caches[i] for i in rows], p, s)
        for b, i in enumerate(rows):
            out[i] = emb[b]
    return [o for o in out if o is not None]
