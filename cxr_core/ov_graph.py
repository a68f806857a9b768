"""Our Keras classifiers written straight as an OpenVINO graph, without ``ov.convert_model``.

``ov.convert_model`` of a Keras model traces it through TensorFlow and freezes the graph: about
13-19 s for DenseNet169 on two cores, four to six times the Keras load itself. Our models use a
dozen layer types, each one or two OpenVINO operations, so this module walks the Keras functional
graph (the same walk Keras does to run it) and emits the operations with the layer's weights as
constants, in well under a second. BatchNormalization is folded into one multiply and one add
(what OpenVINO's own transformations would do).

The graph runs channels-first inside (OpenVINO's convolution layout): the NHWC input is
transposed once, and the feature map that is returned for Grad-CAM is transposed back, so the
model's inputs and outputs are exactly Keras'. A layer (or setting) not listed here raises
``Unsupported``: ``cxr_core.engine`` then falls back to ``ov.convert_model``. Equality with Keras
is tested on every architecture we build (tests/test_engine.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import keras


class Unsupported(ValueError):
    """The model has a layer (or a layer setting) this module does not write; convert it another way."""


def _const(value) -> object:
    import openvino.opset13 as ops

    return ops.constant(np.array(value, dtype=np.float32, order="C"))  # keeps a scalar a scalar


def _channel(vector) -> object:
    """A per-channel vector as a (1, C, 1, 1) constant, for NCHW tensors."""
    return _const(np.asarray(vector, np.float32).reshape(1, -1, 1, 1))


def _activation(x, name: str):
    import openvino.opset13 as ops

    if name == "linear":
        return x
    if name == "relu":
        return ops.relu(x)
    if name == "sigmoid":
        return ops.sigmoid(x)
    if name == "softmax":
        return ops.softmax(x, 1)  # channels: axis 1 in NCHW and in (N, C)
    raise Unsupported(f"activation {name!r}")


def _activation_name(layer) -> str:
    fn = getattr(layer, "activation", None)
    return "linear" if fn is None else getattr(fn, "__name__", str(fn))


def _pair(value) -> list[int]:
    return [int(v) for v in (value if isinstance(value, list | tuple) else (value, value))]


def _channels_last(layer) -> None:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise Unsupported(f"{layer.name}: data_format {layer.data_format!r}")


def _rescaling(layer, x):
    import openvino.opset13 as ops

    scale, offset = np.asarray(layer.scale, np.float32), np.asarray(layer.offset, np.float32)  # scalar or per channel
    return ops.add(ops.multiply(x, _channel(scale)), _channel(offset))


def _zero_padding(layer, x):
    import openvino.opset13 as ops

    _channels_last(layer)
    (top, bottom), (left, right) = layer.padding
    return ops.pad(x, np.array([0, 0, top, left], np.int64), np.array([0, 0, bottom, right], np.int64), "constant",
                   _const(0.0))


def _conv2d(layer, x):
    import openvino.opset13 as ops

    _channels_last(layer)
    if getattr(layer, "groups", 1) != 1:
        raise Unsupported(f"{layer.name}: grouped convolution")
    weights = layer.get_weights()
    kernel = np.transpose(weights[0], (3, 2, 0, 1))  # (kh, kw, in, out) -> (out, in, kh, kw)
    pad = {"valid": "valid", "same": "same_upper"}[layer.padding]  # TF's SAME puts the odd pixel at the end
    y = ops.convolution(x, _const(kernel), _pair(layer.strides), [0, 0], [0, 0], _pair(layer.dilation_rate),
                        auto_pad=pad)
    if layer.use_bias:
        y = ops.add(y, _channel(weights[1]))
    return _activation(y, _activation_name(layer))


def _batch_norm(layer, x):
    import openvino.opset13 as ops

    if layer.axis not in (-1, 3, [3], [-1]):
        raise Unsupported(f"{layer.name}: BatchNormalization over axis {layer.axis}")
    channels = layer.moving_mean.shape[0]
    gamma = np.asarray(layer.gamma.numpy() if layer.scale else np.ones(channels), np.float64)
    beta = np.asarray(layer.beta.numpy() if layer.center else np.zeros(channels), np.float64)
    mean, var = (np.asarray(v.numpy(), np.float64) for v in (layer.moving_mean, layer.moving_variance))
    a = gamma / np.sqrt(var + layer.epsilon)
    return ops.add(ops.multiply(x, _channel(a)), _channel(beta - mean * a))


def _pool(layer, x):
    import openvino.opset13 as ops

    _channels_last(layer)
    kernel, strides = _pair(layer.pool_size), _pair(layer.strides or layer.pool_size)
    pad = {"valid": "valid", "same": "same_upper"}[layer.padding]
    if type(layer).__name__ == "MaxPooling2D":
        return ops.max_pool(x, strides, [1, 1], [0, 0], [0, 0], kernel, auto_pad=pad).output(0)
    # exclude_pad: TF's average over a SAME window counts only the pixels inside the image
    return ops.avg_pool(x, strides, [0, 0], [0, 0], kernel, exclude_pad=True, auto_pad=pad)


def _activation_layer(layer, x):
    return _activation(x, _activation_name(layer))


def _relu_layer(layer, x):
    import openvino.opset13 as ops

    if layer.max_value is not None or float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
        raise Unsupported(f"{layer.name}: ReLU with max_value, negative_slope or threshold")
    return ops.relu(x)


def _global_average(layer, x):
    import openvino.opset13 as ops

    _channels_last(layer)
    return ops.reduce_mean(x, np.array([2, 3], np.int64), bool(getattr(layer, "keepdims", False)))


def _dense(layer, x):
    import openvino.opset13 as ops

    weights = layer.get_weights()
    y = ops.matmul(x, _const(weights[0]), False, False)
    if layer.use_bias:
        y = ops.add(y, _const(weights[1].reshape(1, -1)))
    return _activation(y, _activation_name(layer))


def _identity(layer, x):
    return x


def _concatenate(layer, xs):
    import openvino.opset13 as ops

    if layer.axis not in (-1, 3):
        raise Unsupported(f"{layer.name}: Concatenate over axis {layer.axis}")
    return ops.concat(xs, 1)


def _add(layer, xs):
    import openvino.opset13 as ops

    y = xs[0]
    for x in xs[1:]:
        y = ops.add(y, x)
    return y


# Keras layer class name -> (writer of its operations, the input rank it is written for; None: any).
# Matched on the class itself (``_writer``), so that an operation of the same name (``keras.ops.add`` in a
# functional model is an ``ops.numpy.Add``, whose constant operand is not an input) or a subclass with its
# own behaviour is not mistaken for the layer.
_ONE_INPUT: dict[str, tuple[Callable, int | None]] = {
    "Rescaling": (_rescaling, 4), "ZeroPadding2D": (_zero_padding, 4), "Conv2D": (_conv2d, 4),
    "BatchNormalization": (_batch_norm, 4), "MaxPooling2D": (_pool, 4), "AveragePooling2D": (_pool, 4),
    "Activation": (_activation_layer, None), "ReLU": (_relu_layer, None),
    "GlobalAveragePooling2D": (_global_average, 4), "Dense": (_dense, 2), "Dropout": (_identity, None),
}
_MANY_INPUTS: dict[str, Callable] = {"Concatenate": _concatenate, "Add": _add}


def _rank(out) -> int:
    """The rank of an operation's (first) output: ``out`` is an ov Node or one of its Outputs."""
    shape = out.get_partial_shape() if hasattr(out, "get_partial_shape") else out.get_output_partial_shape(0)
    return len(shape)


def _writer(layer, ranks: list[int]) -> tuple[Callable, bool]:
    """(writer, takes a list of inputs) for ``layer`` given its inputs' ranks, or raise ``Unsupported``."""
    import keras

    kind = type(layer).__name__
    if getattr(keras.layers, kind, None) is not type(layer):
        raise Unsupported(f"{layer.name} ({type(layer).__module__}.{kind}) is not a Keras layer written here")
    if kind in _MANY_INPUTS:
        if len(set(ranks)) != 1 or ranks[0] not in (2, 4):
            raise Unsupported(f"{layer.name} ({kind}) on inputs of rank {ranks}")
        return _MANY_INPUTS[kind], True
    if kind in _ONE_INPUT and len(ranks) == 1:
        writer, rank = _ONE_INPUT[kind]
        if rank is not None and ranks[0] != rank or ranks[0] not in (2, 4):
            raise Unsupported(f"{layer.name} ({kind}) on an input of rank {ranks[0]}")
        return writer, False
    raise Unsupported(f"layer {layer.name} ({kind})")


def write(model: keras.Model, feature_layer: str | None = None) -> object:
    """``model`` (one NHWC float32 input, logits out) as an ``ov.Model`` with outputs [logits] or
    [logits, NHWC feature map of ``feature_layer``]. Raises ``Unsupported`` for what it cannot write."""
    import openvino as ov
    import openvino.opset13 as ops

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise Unsupported("a model with one input and one output is expected")
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3:
        raise Unsupported(f"input shape {shape}: an (S, S, C) image is expected")
    param = ops.parameter([-1, *shape], np.float32, name="image")
    values = {id(model.inputs[0]): ops.transpose(param, np.array([0, 3, 1, 2], np.int64))}
    for depth in sorted(model._nodes_by_depth, reverse=True):  # the walk of keras' Function._run_through_graph
        for node in model._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            if any(id(t) not in values for t in node.input_tensors):
                continue  # not on the path from the input (Keras skips it too)
            layer = node.operation
            inputs = [values[id(t)] for t in node.input_tensors]
            writer, many = _writer(layer, [len(t.shape) for t in node.input_tensors])
            if len(node.outputs) != 1:
                raise Unsupported(f"layer {layer.name} has {len(node.outputs)} outputs")
            out = writer(layer, inputs) if many else writer(layer, inputs[0])
            if _rank(out) != len(node.outputs[0].shape):
                raise Unsupported(f"{layer.name}: written with rank {_rank(out)}, "
                                  f"Keras gives rank {len(node.outputs[0].shape)}")
            values[id(node.outputs[0])] = out
    logits = values.get(id(model.outputs[0]))
    if logits is None:
        raise Unsupported("the output is not reachable from the input")
    if len(model.outputs[0].shape) != 2:
        raise Unsupported(f"the output has shape {tuple(model.outputs[0].shape)}: (N, classes) logits are expected")
    results = [ops.result(logits)]
    if feature_layer is not None:
        features = values.get(id(model.get_layer(feature_layer).output))
        if features is None:
            raise Unsupported(f"feature layer {feature_layer!r} is not on the path to the output")
        results.append(ops.result(ops.transpose(features, np.array([0, 2, 3, 1], np.int64))))
    return ov.Model(results, [param], f"{model.name}_forward")
