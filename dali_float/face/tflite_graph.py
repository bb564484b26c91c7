"""Run a float TFLite model's graph in torch: read the .tflite flatbuffer, build one nn.Module.

Written for MediaPipe's BlazeFace models (fp16 weights behind DEQUANTIZE; CONV_2D,
DEPTHWISE_CONV_2D, RELU, ADD, PAD, MAX_POOL_2D, RESHAPE, CONCATENATION, RESIZE_BILINEAR), with each
op implemented from the TFLite semantics (SAME padding puts the odd pixel after, RESIZE_BILINEAR's
align_corners / half_pixel_centers source coordinates, fused activations), so that the same numbers
come out as TFLite's own runtime (tests/test_face_detector.py compares them).

Layout: TFLite is NHWC; here every 4-D activation is NCHW (what torch's convolutions want), the
conversion made once: weights are permuted when the file is read, the graph input is taken NCHW,
and only ops whose meaning depends on memory order (RESHAPE) see an NHWC view. Any batch size runs:
a RESHAPE keeps the caller's batch in dimension 0. Weights are buffers, so `.to(device)` and
`.half()` move and convert them; activations follow the weights' dtype.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dali_float.errors import DaliFloatError

log = logging.getLogger(__name__)


class TFLiteGraphError(DaliFloatError):
    """A .tflite file this runner cannot execute (an unsupported op, option or tensor type)."""


def _tflite():
    try:
        import tflite
    except ImportError as err:  # pragma: no cover - the package is a requirement
        raise TFLiteGraphError("the 'tflite' package is missing: pip install tflite==2.18.0") from err
    return tflite


# TFLite enums (schema.fbs), as plain numbers so the mapping is visible here.
_NUMPY_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 4: np.int64}  # TensorType
_PADDING_SAME, _PADDING_VALID = 0, 1  # Padding
_ACTIVATIONS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {  # ActivationFunctionType
    0: lambda x: x,
    1: F.relu,
    2: lambda x: x.clamp(-1.0, 1.0),  # RELU_N1_TO_1
    3: lambda x: x.clamp(0.0, 6.0),  # RELU6
    4: torch.tanh,
}
# NHWC axis -> NCHW axis, for the ops that name an axis of a 4-D activation.
_NHWC_TO_NCHW_AXIS = (0, 2, 3, 1)


def _activation(code: int, where: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if code not in _ACTIVATIONS:
        raise TFLiteGraphError(f"{where}: fused activation {code} is not supported (NONE, RELU, RELU_N1_TO_1, "
                               f"RELU6, TANH are)")
    return _ACTIVATIONS[code]


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TFLite/TensorFlow SAME padding along one axis: (before, after) pixels; the odd one goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
              value: float = 0.0) -> torch.Tensor:
    top, bottom = same_padding(x.shape[2], kernel[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[3], kernel[1], stride[1], dilation[1])
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


def resize_bilinear(x: torch.Tensor, size: tuple[int, int], align_corners: bool, half_pixel_centers: bool) -> torch.Tensor:
    """TFLite RESIZE_BILINEAR of an NCHW tensor to size (H', W').

    Source coordinate of output pixel i along an axis of n -> m pixels:
    align_corners: i * (n - 1) / (m - 1); half_pixel_centers: (i + 0.5) * n / m - 0.5; neither: i * n / m.
    The two neighbours are floor/ceil of it, clamped to [0, n - 1]. One implementation for all three
    modes (torch's interpolate has no "neither" mode), separable: rows, then columns.
    """
    for dim, out_size in ((2, size[0]), (3, size[1])):
        n = x.shape[dim]
        i = torch.arange(out_size, device=x.device, dtype=torch.float32)
        if align_corners and out_size > 1:
            src = i * ((n - 1) / (out_size - 1))
        elif half_pixel_centers:
            src = (i + 0.5) * (n / out_size) - 0.5
        else:
            src = i * (n / out_size)
        lower = src.floor()
        frac = (src - lower).to(x.dtype)
        lo = lower.long().clamp(0, n - 1)
        hi = src.ceil().long().clamp(0, n - 1)
        shape = [1] * x.dim()
        shape[dim] = out_size
        a, b = x.index_select(dim, lo), x.index_select(dim, hi)
        x = a + (b - a) * frac.view(shape)
    return x


# --------------------------------------------------------------------------------------------------
# Nodes: one nn.Module per TFLite operator; `inputs` are tensor indices of the graph's activations


class _Node(nn.Module):
    def __init__(self, inputs: Sequence[int], output: int) -> None:
        super().__init__()
        self.inputs = list(inputs)
        self.output = output


class _Conv(_Node):
    """CONV_2D (groups=1) and DEPTHWISE_CONV_2D (groups=C): NCHW weight (O, I/groups, KH, KW) buffer."""

    def __init__(self, inputs, output, weight: np.ndarray, bias: np.ndarray | None, stride, dilation, padding: int,
                 groups: int, activation) -> None:
        super().__init__(inputs, output)
        weight = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if bias is None else torch.from_numpy(bias.astype(np.float32)))
        self.stride, self.dilation, self.same, self.groups = tuple(stride), tuple(dilation), padding == _PADDING_SAME, groups
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = tuple(self.weight.shape[2:])
        pad: tuple[int, int] | int = 0
        if self.same:
            (top, bottom), (left, right) = (same_padding(x.shape[2], kernel[0], self.stride[0], self.dilation[0]),
                                            same_padding(x.shape[3], kernel[1], self.stride[1], self.dilation[1]))
            if top == bottom and left == right:
                pad = (top, left)  # symmetric: let the convolution pad (no copy)
            else:
                x = F.pad(x, (left, right, top, bottom))
        y = F.conv2d(x, self.weight, self.bias, self.stride, pad, self.dilation, self.groups)
        return self.activation(y)


class _MaxPool(_Node):
    def __init__(self, inputs, output, kernel, stride, padding: int, activation) -> None:
        super().__init__(inputs, output)
        self.kernel, self.stride, self.same, self.activation = tuple(kernel), tuple(stride), padding == _PADDING_SAME, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:  # padded cells never win the max (TFLite ignores them)
            x = _pad_same(x, self.kernel, self.stride, (1, 1), value=float("-inf"))
        return self.activation(F.max_pool2d(x, self.kernel, self.stride))


class _Unary(_Node):
    def __init__(self, inputs, output, fn) -> None:
        super().__init__(inputs, output)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class _Add(_Node):
    """ADD of two activations, or of an activation and a constant (kept as a buffer, NCHW if 4-D)."""

    def __init__(self, inputs, output, constant: np.ndarray | None, activation) -> None:
        super().__init__(inputs, output)
        self.register_buffer("constant", None if constant is None else torch.from_numpy(constant.astype(np.float32)))
        self.activation = activation

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.activation(x + (self.constant if y is None else y))


class _Pad(_Node):
    def __init__(self, inputs, output, paddings: np.ndarray) -> None:
        super().__init__(inputs, output)
        pads = [tuple(int(v) for v in row) for row in paddings]
        if len(pads) == 4:  # NHWC rows -> NCHW order
            pads = [pads[0], pads[3], pads[1], pads[2]]
        # F.pad wants (last before, last after, second-to-last before, ...).
        self.pad = tuple(v for row in reversed(pads) for v in row)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad)


class _Reshape(_Node):
    """RESHAPE with the batch taken from the input: NCHW inputs are viewed NHWC first (TFLite's order)."""

    def __init__(self, inputs, output, new_shape: Sequence[int], in_rank: int) -> None:
        super().__init__(inputs, output)
        self.new_shape, self.in_rank = [int(v) for v in new_shape], in_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_rank == 4:
            x = x.permute(0, 2, 3, 1)
        y = x.reshape(x.shape[0], *self.new_shape[1:])
        return y.permute(0, 3, 1, 2) if y.dim() == 4 else y


class _Concat(_Node):
    def __init__(self, inputs, output, axis: int, rank: int, activation) -> None:
        super().__init__(inputs, output)
        axis %= rank
        self.axis = _NHWC_TO_NCHW_AXIS[axis] if rank == 4 else axis
        self.activation = activation

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.activation(torch.cat(xs, dim=self.axis))


class _Resize(_Node):
    def __init__(self, inputs, output, size: Sequence[int], align_corners: bool, half_pixel_centers: bool) -> None:
        super().__init__(inputs, output)
        self.size, self.align_corners, self.half_pixel_centers = (int(size[0]), int(size[1])), align_corners, half_pixel_centers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_bilinear(x, self.size, self.align_corners, self.half_pixel_centers)


# --------------------------------------------------------------------------------------------------
# Reading the file


class TFLiteGraph(nn.Module):
    """A single-subgraph float .tflite model as a torch module.

    forward(x): x (N, C, H, W) float (the model's NHWC input, given NCHW), any N; returns the graph's
    outputs in the file's order, each (N, ...) in the weights' dtype (4-D outputs NCHW).
    `input_shape`: the file's NHWC input shape; `output_shapes`: the file's output shapes.
    """

    SUPPORTED = ("DEQUANTIZE", "CONV_2D", "DEPTHWISE_CONV_2D", "RELU", "RELU6", "ADD", "PAD", "MAX_POOL_2D",
                 "RESHAPE", "CONCATENATION", "RESIZE_BILINEAR")

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        tfl = _tflite()
        self.path = Path(path)
        buf = self.path.read_bytes()
        model = tfl.Model.GetRootAsModel(buf, 0)
        if model.SubgraphsLength() != 1:
            raise TFLiteGraphError(f"{self.path.name}: {model.SubgraphsLength()} subgraphs, only 1 is supported")
        graph = model.Subgraphs(0)
        self._tfl, self._model, self._graph, self._buf = tfl, model, graph, buf
        op_names = {v: k for k, v in vars(tfl.BuiltinOperator).items() if not k.startswith("_")}
        self._constants: dict[int, np.ndarray] = {}
        self._stored: set[int] | None = None
        self._shapes = {i: tuple(int(v) for v in graph.Tensors(i).ShapeAsNumpy())
                        if graph.Tensors(i).ShapeLength() else () for i in range(graph.TensorsLength())}
        self.graph_inputs = [int(v) for v in graph.InputsAsNumpy()]
        self.graph_outputs = [int(v) for v in graph.OutputsAsNumpy()]
        if len(self.graph_inputs) != 1:
            raise TFLiteGraphError(f"{self.path.name}: {len(self.graph_inputs)} inputs, only 1 is supported")
        self.input_shape = self._shapes[self.graph_inputs[0]]
        self.output_shapes = [self._shapes[i] for i in self.graph_outputs]

        nodes: list[_Node] = []
        for k in range(graph.OperatorsLength()):
            op = graph.Operators(k)
            code = model.OperatorCodes(op.OpcodeIndex())
            # Codes above 127 live only in BuiltinCode; older files only fill DeprecatedBuiltinCode.
            name = op_names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
            ins = [int(v) for v in op.InputsAsNumpy()] if op.InputsLength() else []
            outs = [int(v) for v in op.OutputsAsNumpy()]
            where = f"{self.path.name}: operator #{k} {name}"
            if name not in self.SUPPORTED:
                raise TFLiteGraphError(f"{where} is not supported by the torch runner (supported: "
                                       f"{', '.join(self.SUPPORTED)})")
            if name == "DEQUANTIZE" and ins[0] in self._const_indices():
                self._constants[outs[0]] = self._constant(ins[0]).astype(np.float32)  # fp16 weights, folded now
                continue
            nodes.append(self._node(name, op, ins, outs[0], where))
        self.nodes = nn.ModuleList(nodes)
        # After its last reader a tensor is dropped, so a large batch holds only live activations.
        last_use: dict[int, int] = {}
        for n, node in enumerate(nodes):
            for i in node.inputs:
                last_use[i] = n
        self._release = [[i for i in node.inputs if last_use[i] == n and i not in self.graph_outputs]
                         for n, node in enumerate(nodes)]
        log.debug("%s: %d torch nodes, %d folded constants", self.path.name, len(nodes), len(self._constants))
        del self._tfl, self._model, self._graph, self._buf, self._constants, self._stored  # only needed to build

    # -- constants

    def _const_indices(self) -> set[int]:
        """Tensors with data in the file, and those folded at load time."""
        if self._stored is None:
            self._stored = set()
            for i in range(self._graph.TensorsLength()):
                b = self._model.Buffers(self._graph.Tensors(i).Buffer())
                if b.DataLength() > 0 or b.Offset() > 1:
                    self._stored.add(i)
        return self._stored | set(self._constants)

    def _constant(self, index: int) -> np.ndarray:
        if index in self._constants:
            return self._constants[index]
        tensor = self._graph.Tensors(index)
        dtype = _NUMPY_TYPES.get(tensor.Type())
        if dtype is None:
            raise TFLiteGraphError(f"{self.path.name}: tensor {tensor.Name().decode()!r} has type {tensor.Type()}, "
                                   f"only float32/float16/int32/int64 are supported")
        b = self._model.Buffers(tensor.Buffer())
        if b.Offset() > 1:  # stored after the flatbuffer (files over 2 GB)
            raw = np.frombuffer(self._buf, np.uint8, count=b.Size(), offset=b.Offset())
        else:
            raw = b.DataAsNumpy()
        return np.frombuffer(raw.tobytes(), dtype=dtype).reshape(self._shapes[index])

    def _options(self, op, cls_name: str):
        table = op.BuiltinOptions()
        if table is None:
            return None
        opts = getattr(self._tfl, cls_name)()
        opts.Init(table.Bytes, table.Pos)
        return opts

    # -- one node per op

    def _node(self, name: str, op, ins: list[int], out: int, where: str) -> _Node:
        consts = self._const_indices()
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            depthwise = name == "DEPTHWISE_CONV_2D"
            o = self._options(op, "DepthwiseConv2DOptions" if depthwise else "Conv2DOptions")
            kernel = self._constant(ins[1])  # CONV: (O, KH, KW, I); DEPTHWISE: (1, KH, KW, C * M)
            bias = self._constant(ins[2]) if len(ins) > 2 and ins[2] >= 0 else None
            in_channels = self._shapes[ins[0]][3]
            if depthwise:
                weight, groups = kernel.transpose(3, 0, 1, 2), in_channels  # (C * M, 1, KH, KW)
            else:
                weight, groups = kernel.transpose(0, 3, 1, 2), 1
                if kernel.shape[3] != in_channels:
                    raise TFLiteGraphError(f"{where}: grouped convolution ({in_channels} input channels, kernel "
                                           f"{kernel.shape}) is not supported")
            return _Conv([ins[0]], out, weight, bias, (o.StrideH(), o.StrideW()),
                         (o.DilationHFactor(), o.DilationWFactor()), o.Padding(), groups,
                         _activation(o.FusedActivationFunction(), where))
        if name in ("RELU", "RELU6"):
            return _Unary(ins, out, _ACTIVATIONS[1 if name == "RELU" else 3])
        if name == "ADD":
            act = _activation(self._options(op, "AddOptions").FusedActivationFunction(), where)
            const = [i for i in ins if i in consts]
            if not const:
                return _Add(ins, out, None, act)
            value = self._constant(const[0])
            if value.ndim == 4:
                value = value.transpose(0, 3, 1, 2)
            elif value.ndim == 1 and len(self._shapes[out]) == 4:
                value = value.reshape(-1, 1, 1)  # per-channel constant of an NCHW activation
            return _Add([i for i in ins if i not in consts], out, value, act)
        if name == "PAD":
            return _Pad([ins[0]], out, self._constant(ins[1]))
        if name == "MAX_POOL_2D":
            o = self._options(op, "Pool2DOptions")
            return _MaxPool(ins, out, (o.FilterHeight(), o.FilterWidth()), (o.StrideH(), o.StrideW()), o.Padding(),
                            _activation(o.FusedActivationFunction(), where))
        if name == "RESHAPE":
            o = self._options(op, "ReshapeOptions")
            new_shape = (list(o.NewShapeAsNumpy()) if o is not None and o.NewShapeLength()
                         else list(self._constant(ins[1])) if len(ins) > 1 else list(self._shapes[out]))
            in_shape = self._shapes[ins[0]]
            if not in_shape or not new_shape or int(new_shape[0]) != in_shape[0]:
                raise TFLiteGraphError(f"{where}: reshape {in_shape} -> {new_shape} changes the batch dimension")
            return _Reshape([ins[0]], out, new_shape, len(in_shape))
        if name == "CONCATENATION":
            o = self._options(op, "ConcatenationOptions")
            return _Concat(ins, out, o.Axis(), len(self._shapes[out]), _activation(o.FusedActivationFunction(), where))
        if name == "RESIZE_BILINEAR":
            o = self._options(op, "ResizeBilinearOptions")
            return _Resize([ins[0]], out, self._constant(ins[1]), bool(o.AlignCorners()), bool(o.HalfPixelCenters()))
        raise TFLiteGraphError(f"{where} is not supported by the torch runner")  # DEQUANTIZE of an activation

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dtype = next((b.dtype for b in self.buffers() if b.is_floating_point()), torch.float32)
        x = x.to(dtype)
        if x.dim() == 4:
            # NCHW shapes over NHWC memory (torch's channels_last): the fast layout of oneDNN on the
            # CPU and cuDNN on the GPU for these small convolutions (measured: docs/FACE_FRAMING.md),
            # and TFLite's own order, so a RESHAPE of a permuted activation is a view.
            x = x.contiguous(memory_format=torch.channels_last)
        values: dict[int, torch.Tensor] = {self.graph_inputs[0]: x}
        for node, release in zip(self.nodes, self._release):
            values[node.output] = node(*(values[i] for i in node.inputs))
            for i in release:
                del values[i]
        return tuple(values[i] for i in self.graph_outputs)
