"""Open Inference Protocol datatypes and their numpy equivalents (one table serves every codec)."""

from __future__ import annotations

import numpy as np

# v2 datatype -> numpy dtype (little-endian, as the binary extension requires).
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_V2: dict[str, str] = {dt.str: name for name, dt in V2_TO_NUMPY.items() if name != "BYTES"}
NUMPY_TO_V2["|b1"] = "BOOL"
NUMPY_TO_V2["|u1"] = "UINT8"
NUMPY_TO_V2["|i1"] = "INT8"

# ONNX TensorProto element types -> v2.
ONNX_TO_V2: dict[int, str] = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
    8: "BYTES", 9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64", 16: "BF16",
}

# Triton model-config type names, for /config (perf_analyzer and tritonclient read these).
V2_TO_TRITON = {name: "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}" for name in V2_TO_NUMPY}
V2_TO_TRITON["BF16"] = "TYPE_BF16"


def numpy_dtype(datatype: str) -> np.dtype:
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        raise ValueError(f"unsupported datatype '{datatype}'") from None


def v2_datatype(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return NUMPY_TO_V2[dtype.newbyteorder("<").str if dtype.byteorder == ">" else dtype.str]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no v2 datatype") from None
