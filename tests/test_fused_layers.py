"""The layer halves of `engine.fused` against the modules' own forwards, eager and traced by `torch.compile`
(dynamic shapes, no graph break, one trace for every layer and row count: what Inductor compiles on a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from MiniCPMO45.engine.fused import EAGER, LayerKernels, compile_kernels, layer_weights, merge_projections
from MiniCPMO45.loader import load_weights
from MiniCPMO45.model import MiniCPMO
from MiniCPMO45.modules.compiled import fallback_on_error
from MiniCPMO45.modules.qwen3 import apply_rope
from MiniCPMO45.modules.siglip import encoder_layer
from MiniCPMO45.modules.tts_backbone import LLAMA_ROPE_THETA, rope_cos_sin
from MiniCPMO45.token2wav.dit import DiT
from MiniCPMO45.token2wav.hparams import flow_params_from_yaml


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> MiniCPMO:
    return MiniCPMO.from_pretrained(tiny_model_dir, dtype=torch.float32)


def module_layer(
    layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qk_norm: bool
):
    """The layer through its modules, with plain causal attention (what the halves surround)."""
    attn = layer.self_attn
    b, t, _ = x.shape
    hd = attn.head_dim
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(b, t, -1, hd)
    k = attn.k_proj(h).view(b, t, -1, hd)
    v = attn.v_proj(h).view(b, t, -1, hd).transpose(1, 2)
    if qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
    out = attend(q, k, v)
    x = x + attn.o_proj(out)
    return q, k, v, x + layer.mlp(layer.post_attention_layernorm(x))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def fused_layer(kernels: LayerKernels, layer: torch.nn.Module, x, cos, sin):
    w = layer_weights(layer)
    eps = layer.input_layernorm.eps
    q, k, v = kernels.inputs(w, x, cos, sin, eps, layer.self_attn.head_dim)
    return q, k, v, kernels.output(w, x, attend(q, k, v), eps)


class CountingBackend:
    """A tracing-only `torch.compile` backend that counts the graphs it is handed."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("part", ["llm", "tts"])
@torch.no_grad()
def test_fused_halves_match_the_modules(tiny_model_dir: Path, part: str, merged: bool) -> None:
    torch._dynamo.reset()
    model = MiniCPMO.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if part == "llm":
        layers = list(model.llm.model.layers)
        rotary = model.llm.model.rotary
    else:
        assert model.tts is not None
        layers = list(model.tts.model.layers)
        rotary = None
    if merged:
        for layer in layers:
            merge_projections(layer)
            w = layer_weights(layer)
            assert len(w.qkv) == len(w.gate_up) == 1
            # the modules' weights are views of the merged tensors: no memory added
            assert (
                layer.self_attn.k_proj.weight.untyped_storage().data_ptr()
                == w.qkv[0].untyped_storage().data_ptr()
            )
            assert (
                layer.mlp.up_proj.weight.untyped_storage().data_ptr()
                == w.gate_up[0].untyped_storage().data_ptr()
            )
    backend = CountingBackend()
    traced = compile_kernels(backend)
    g = torch.Generator().manual_seed(3)
    dim = layers[0].input_layernorm.weight.shape[0]
    hd = layers[0].self_attn.head_dim
    for b, t in ((2, 5), (3, 5), (4, 7)):
        x = torch.randn(b, t, dim, generator=g)
        positions = torch.arange(t)[None].expand(b, t) + torch.arange(b)[:, None] * 3
        if rotary is not None:
            cos, sin = rotary(positions, x.dtype)
        else:
            cos, sin = rope_cos_sin(positions, hd, LLAMA_ROPE_THETA, x.dtype)
        for layer in layers:
            want = module_layer(layer, x, cos, sin, qk_norm=part == "llm")
            eager = fused_layer(EAGER, layer, x, cos, sin)
            got = fused_layer(traced, layer, x, cos, sin)
            for w, e, c in zip(want, eager, got, strict=True):
                if merged:  # one matmul per group may sum in another order
                    assert torch.allclose(w, e, atol=1e-5, rtol=1e-5), (w - e).abs().max()
                else:
                    assert torch.equal(w, e)
                assert torch.allclose(w, c, atol=1e-5, rtol=1e-5), (w - c).abs().max()
            x = want[-1]
    # one trace per half for every layer and every batch shape (dynamic shapes, weights as inputs): more would
    # mean a compile per layer on the GPU
    assert backend.graphs == 2, backend.graphs


@torch.no_grad()
def test_vision_layers_traced_once_match_eager(model: MiniCPMO) -> None:
    """The vision encoder through one traced `encoder_layer` (what `fuse_layers` compiles on a GPU) gives what
    the eager layers give, for two batch sizes and both the unmasked and the masked (mixed sizes) paths."""
    torch._dynamo.reset()
    vpm, patch = model.vpm, model.config.vision.patch_size
    assert vpm is not None
    g = torch.Generator().manual_seed(4)
    cases = [[(4, 4)] * 2, [(4, 4)] * 3, [(4, 4), (2, 6), (3, 3)]]
    want = []
    for sizes in cases:
        lmax = max(r * c for r, c in sizes)
        pixels = torch.randn(len(sizes), 3, patch, lmax * patch, generator=g)
        want.append((pixels, sizes, vpm(pixels, sizes)))
    backend = CountingBackend()
    vpm.fuse_layers(backend)
    at_fuse = backend.graphs
    try:
        for pixels, sizes, expected in want:
            assert torch.allclose(vpm(pixels, sizes), expected, atol=1e-5, rtol=1e-5)
    finally:
        vpm.layer_fn = encoder_layer
    # one slice, a batch, and a batch with a mask, all at `fuse_layers`: the runs here compile nothing new
    assert backend.graphs == at_fuse == 3, (at_fuse, backend.graphs)


def test_a_failing_compiled_function_falls_back_for_good(caplog: pytest.LogCaptureFixture) -> None:
    calls = {"compiled": 0, "eager": 0}

    def compiled(x: int) -> int:
        calls["compiled"] += 1
        raise RuntimeError("no Triton here")

    def eager(x: int) -> int:
        calls["eager"] += 1
        return x + 1

    fn = fallback_on_error(compiled, eager, "the test function")
    assert fn(1) == 2 and fn(2) == 3
    assert calls == {"compiled": 1, "eager": 2}
    assert "the test function failed" in caplog.text


@torch.inference_mode()  # as the vocoder runs it (and as `fuse_blocks` compiles it): Dynamo guards on the mode
def test_dit_blocks_traced_once_match_eager(token2wav_fixture_dir: Path) -> None:
    """The flow estimator's blocks through the traced halves (what `DiT.fuse_blocks` compiles on a GPU) give
    what the eager blocks give: a first chunk, a chunk over its cache, and padded rows over a KV store."""
    torch._dynamo.reset()
    params = flow_params_from_yaml(token2wav_fixture_dir / "hparams" / "flow.yaml")
    dit = DiT(params.estimator).eval()
    load_weights(
        dit,
        load_file(str(token2wav_fixture_dir / "weights" / "flow.safetensors")),
        prefix="decoder.estimator.",
    )
    g = torch.Generator().manual_seed(5)
    p = params.estimator
    mel = p.out_channels

    def chunk(b: int, t: int) -> tuple[torch.Tensor, ...]:
        return (
            torch.randn(b, mel, t, generator=g),
            torch.randn(b, mel, t, generator=g),
            torch.rand(b, generator=g),
            torch.randn(b, mel, generator=g),
            torch.randn(b, mel, t, generator=g),
        )

    def run() -> list[torch.Tensor]:
        g.manual_seed(5)
        first = chunk(2, 6)
        out1, conv, kv = dit.forward_chunk(*first, None, None)
        out2, conv2, kv2 = dit.forward_chunk(*chunk(2, 4), conv, kv)
        store = torch.zeros(p.depth, 3, p.num_heads, 12, 2 * p.head_dim)
        valid = torch.tensor([5, 3, 5])
        write = torch.where(torch.arange(5)[None] < valid[:, None], torch.arange(5)[None], 11)
        key_mask = torch.arange(12)[None] < valid[:, None]
        out3, conv3 = dit.forward_ragged(
            *chunk(3, 5), torch.zeros(p.depth, 3, 2 * p.hidden_size, 2), store, key_mask, valid, write
        )
        return [out1, conv, kv, out2, conv2, kv2, out3, conv3, store]

    want = run()
    backend = CountingBackend()
    dit.fuse_blocks(backend)
    at_fuse = backend.graphs
    got = run()
    for w, c in zip(want, got, strict=True):
        assert torch.allclose(w, c, atol=1e-5, rtol=1e-5), (w - c).abs().max()
    # the input half once; the output half once per (conv cache?, valid rows?) combination; all of them at
    # `fuse_blocks`, so the runs here (and a live vocoder's) compile nothing new
    assert backend.graphs == at_fuse, (at_fuse, backend.graphs)
    assert 2 <= at_fuse <= 4, at_fuse
