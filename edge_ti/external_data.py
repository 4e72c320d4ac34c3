"""ONNX weights one tensor at a time: read from a model's external data (checked), written to one
data file. What lets edge_ti.quantize convert a model larger than memory (SDXL's 10 GB UNet).

The source is hostile until checked: an external-data location must name a file inside the model's
folder, and a tensor's stored length must match its shape and (numeric) type, whether the tensor is
read or copied through; anything else is one line naming the model file.
"""
import os

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from .errors import EdgeTIError

_ALIGN = 4096            # external tensors start on a page boundary, so that a reader may map them
_COPY_CHUNK = 64 << 20   # bytes per read when a tensor is copied through unchanged
INLINE_BELOW = 1024      # bytes: smaller tensors stay in the graph file (onnx.save's size_threshold)
EXTERNAL_THRESHOLD = 1 << 30  # above this (protobuf's 2 GiB limit, with a margin) weights go to a data file


def is_external(tensor):
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def attribute_tensors(nodes):
    """Tensors held by NODES' attributes (a Constant's value), subgraphs included: exporters store
    large ones as external data too."""
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from graph.initializer
                yield from attribute_tensors(graph.node)


class ExternalData:
    """A model file's external data: where a tensor's bytes lie (checked) and their values."""

    def __init__(self, model_path):
        self.model_path = model_path
        self.folder = os.path.dirname(os.path.abspath(model_path))

    def locate(self, tensor):
        """(path, offset, length) of TENSOR's bytes, checked against the folder, the file and the
        tensor's own shape and type; a bad entry is one line (EdgeTIError) naming the model file."""
        try:
            return self._locate(tensor)
        except (ValueError, KeyError, OSError, OverflowError) as err:  # "offset": "abc", a NUL in a path...
            raise EdgeTIError(f"{self.model_path}: tensor {tensor.name!r}: unreadable external data "
                              f"({type(err).__name__}: {err})") from None

    def _locate(self, tensor):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        folder = os.path.realpath(self.folder)
        path = os.path.realpath(os.path.join(self.folder, location))
        if not location or os.path.isabs(location) or os.path.splitdrive(location)[0] or \
                os.path.commonpath([path, folder]) != folder:
            raise EdgeTIError(f"{self.model_path}: tensor {tensor.name!r} points to {location!r}, "
                              "outside the model's folder")
        if not os.path.isfile(path):
            raise EdgeTIError(f"{self.model_path}: tensor {tensor.name!r}: its data file {location!r} is missing")
        offset, size = int(info.get("offset", 0)), os.path.getsize(path)
        length = int(info.get("length", size - offset))
        if offset < 0 or length < 0 or offset + length > size:
            raise EdgeTIError(f"{self.model_path}: tensor {tensor.name!r}: bytes {offset}..{offset + length} "
                              f"are beyond the end of {location!r} ({size} bytes)")
        if any(d < 0 for d in tensor.dims):
            raise EdgeTIError(f"{self.model_path}: tensor {tensor.name!r}: negative shape {list(tensor.dims)}")
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)  # KeyError for an unknown type
        if dtype.kind not in "biuf" or length != int(np.prod(tensor.dims, dtype=object)) * dtype.itemsize:
            raise EdgeTIError(f"{self.model_path}: tensor {tensor.name!r}: {length} bytes stored for shape "
                              f"{list(tensor.dims)} of {dtype}")
        return path, offset, length

    def read(self, tensor):
        """The tensor's values (external or inline) as a numpy array."""
        if not is_external(tensor):
            return numpy_helper.to_array(tensor)
        path, offset, length = self.locate(tensor)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.fromfile(path, dtype=dtype, count=length // dtype.itemsize, offset=offset).reshape(
            tuple(tensor.dims))


class DataFile:
    """The output's one external data file, appended to tensor by tensor."""

    def __init__(self, path):
        self.path, self.location = path, os.path.basename(path)
        self.file = open(path, "wb")

    def _start(self):
        offset = -(-self.file.tell() // _ALIGN) * _ALIGN
        self.file.seek(offset)
        return offset

    def _point(self, tensor, offset, length):
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)

    def write_array(self, tensor, array):
        offset = self._start()
        self.file.write(np.ascontiguousarray(array).tobytes())
        self._point(tensor, offset, array.nbytes)

    def copy_from(self, tensor, path, start, length):
        offset = self._start()
        with open(path, "rb") as src:
            src.seek(start)
            for done in range(0, length, _COPY_CHUNK):
                self.file.write(src.read(min(_COPY_CHUNK, length - done)))
        self._point(tensor, offset, length)

    def close(self):
        self.file.close()


def place(tensor, source, data):
    """Where TENSOR goes in the output: small ones inline (onnxruntime's shape inference cannot read a
    Constant's value from external data), the rest in DATA, copied straight from the source's bytes."""
    if is_external(tensor):
        path, offset, length = source.locate(tensor)
        if length >= INLINE_BELOW:
            data.copy_from(tensor, path, offset, length)
        else:
            tensor.CopyFrom(numpy_helper.from_array(source.read(tensor), tensor.name))
    elif len(tensor.raw_data) >= INLINE_BELOW:
        data.write_array(tensor, numpy_helper.to_array(tensor))
