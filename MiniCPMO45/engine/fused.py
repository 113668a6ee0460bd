"""The two halves of a decoder layer around its attention, as fused kernels on a GPU.

A static decode step at small batch is bound by its kernel count, not by its math: each layer launches some
30 kernels, most of them small element-wise ones (RMSNorm, the RoPE halves, casts, the residual adds, SiLU
times up). Here the work before the attention (input norm, q/k/v projections, q/k norms, RoPE) and the work
after it (output projection, residual, post norm, SwiGLU MLP, residual) are plain functions that take the
layer's weights as tensors. On CUDA they go through `torch.compile` with dynamic shapes, so one compile serves
every layer of a model and every row bucket, and Inductor fuses the element-wise work around the cuBLAS
matmuls. The KV write and the attention stay outside (the caller's). Elsewhere (tests, the CPU) the same
functions run eagerly and give exactly what the modules' own forwards give.

Compiled, the results differ from the eager ones by bfloat16 rounding only (the fused kernels keep float32
between the ops they merge).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .flex_decode import flex_available


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's tensors, in the order the fused halves take them. `qkv` is (q, k, v) or, after
    `merge_projections`, the one tensor that holds all three (one matmul); `gate_up` likewise."""

    input_norm: torch.Tensor
    qkv: tuple[torch.Tensor, ...]
    q_rows: int  # output rows of q (where a merged qkv splits)
    q_norm: torch.Tensor | None  # Qwen3 normalises q and k per head; the TTS's Llama does not
    k_norm: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: tuple[torch.Tensor, ...]
    down: torch.Tensor


def layer_weights(layer: nn.Module) -> LayerWeights:
    """The tensors of a Qwen3 or Llama-style (TTS) decoder layer."""
    attn, mlp = layer.self_attn, layer.mlp
    q_norm = getattr(attn, "q_norm", None)
    k_norm = getattr(attn, "k_norm", None)
    qkv = getattr(attn, "qkv_weight", None)
    gate_up = getattr(mlp, "gate_up_weight", None)
    return LayerWeights(
        input_norm=layer.input_layernorm.weight,
        qkv=(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight) if qkv is None else (qkv,),
        q_rows=attn.q_proj.weight.shape[0],
        q_norm=None if q_norm is None else q_norm.weight,
        k_norm=None if k_norm is None else k_norm.weight,
        o=attn.o_proj.weight,
        post_norm=layer.post_attention_layernorm.weight,
        gate_up=(mlp.gate_proj.weight, mlp.up_proj.weight) if gate_up is None else (gate_up,),
        down=mlp.down_proj.weight,
    )


@torch.no_grad()
def merge_projections(layer: nn.Module) -> None:
    """Give a layer's q/k/v weights one storage, and its gate/up weights another: the fused halves then run one
    matmul for each group (fewer, larger kernels; a decode step at small batch is bound by its kernel count).
    The modules' own weights become views of the merged tensors, so no memory is added and their forwards are
    unchanged. Layers with projection biases are left alone."""
    groups = ((layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_weight"),)
    groups += ((layer.mlp, ("gate_proj", "up_proj"), "gate_up_weight"),)
    for owner, names, attr in groups:
        linears = [getattr(owner, n) for n in names]
        if hasattr(owner, attr) or any(m.bias is not None for m in linears):
            continue
        merged = torch.cat([m.weight for m in linears])
        at = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight = nn.Parameter(merged[at : at + rows], requires_grad=False)
            at += rows
        setattr(owner, attr, merged)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, heads, T, hd]`, cos/sin `[B, T, hd]`; the half-split ("rotate half") layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention_inputs(
    x: torch.Tensor,
    input_norm: torch.Tensor,
    qkv: tuple[torch.Tensor, ...],
    q_rows: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x `[B, T, D]` (the residual stream) -> q `[B, heads, T, hd]`, k and v `[B, kv_heads, T, hd]`, RoPE'd."""
    b, t, _ = x.shape
    h = _rms(x, input_norm, eps)
    if len(qkv) == 1:
        kv_rows = (qkv[0].shape[0] - q_rows) // 2
        q, k, v = F.linear(h, qkv[0]).split([q_rows, kv_rows, kv_rows], dim=-1)
    else:
        q, k, v = (F.linear(h, w) for w in qkv)
    q, k, v = (y.reshape(b, t, -1, head_dim) for y in (q, k, v))
    if q_norm is not None and k_norm is not None:
        q, k = _rms(q, q_norm, eps), _rms(k, k_norm, eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def layer_output(
    x: torch.Tensor,
    attn: torch.Tensor,
    wo: torch.Tensor,
    post_norm: torch.Tensor,
    gate_up: tuple[torch.Tensor, ...],
    w_down: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """The layer's output from its input `x [B, T, D]` and the attention result `attn [B, T, heads*hd]`."""
    x = x + F.linear(attn, wo)
    h = _rms(x, post_norm, eps)
    if len(gate_up) == 1:
        gate, up = F.linear(h, gate_up[0]).chunk(2, dim=-1)
    else:
        gate, up = F.linear(h, gate_up[0]), F.linear(h, gate_up[1])
    return x + F.linear(F.silu(gate) * up, w_down)


@dataclass
class LayerKernels:
    """The two halves, eager or compiled; `compiled` says which."""

    attention_inputs: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    layer_output: Callable[..., torch.Tensor]
    compiled: bool

    def inputs(
        self,
        w: LayerWeights,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        eps: float,
        head_dim: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of layer `w` for the residual stream x."""
        return self.attention_inputs(
            x, w.input_norm, w.qkv, w.q_rows, w.q_norm, w.k_norm, cos, sin, eps, head_dim
        )

    def output(self, w: LayerWeights, x: torch.Tensor, attn: torch.Tensor, eps: float) -> torch.Tensor:
        """Layer `w`'s output from its input x and its attention result."""
        return self.layer_output(x, attn, w.o, w.post_norm, w.gate_up, w.down, eps)


EAGER = LayerKernels(attention_inputs, layer_output, compiled=False)
_compiled: LayerKernels | None = None


def compile_kernels(backend: Any = "inductor") -> LayerKernels:
    """Both halves through `torch.compile` with dynamic shapes and no graph break allowed (tests pass a
    tracing-only backend)."""
    import torch.fx.experimental._config as fx_config

    # without this, sizes that happen to be equal (8 rows, 8 kv heads) are unified and a later bucket recompiles
    fx_config.use_duck_shape = False
    options: dict[str, Any] = {"dynamic": True, "fullgraph": True, "backend": backend}
    return LayerKernels(
        torch.compile(attention_inputs, **options), torch.compile(layer_output, **options), compiled=True
    )


def compiled_kernels() -> LayerKernels:
    """The Inductor-compiled halves, built once per process (Inductor compiles at the first call of each shape
    family)."""
    global _compiled
    if _compiled is None:
        _compiled = compile_kernels()
    return _compiled


def kernels_for(device: torch.device, fused: bool) -> LayerKernels:
    """Compiled halves on CUDA with Triton (what FlexAttention needs too) when asked for, the eager ones
    otherwise."""
    return compiled_kernels() if fused and flex_available(device) else EAGER
