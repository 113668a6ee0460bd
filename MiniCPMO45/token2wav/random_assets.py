"""Write a random-weight `assets/token2wav/` folder in the official (new) layout.

Used by the embedded default (no real weights) and by benchmarks (real sizes, random weights). The YAML
files carry the same tags and keys as the checkpoint's; weights are saved as `.pt` state dicts with the
official names (hift_original.pt with the "generator." prefix); tiny stand-in ONNX networks are added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from .causal_hift import CausalHiFTGenerator
from .cfm import default_noise_table
from .flow import Flow
from .hift import HiFTGenerator
from .hparams import causal_hift_params_from_yaml, flow_params_from_yaml
from .tiny_onnx import build_tiny_speaker, build_tiny_tokenizer

Size = Literal["tiny", "real"]

# (flow input/encoder width, conformer blocks, up blocks, heads, ffn, DiT depth, heads, head_dim, hidden)
_FLOW_SIZES: dict[str, tuple[int, int, int, int, int, int, int, int, int]] = {
    "tiny": (32, 2, 2, 2, 64, 2, 2, 16, 32),
    "real": (512, 6, 4, 8, 2048, 16, 8, 64, 512),
}
# (HiFT base channels, F0 predictor channels)
_HIFT_SIZES: dict[str, tuple[int, int]] = {"tiny": (32, 16), "real": (512, 512)}


def flow_yaml(size: Size) -> str:
    width, blocks, up_blocks, heads, ffn, depth, dit_heads, head_dim, hidden = _FLOW_SIZES[size]
    return f"""# random-weight token2wav flow ({size} sizes)
flow: !new:cosyvoice2.flow.flow.CausalMaskedDiffWithXvec
    input_size: {width}
    output_size: 80
    spk_embed_dim: 192
    output_type: 'mel'
    vocab_size: 6561
    encoder: !new:cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2
        input_size: {width}
        output_size: {width}
        input_layer: 'linear'
        pre_lookahead_len: 3
        num_blocks: {blocks}
        num_up_blocks: {up_blocks}
        up_stride: 2
        up_scale_factor: 2
        attention_heads: {heads}
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        key_bias: true
        linear_units: {ffn}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: true
    decoder: !new:cosyvoice2.flow.flow_matching.CausalConditionalCFM
        inference_cfg_rate: 0.7
        estimator: !new:cosyvoice2.flow.decoder_dit.DiT
            in_channels: 320
            out_channels: 80
            mlp_ratio: 4.0
            depth: {depth}
            num_heads: {dit_heads}
            head_dim: {head_dim}
            hidden_size: {hidden}
"""


def config_yaml(size: Size) -> str:
    base, cond = _HIFT_SIZES[size]
    return f"""# random-weight token2wav causal HiFT ({size} sizes)
sample_rate: 24000
hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
    in_channels: 80
    base_channels: {base}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    conv_pre_look_right: 4
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {cond}
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""


def _shrink_conv_post(model: torch.nn.Module) -> None:
    """Random HiFT weights easily saturate; a small output conv keeps the audio inside the clip range."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("conv_post.") and name.endswith("original0"):
                param.mul_(0.05)


def write_random_assets(
    folder: str | Path, size: Size = "tiny", seed: int = 0, with_onnx: bool = True
) -> Path:
    """Create (or overwrite) a random-weight token2wav folder; returns its path."""
    if size not in _FLOW_SIZES:
        raise ValueError(f"size must be 'tiny' or 'real', got {size!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flow.yaml").write_text(flow_yaml(size))
    (folder / "config.yaml").write_text(config_yaml(size))
    torch.manual_seed(seed)
    flow_params = flow_params_from_yaml(folder / "flow.yaml")
    flow = Flow(flow_params, default_noise_table(80, frames=1))
    torch.save(flow.state_dict(), folder / "flow.pt")
    causal_params, _ = causal_hift_params_from_yaml(folder / "config.yaml")
    causal = CausalHiFTGenerator(causal_params)
    _shrink_conv_post(causal)
    torch.save(causal.state_dict(), folder / "hift.pt")
    original = HiFTGenerator(causal_params)
    _shrink_conv_post(original)
    torch.save({f"generator.{k}": v for k, v in original.state_dict().items()}, folder / "hift_original.pt")
    if with_onnx:
        build_tiny_tokenizer(folder / "speech_tokenizer_v2_25hz.onnx", seed=seed)
        build_tiny_speaker(folder / "campplus.onnx", seed=seed + 1)
    return folder
