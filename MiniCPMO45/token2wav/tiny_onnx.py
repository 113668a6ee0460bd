"""Tiny random stand-ins for the two ONNX networks of the prompt front end (tests, embedded default).

They have the real interfaces, not the real function:
* tokenizer: mel [1, 128, T] float32 + length [1] int32 -> ids [1, T'] int64 (4x downsampling, like the
  25 Hz tokenizer on 100 Hz mel) and their count [1];
* speaker: fbank [1, T, 80] float32 -> [1, 192] float32.
Needs the `onnx` package (only to build the files; running them needs onnxruntime only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OPSET = 17


def _save(graph: object, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_tiny_tokenizer(path: str | Path, seed: int = 0, channels: int = 16, id_step: int = 401) -> Path:
    """Conv(k=4, stride 4) over the mel, argmax over `channels`, times `id_step` (ids stay < 6561)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((channels, 128, 4)).astype(np.float32) * 0.1
    bias = rng.standard_normal(channels).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", ["mel", "w", "b"], ["h"], kernel_shape=[4], strides=[4]),
        helper.make_node("ArgMax", ["h"], ["idx"], axis=1, keepdims=0),
        helper.make_node("Mul", ["idx", "step"], ["ids"]),
        helper.make_node("Cast", ["length"], ["len64"], to=TensorProto.INT64),
        helper.make_node("Sub", ["len64", "four"], ["rest"]),
        helper.make_node("Div", ["rest", "four"], ["whole"]),
        helper.make_node("Add", ["whole", "one"], ["count"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_speech_tokenizer",
        [
            helper.make_tensor_value_info("mel", TensorProto.FLOAT, [1, 128, "T"]),
            helper.make_tensor_value_info("length", TensorProto.INT32, [1]),
        ],
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "N"]),
            helper.make_tensor_value_info("count", TensorProto.INT64, [1]),
        ],
        initializer=[
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array(id_step, np.int64), "step"),
            numpy_helper.from_array(np.array([4], np.int64), "four"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
        ],
    )
    return _save(graph, Path(path))


def build_tiny_speaker(path: str | Path, seed: int = 1, dim: int = 192) -> Path:
    """Mean energy over time of each (mean-subtracted) fbank bin, then a random 80 -> dim projection."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((80, dim)).astype(np.float32) * 0.2
    nodes = [
        helper.make_node("Mul", ["fbank", "fbank"], ["energy"]),
        helper.make_node("ReduceMean", ["energy"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_campplus",
        [helper.make_tensor_value_info("fbank", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, dim])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    return _save(graph, Path(path))
