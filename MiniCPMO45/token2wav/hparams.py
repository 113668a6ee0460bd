"""Typed hyper-parameters read from the token2wav asset YAML files (`flow.yaml`, `config.yaml`).

The files use HyperPyYAML tags: `!new:pkg.Class` (build an object with the mapping as keyword arguments),
`!name:pkg.func` (a partial function) and `!ref <key>` (a reference to another top-level key). We parse them
with a safe loader into plain `TaggedNode` records and never import or execute what the tags name; the
builders below accept only the classes we implement, looked up by their final dotted name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from ..audio.rates import SPEECH_RATE


class HParamsError(ValueError):
    """An asset YAML file that does not describe the vocoder we implement; the message says why."""


@dataclass
class TaggedNode:
    """A `!new:` or `!name:` node: what it names and its keyword arguments."""

    kind: str  # "new" or "name"
    target: str
    kwargs: dict[str, Any]

    @property
    def class_name(self) -> str:
        return self.target.rsplit(".", 1)[-1]


@dataclass
class _Ref:
    key: str


class _TagLoader(yaml.SafeLoader):
    """SafeLoader that turns the three HyperPyYAML tags into inert records."""


def _construct_tagged(kind: str):
    def construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> TaggedNode:
        if isinstance(node, yaml.MappingNode):
            kwargs = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.ScalarNode) and node.value == "":
            kwargs = {}
        else:
            raise HParamsError(f"!{kind}:{suffix} must carry a mapping of keyword arguments")
        return TaggedNode(kind=kind, target=suffix, kwargs=dict(kwargs))

    return construct


def _construct_ref(loader: yaml.SafeLoader, node: yaml.Node) -> _Ref:
    text = str(loader.construct_scalar(node)).strip()
    if not (text.startswith("<") and text.endswith(">")):
        raise HParamsError(f"unsupported !ref expression {text!r}; only !ref <key> is understood")
    return _Ref(text[1:-1])


_TagLoader.add_multi_constructor("!new:", _construct_tagged("new"))
_TagLoader.add_multi_constructor("!name:", _construct_tagged("name"))
_TagLoader.add_constructor("!ref", _construct_ref)


def _resolve(value: Any, root: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    if isinstance(value, _Ref):
        if value.key in seen:
            raise HParamsError(f"circular !ref <{value.key}>")
        if value.key not in root:
            raise HParamsError(f"!ref <{value.key}> names no top-level key")
        return _resolve(root[value.key], root, (*seen, value.key))
    if isinstance(value, TaggedNode):
        return TaggedNode(
            value.kind, value.target, {k: _resolve(v, root, seen) for k, v in value.kwargs.items()}
        )
    if isinstance(value, dict):
        return {k: _resolve(v, root, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, seen) for v in value]
    return value


def load_tagged_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a HyperPyYAML file into dicts, lists, scalars and `TaggedNode`s, with `!ref`s resolved."""
    path = Path(path)
    try:
        root = yaml.load(path.read_text(), Loader=_TagLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise HParamsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(root, dict):
        raise HParamsError(f"{path} must hold a mapping at the top level")
    return _resolve(root, root)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConformerParams(_Strict):
    input_size: int
    output_size: int = 256
    input_layer: str = "linear"
    pre_lookahead_len: int = 3
    num_blocks: int = 6
    num_up_blocks: int = 4
    up_stride: int = 2
    up_scale_factor: float = 2.0
    attention_heads: int = 4
    pos_enc_layer_type: str = "rel_pos_espnet"
    selfattention_layer_type: str = "rel_selfattn"
    key_bias: bool = True
    linear_units: int = 2048
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    normalize_before: bool = True
    activation_type: str = "swish"


class DiTParams(_Strict):
    in_channels: int
    out_channels: int
    mlp_ratio: float = 4.0
    depth: int = 28
    num_heads: int = 8
    head_dim: int = 64
    hidden_size: int = 256


class FlowParams(_Strict):
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    output_type: str = "mel"
    vocab_size: int = 5121
    encoder: ConformerParams
    estimator: DiTParams
    inference_cfg_rate: float = 0.7


class F0PredictorParams(_Strict):
    num_class: int = 1
    in_channels: int = 80
    cond_channels: int = 512


class HiFTParams(_Strict):
    """Both HiFT generators; `conv_pre_look_right` is used by the causal one only."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    conv_pre_look_right: int = 4
    f0_predictor: F0PredictorParams = F0PredictorParams()

    @property
    def hop_samples(self) -> int:
        prod = 1
        for r in self.upsample_rates:
            prod *= r
        return prod * self.istft_hop_len


class MelParams(_Strict):
    n_fft: int = 1920
    num_mels: int = 80
    sampling_rate: int = 24000
    hop_size: int = 480
    win_size: int = 1920
    fmin: float = 0
    fmax: float = 8000
    center: bool = False


# Required feature extractor of the streaming vocoder (token2wav checks the same values).
VOCODER_MEL = MelParams()


def _expect_node(value: Any, kind: str, class_name: str, where: str) -> TaggedNode:
    if not isinstance(value, TaggedNode) or value.kind != kind or value.class_name != class_name:
        got = f"!{value.kind}:{value.target}" if isinstance(value, TaggedNode) else type(value).__name__
        raise HParamsError(f"{where}: expected !{kind}:...{class_name}, got {got}")
    return value


def _validated(model: type[_Strict], kwargs: dict[str, Any], where: str) -> Any:
    try:
        return model(**kwargs)
    except Exception as exc:  # pydantic.ValidationError or TypeError
        raise HParamsError(f"{where}: {exc}") from exc


def flow_params_from_yaml(path: str | Path) -> FlowParams:
    """Read `flow.yaml` (CausalMaskedDiffWithXvec + UpsampleConformerEncoderV2 + CausalConditionalCFM + DiT)."""
    root = load_tagged_yaml(path)
    flow = _expect_node(root.get("flow"), "new", "CausalMaskedDiffWithXvec", f"{path}: flow")
    kwargs = dict(flow.kwargs)
    encoder = _expect_node(kwargs.pop("encoder", None), "new", "UpsampleConformerEncoderV2", "flow.encoder")
    decoder = _expect_node(kwargs.pop("decoder", None), "new", "CausalConditionalCFM", "flow.decoder")
    if "input_embedding" in kwargs:
        raise HParamsError("flow.input_embedding overrides are not supported")
    dec_kwargs = dict(decoder.kwargs)
    estimator = _expect_node(dec_kwargs.pop("estimator", None), "new", "DiT", "flow.decoder.estimator")
    unknown = set(dec_kwargs) - {"inference_cfg_rate"}
    if unknown:
        raise HParamsError(f"flow.decoder: unexpected keys {sorted(unknown)}")
    enc = _validated(ConformerParams, encoder.kwargs, "flow.encoder")
    if enc.input_layer != "linear" or enc.pos_enc_layer_type != "rel_pos_espnet":
        raise HParamsError(
            "flow.encoder: only input_layer 'linear' with pos_enc 'rel_pos_espnet' is implemented"
        )
    if enc.selfattention_layer_type != "rel_selfattn" or enc.activation_type != "swish":
        raise HParamsError("flow.encoder: only rel_selfattn attention with swish FFN is implemented")
    est = _validated(DiTParams, estimator.kwargs, "flow.decoder.estimator")
    return _validated(
        FlowParams,
        {
            **kwargs,
            "encoder": enc,
            "estimator": est,
            "inference_cfg_rate": dec_kwargs.get("inference_cfg_rate", 0.7),
        },
        "flow",
    )


def hift_params_from_kwargs(kwargs: dict[str, Any], where: str) -> HiFTParams:
    kwargs = dict(kwargs)
    f0 = kwargs.pop("f0_predictor", None)
    if f0 is not None:
        f0 = _validated(
            F0PredictorParams, f0.kwargs if isinstance(f0, TaggedNode) else f0, f"{where}.f0_predictor"
        )
        kwargs["f0_predictor"] = f0
    istft = kwargs.pop("istft_params", None)
    if istft is not None:
        kwargs["istft_n_fft"] = istft["n_fft"]
        kwargs["istft_hop_len"] = istft["hop_len"]
    return _validated(HiFTParams, kwargs, where)


def causal_hift_params_from_yaml(path: str | Path) -> tuple[HiFTParams, MelParams]:
    """Read `config.yaml`: the CausalHiFTGenerator and its feature extractor, with token2wav's checks."""
    root = load_tagged_yaml(path)
    hift = _expect_node(root.get("hift"), "new", "CausalHiFTGenerator", f"{path}: hift")
    f0 = hift.kwargs.get("f0_predictor")
    _expect_node(f0, "new", "CausalConvRNNF0Predictor", "hift.f0_predictor")
    params = hift_params_from_kwargs(hift.kwargs, "hift")
    feat = _expect_node(root.get("feat_extractor"), "name", "mel_spectrogram", f"{path}: feat_extractor")
    mel = _validated(MelParams, feat.kwargs, "feat_extractor")
    if mel != VOCODER_MEL:
        raise HParamsError(f"feat_extractor must match the Step-Audio2 mel {VOCODER_MEL.model_dump()}")
    if params.sampling_rate != SPEECH_RATE or params.hop_samples != 480:
        raise HParamsError("the causal HiFT must produce 24 kHz audio with 480 samples per mel frame")
    if params.nb_harmonics != 8:
        raise HParamsError("nb_harmonics must be 8 (the causal source noise table has 9 columns)")
    return params, mel
