"""Write small .tflite models in tests (the `tflite` package's generated flatbuffer builders).

Used to run single ops with option combinations the BlazeFace files do not contain (asymmetric
SAME padding, dilation, depth multipliers, every RESIZE_BILINEAR mode) through both the torch
runner and TFLite's own runtime.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import flatbuffers
import numpy as np
import tflite

_TYPES = {np.dtype(np.float32): tflite.TensorType.FLOAT32, np.dtype(np.float16): tflite.TensorType.FLOAT16,
          np.dtype(np.int32): tflite.TensorType.INT32}


@dataclass
class Tensor:
    shape: tuple[int, ...]
    dtype: type = np.float32
    data: np.ndarray | None = None  # a constant when given


@dataclass
class Op:
    name: str  # BuiltinOperator name, e.g. "CONV_2D"
    inputs: list[int]
    outputs: list[int]
    options: str | None = None  # BuiltinOptions name, e.g. "Conv2DOptions"
    fields: dict | None = None  # option field -> value, e.g. {"Padding": 0, "StrideW": 2}


def _vector(builder, start: Callable, values, prepend) -> int:
    start(builder, len(values))
    for v in reversed(values):
        prepend(v)
    return builder.EndVector()


def build(tensors: list[Tensor], ops: list[Op], inputs: list[int], outputs: list[int]) -> bytes:
    """A one-subgraph model: tensor i is tensors[i]; constants get their own buffer (buffer 0 is empty)."""
    b = flatbuffers.Builder(1024)
    buffers, tensor_buffer = [], []
    datas = [None] + [t.data for t in tensors if t.data is not None]
    for data in datas:
        raw = None if data is None else b.CreateByteVector(np.ascontiguousarray(data).tobytes())
        tflite.BufferStart(b)
        if raw is not None:
            tflite.BufferAddData(b, raw)
        buffers.append(tflite.BufferEnd(b))
    k = 0
    for t in tensors:
        if t.data is None:
            tensor_buffer.append(0)
        else:
            k += 1
            tensor_buffer.append(k)

    tensor_offsets = []
    for i, t in enumerate(tensors):
        name = b.CreateString(f"t{i}")
        shape = _vector(b, tflite.TensorStartShapeVector, list(t.shape), b.PrependInt32)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        tflite.TensorAddType(b, _TYPES[np.dtype(t.dtype)])
        tflite.TensorAddBuffer(b, tensor_buffer[i])
        tflite.TensorAddName(b, name)
        tensor_offsets.append(tflite.TensorEnd(b))

    names = sorted({op.name for op in ops})
    code_offsets = []
    for name in names:
        code = getattr(tflite.BuiltinOperator, name)
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, 1)
        code_offsets.append(tflite.OperatorCodeEnd(b))

    op_offsets = []
    for op in ops:
        opts = None
        if op.options is not None:
            getattr(tflite, f"{op.options}Start")(b)
            for field, value in (op.fields or {}).items():
                getattr(tflite, f"{op.options}Add{field}")(b, value)
            opts = getattr(tflite, f"{op.options}End")(b)
        ins = _vector(b, tflite.OperatorStartInputsVector, op.inputs, b.PrependInt32)
        outs = _vector(b, tflite.OperatorStartOutputsVector, op.outputs, b.PrependInt32)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, names.index(op.name))
        tflite.OperatorAddInputs(b, ins)
        tflite.OperatorAddOutputs(b, outs)
        if opts is not None:
            tflite.OperatorAddBuiltinOptionsType(b, getattr(tflite.BuiltinOptions, op.options))
            tflite.OperatorAddBuiltinOptions(b, opts)
        op_offsets.append(tflite.OperatorEnd(b))

    t_vec = _vector(b, tflite.SubGraphStartTensorsVector, tensor_offsets, b.PrependUOffsetTRelative)
    i_vec = _vector(b, tflite.SubGraphStartInputsVector, inputs, b.PrependInt32)
    o_vec = _vector(b, tflite.SubGraphStartOutputsVector, outputs, b.PrependInt32)
    op_vec = _vector(b, tflite.SubGraphStartOperatorsVector, op_offsets, b.PrependUOffsetTRelative)
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, t_vec)
    tflite.SubGraphAddInputs(b, i_vec)
    tflite.SubGraphAddOutputs(b, o_vec)
    tflite.SubGraphAddOperators(b, op_vec)
    subgraph = tflite.SubGraphEnd(b)

    sg_vec = _vector(b, tflite.ModelStartSubgraphsVector, [subgraph], b.PrependUOffsetTRelative)
    codes_vec = _vector(b, tflite.ModelStartOperatorCodesVector, code_offsets, b.PrependUOffsetTRelative)
    buf_vec = _vector(b, tflite.ModelStartBuffersVector, buffers, b.PrependUOffsetTRelative)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddSubgraphs(b, sg_vec)
    tflite.ModelAddOperatorCodes(b, codes_vec)
    tflite.ModelAddBuffers(b, buf_vec)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())
