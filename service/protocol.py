"""Open Inference Protocol codec: JSON and binary-extension requests in, responses out.

Every JSON header is parsed by simdjson, whatever its size (one grammar: a repeated key or a UTF-8
BOM is a 400), and numeric `data` becomes a numpy array without a Python object per element, checked
strictly against its datatype; binary tensors are views on the request body (`numpy.frombuffer`),
never copied.
"""

from __future__ import annotations

import itertools
import math
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import simdjson

from backends.datatypes import V2_TO_NUMPY, v2_datatype
from .errors import InvalidInput, PayloadTooLarge

HEADER = "inference-header-content-length"
JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
MAX_DIMS = 32  # numpy's own limit is 64; no served model has more than a handful


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: list[RequestedOutput] | None  # None: all outputs
    binary_output_default: bool
    parameters: dict[str, Any] = field(default_factory=dict)


def _decode_bytes_elements(buf: memoryview, count: int, name: str) -> np.ndarray:
    """BYTES in the binary extension: each element is a little-endian uint32 length, then the bytes."""
    if count * 4 > len(buf):  # checked before allocating: every element needs at least its 4-byte length
        raise InvalidInput(f"input '{name}': {count} BYTES elements need at least {count * 4} bytes, "
                           f"binary_data_size is {len(buf)}")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(buf):
            raise InvalidInput(f"input '{name}': BYTES data ends inside element {i}")
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise InvalidInput(f"input '{name}': BYTES element {i} claims {n} bytes beyond the tensor data")
        out[i] = bytes(buf[pos:pos + n])
        pos += n
    if pos != len(buf):
        raise InvalidInput(f"input '{name}': {len(buf) - pos} bytes left after {count} BYTES elements")
    return out


decode_bytes_elements = _decode_bytes_elements  # for the gRPC codec (raw BYTES tensors, same layout)


def encode_bytes_elements(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


# -- the JSON header: one grammar, whatever the body's size ---------------------------------------
# Every JSON header is parsed by simdjson, small or large: float and integer `data` go straight into
# numpy without a Python object per element, and a 330-byte body parses as fast as with orjson
# (python -m bench.decode). orjson only words the error of a document simdjson refuses. A UTF-8 BOM
# and a repeated key are 400s (docs/hardening.md, "JSON requests").
_BOM = b"\xef\xbb\xbf"
_INT64_MAX = 2**63 - 1
_simd = threading.local()
_DATA_SCAN = 1 << 20  # leaf elements searched for the culprit when a data array is refused
_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})  # the members Kiln reads
_INPUT_KEYS = frozenset({"name", "datatype", "shape", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})


@dataclass
class _TensorHeader:
    """One entry of `inputs`, its JSON checked: `data` is flat and of the datatype, or None when
    the tensor travels binary (parameters.binary_data_size)."""
    name: str
    datatype: str
    shape: tuple[int, ...]
    parameters: dict[str, Any]
    data: np.ndarray | None


@dataclass
class _Header:
    id: str | None
    parameters: dict[str, Any]
    inputs: list[_TensorHeader]
    outputs: list[RequestedOutput] | None
    binary_output_default: bool


def _parse_header(raw: bytes | memoryview) -> _Header:
    if raw[:3] == _BOM:
        raise InvalidInput("request JSON starts with a UTF-8 byte order mark (BOM); JSON sent over a network "
                           "must not have one (RFC 8259, section 8.1)")
    try:
        doc = _parse(raw)
    except (ValueError, RuntimeError) as err:  # simdjson's parse errors (UnicodeDecodeError is a ValueError)
        raise InvalidInput(f"malformed JSON in request body: {_json_error(raw, err)}") from None
    if not isinstance(doc, simdjson.Object):
        del doc
        raise InvalidInput("request body must be a JSON object")
    try:
        return _header(doc)
    except InvalidInput as err:
        message = err.message
    # Raised from here, after the except block: the traceback that held simdjson proxies of `doc` is
    # gone, so the thread's parser is free for the next request.
    del doc
    raise InvalidInput(message)


def _parse(raw: bytes | memoryview) -> Any:
    parser = getattr(_simd, "parser", None)
    if parser is None:
        parser = _simd.parser = simdjson.Parser()
    try:
        return parser.parse(raw)
    except RuntimeError as err:
        if "re-use a parser" not in str(err):
            raise
    # Proxies of an earlier document are still alive somewhere (an exception not yet freed): a fresh parser.
    parser = _simd.parser = simdjson.Parser()
    return parser.parse(raw)


def _json_error(raw: bytes | memoryview, err: Exception) -> str:
    """orjson's words (with line and column) for a document simdjson refused."""
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as oerr:
        return str(oerr)
    if str(err).startswith(("BIGINT_ERROR", "NUMBER_ERROR")):  # orjson makes such an integer a float
        return ("an integer literal does not fit in 64 bits (-2**63 to 2**64-1); write a float with a "
                "decimal point or an exponent")
    return str(err)


def _members(obj: simdjson.Object, where: str, read: frozenset[str]) -> dict[str, Any]:
    """The members Kiln reads of a JSON object, once the object is known to repeat no key: RFC 8259
    leaves a repeated name to the parser (orjson keeps the last, simdjson and RapidJSON the first),
    so a request that a proxy and Kiln could read differently is refused."""
    keys = list(obj)
    if len(set(keys)) != len(keys):
        raise InvalidInput(f"duplicate key '{_repeated(keys)}' in {where}")
    return {key: obj[key] for key in keys if key in read}  # a key read once: no repeat is fetched


def _repeated(keys: list[str]) -> str:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    raise AssertionError("no repeated key")


def _parameters(value: Any, where: str) -> dict[str, Any]:
    """A `$parameters` object: string keys, each once, to a string, number or boolean."""
    if value is None:  # an optional member sent as null (pydantic-based clients do): absent
        return {}
    if not isinstance(value, simdjson.Object):
        raise InvalidInput(f"{where}: 'parameters' must be a JSON object")
    params = value.as_dict()  # values must be scalars, so converting them all at once costs nothing
    if len(params) != len(value):  # len() of the simdjson object counts every member, repeats included
        raise InvalidInput(f"duplicate key '{_repeated(list(value))}' in {where} parameters")
    for key, v in params.items():
        if not isinstance(v, (str, int, float)):  # bool is an int
            raise InvalidInput(f"{where}: parameter '{key}' must be a string, number or boolean, not {_show(v)}")
    return params


def _flag(params: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}: parameters.{key} must be a boolean (true or false), not {_show(value)}")
    return value


def _header(doc: simdjson.Object) -> _Header:
    m = _members(doc, "the request", _REQUEST_KEYS)
    rid = m.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidInput(f"'id' must be a JSON string, not {_show(rid)}")
    params = _parameters(m.get("parameters"), "the request")
    default_binary = _flag(params, "binary_data_output", "the request", False)
    raw_inputs = m.get("inputs")
    if not isinstance(raw_inputs, simdjson.Array) or not len(raw_inputs):
        raise InvalidInput("request needs a non-empty 'inputs' list")
    inputs: list[_TensorHeader] = []
    names: set[str] = set()
    for i, item in enumerate(raw_inputs):
        tensor = _input(item, i)
        if tensor.name in names:
            raise InvalidInput(f"input '{tensor.name}' given twice")
        names.add(tensor.name)
        inputs.append(tensor)
    outputs = None
    raw_outputs = m.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, simdjson.Array):
            raise InvalidInput("'outputs' must be a list")
        outputs = [_output(o, i, default_binary) for i, o in enumerate(raw_outputs)]
    return _Header(rid, params, inputs, outputs, default_binary)


def _input(item: Any, i: int) -> _TensorHeader:
    if not isinstance(item, simdjson.Object):
        raise InvalidInput("each input needs a 'name'")
    m = _members(item, f"inputs[{i}]", _INPUT_KEYS)
    name = m.get("name")
    if not isinstance(name, str):
        raise InvalidInput("each input needs a 'name'")
    datatype = m.get("datatype")
    if datatype not in V2_TO_NUMPY:
        raise InvalidInput(f"input '{name}': unknown datatype {_show(datatype)}")
    shape = _shape(m.get("shape"), name, datatype)
    params = _parameters(m.get("parameters"), f"input '{name}'")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer")
        return _TensorHeader(name, datatype, shape, params, None)
    if "data" not in m:
        raise InvalidInput(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    return _TensorHeader(name, datatype, shape, params, json_data(m["data"], datatype, name))


def _output(item: Any, i: int, default_binary: bool) -> RequestedOutput:
    if not isinstance(item, simdjson.Object):
        raise InvalidInput("each requested output needs a 'name'")
    m = _members(item, f"outputs[{i}]", _OUTPUT_KEYS)
    name = m.get("name")
    if not isinstance(name, str):
        raise InvalidInput("each requested output needs a 'name'")
    where = f"output '{name}'"
    params = _parameters(m.get("parameters"), where)
    cls = params.get("classification", 0)
    if not isinstance(cls, int) or isinstance(cls, bool) or cls < 0:
        raise InvalidInput(f"{where}: classification must be a non-negative integer")
    return RequestedOutput(name, _flag(params, "binary_data", where, default_binary), cls)


def _shape(raw: Any, name: str, datatype: str) -> tuple[int, ...]:
    """The shape, checked before anything is allocated for it: non-negative int64 dimensions, at
    most MAX_DIMS, and a tensor numpy can address even when another dimension is 0 ([2**62, 0] of
    FP32 would be 2**64 bytes per unit of the 0 dimension)."""
    if not isinstance(raw, simdjson.Array):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers")
    if len(raw) > MAX_DIMS:
        raise InvalidInput(f"input '{name}': {len(raw)} dimensions (at most {MAX_DIMS})")
    dims = raw.as_list()
    span = V2_TO_NUMPY[datatype].itemsize  # exact: Python integers do not overflow
    for d in dims:
        if type(d) is not int or d < 0 or d > _INT64_MAX:
            raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers below 2**63")
        if d:
            span *= d
    if span > _INT64_MAX:
        raise InvalidInput(f"input '{name}': shape {dims} is too large: its non-zero dimensions make "
                           f"{span:,} bytes of {datatype}, more than 2**63-1")
    return tuple(dims)


# -- JSON tensor data, strictly by datatype -------------------------------------------------------
_BUFFER_TYPES = {"f": ("d", np.dtype(np.float64)), "i": ("i", np.dtype(np.int64)), "u": ("u", np.dtype(np.uint64))}
_WANTED = {"f": "JSON numbers", "i": "JSON integers", "u": "JSON integers"}
# The smallest magnitude that rounds to inf in FP16 / FP32: half an ulp above the largest finite value
# (round to nearest even takes that tie up). JSON has no inf, so anything from there on is an overflow.
_FLOAT_OVERFLOW = {dt: float(np.finfo(dt).max) + 2.0 ** (np.finfo(dt).maxexp - 2 - np.finfo(dt).nmant)
                   for dt in (np.dtype("<f2"), np.dtype("<f4"))}


def json_data(value: Any, datatype: str, name: str) -> np.ndarray:
    """The JSON `data` of one input as a flat array of the datatype's dtype, or a 400 that names the
    first element at fault. As Triton reads it: BOOL takes true/false only, integer types take JSON
    integers only (no 1.0, no 1e2), float types any JSON number; never null, strings or booleans for
    numbers; BYTES takes strings. Beyond Triton, every value must fit its datatype: INT8 300,
    UINT8 -1 and FP32 1e39 (which would become inf) are refused. Nested arrays are flattened.
    Numbers are checked with numpy over the whole array: no Python object per element."""
    if not isinstance(value, simdjson.Array):
        raise InvalidInput(f"input '{name}': 'data' must be a JSON array, not {_show(value)}")
    dtype = V2_TO_NUMPY[datatype]
    if dtype.kind in _BUFFER_TYPES:
        of_type, buffer_dtype = _BUFFER_TYPES[dtype.kind]
        try:
            flat = np.frombuffer(value.as_buffer(of_type=of_type), buffer_dtype)
        except (TypeError, ValueError):  # an element of another JSON type, or an integer beyond 64 bits
            flat = None
        if flat is None:
            raise InvalidInput(f"input '{name}': {_culprit(value, datatype)}")
        return _narrow(flat, dtype, datatype, name)
    if datatype == "BOOL":
        try:
            arr = np.array(value.as_list())
        except ValueError:  # ragged nesting: flattened below
            arr = None
        if arr is not None and (arr.dtype == np.bool_ or arr.size == 0):
            return arr.reshape(-1).astype(np.bool_, copy=False)
        leaves = list(_leaves(value))
        for i, v in enumerate(leaves):
            if type(v) is not bool:
                raise InvalidInput(f"input '{name}': element {i} is {_show(v)}: BOOL data must be true or false")
        return np.array(leaves, dtype=np.bool_)
    leaves = list(_leaves(value))  # BYTES
    for i, v in enumerate(leaves):
        if type(v) is not str:
            raise InvalidInput(f"input '{name}': element {i} is {_show(v)}: BYTES data must be JSON strings")
    out = np.empty(len(leaves), dtype=object)
    out[:] = [s.encode() for s in leaves]
    return out


def _narrow(flat: np.ndarray, dtype: np.dtype, datatype: str, name: str) -> np.ndarray:
    """float64 / int64 / uint64 as parsed → the datatype, refusing what does not fit."""
    if dtype.kind == "f":
        if dtype.itemsize == 8:
            return flat
        limit = _FLOAT_OVERFLOW[dtype]
        if flat.size and (flat.max() >= limit or flat.min() <= -limit):
            i = int(np.argmax(np.abs(flat) >= limit))
            raise InvalidInput(f"input '{name}': element {i} is {float(flat[i])!r}, out of range for {datatype} "
                               f"(largest finite value {float(np.finfo(dtype).max)!r})")
        return flat.astype(dtype)
    if dtype.itemsize < 8 and flat.size:
        info = np.iinfo(dtype)
        if flat.min() < info.min or flat.max() > info.max:
            i = int(np.argmax((flat < info.min) | (flat > info.max)))
            raise InvalidInput(f"input '{name}': element {i} is {int(flat[i])}, out of range for {datatype} "
                               f"[{info.min}, {info.max}]")
    return flat.astype(dtype, copy=False)


def _culprit(value: simdjson.Array, datatype: str) -> str:
    """Why simdjson would not flatten a numeric data array: the first element that is not a number
    of the datatype, searched among the first _DATA_SCAN elements (a bound on work for a bad body)."""
    kind = V2_TO_NUMPY[datatype].kind
    info = np.iinfo(V2_TO_NUMPY[datatype]) if kind != "f" else None
    for i, v in enumerate(itertools.islice(_leaves(value), _DATA_SCAN)):
        number = type(v) in (int, float) if kind == "f" else type(v) is int
        if not number:
            return f"element {i} is {_show(v)}: {datatype} data must be {_WANTED[kind]}"
        if info is not None and not info.min <= v <= info.max:
            return f"element {i} is {v}, out of range for {datatype} [{info.min}, {info.max}]"
    return f"{datatype} data must be {_WANTED[kind]}"


def _leaves(arr: simdjson.Array):
    """The elements of a nested data array in row-major order, one at a time, whatever the nesting
    (a stack, not recursion: simdjson allows 1024 levels, Python's recursion limit is lower)."""
    stack = [iter(arr)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, simdjson.Array):
                stack.append(iter(v))
                break
            yield v
        else:
            stack.pop()


def _show(v: Any) -> str:
    """A JSON value as the client wrote it, shortly, for error messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f"the string {orjson.dumps(v[:32]).decode()}" + ("…" if len(v) > 32 else "")
    if isinstance(v, (simdjson.Object, dict)):
        return "an object"
    if isinstance(v, (simdjson.Array, list)):
        return "an array"
    return repr(v)


def decompress(body: bytes, encoding: str | None, limit: int | None = None) -> bytes:
    """Inflate a gzip/deflate body; more than `limit` bytes inflated (a zip bomb) is a 413."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"unsupported Content-Encoding '{encoding}' (gzip, deflate)")
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        out = d.decompress(body, limit + 1) if limit else d.decompress(body)
        if limit and len(out) > limit:
            raise PayloadTooLarge(f"{encoding} body inflates past the limit of {limit} bytes")
        if not d.eof:
            raise InvalidInput(f"body is not valid {encoding}: incomplete or truncated stream")
        if d.unused_data:  # one stream, nothing after it: a second gzip member is not read either
            raise InvalidInput(f"body is not valid {encoding}: {len(d.unused_data)} bytes after the end of the "
                               f"compressed stream (trailing data or a second gzip member)")
        return out
    except zlib.error as err:
        raise InvalidInput(f"body is not valid {encoding}: {err}") from None


def decode_request(body: bytes, header_length: str | None, single_input: tuple[str, str, tuple[int, ...]] | None,
                   binary: memoryview | None = None) -> InferRequest:
    """Parse an infer request. `single_input` (name, datatype, shape) enables the raw binary form.
    `binary`: the bytes after the JSON header when they were received apart from it (staged
    straight into the batcher's memory, service/http_protocol.py); `body` is then the header only."""
    if header_length is not None:
        try:
            hlen = int(header_length)
        except ValueError:
            raise InvalidInput(f"Inference-Header-Content-Length '{header_length}' is not an integer") from None
        if hlen < 0 or hlen > len(body):
            raise InvalidInput(f"Inference-Header-Content-Length {hlen} exceeds the body length {len(body)}")
        if hlen == 0:
            return _raw_binary(body, single_input)
    else:
        hlen = len(body)
    view = memoryview(body)
    header = _parse_header(body if hlen == len(body) and isinstance(body, bytes) else view[:hlen])
    binary = view[hlen:] if binary is None else memoryview(binary)

    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for t in header.inputs:
        name, datatype, shape = t.name, t.datatype, t.shape
        count = math.prod(shape)
        if t.data is None:
            size = t.parameters["binary_data_size"]
            if offset + size > len(binary):
                raise InvalidInput(f"input '{name}': binary_data_size {size} runs past the end of the body "
                                   f"({len(binary) - offset} bytes left)")
            chunk = binary[offset:offset + size]
            offset += size
            if datatype == "BYTES":
                arr = _decode_bytes_elements(chunk, count, name).reshape(shape)
            else:
                dtype = V2_TO_NUMPY[datatype]
                if size != count * dtype.itemsize:
                    raise InvalidInput(f"input '{name}': shape {list(shape)} of {datatype} needs "
                                       f"{count * dtype.itemsize} bytes, binary_data_size is {size}")
                arr = np.frombuffer(chunk, dtype=dtype).reshape(shape)
        else:
            if t.data.size != count:
                raise InvalidInput(f"input '{name}': shape {list(shape)} needs {count} elements, "
                                   f"data has {t.data.size}")
            arr = t.data.reshape(shape)
        inputs[name] = arr
        datatypes[name] = datatype
    if offset != len(binary):
        raise InvalidInput(f"body has {len(binary) - offset} bytes beyond the declared binary tensors")
    return InferRequest(header.id, inputs, datatypes, header.outputs, header.binary_output_default,
                        header.parameters)


def _raw_binary(body: bytes, single_input: tuple[str, str, tuple[int, ...]] | None) -> InferRequest:
    """Inference-Header-Content-Length: 0 — the body is the model's only input, batch 1."""
    if single_input is None:
        raise InvalidInput("a raw binary request (Inference-Header-Content-Length: 0) needs a model with one input")
    name, datatype, spec_shape = single_input
    if datatype == "BYTES":
        arr = _decode_bytes_elements(memoryview(body), 1, name).reshape(1)
        return InferRequest(None, {name: arr}, {name: datatype}, None, True)
    dtype = V2_TO_NUMPY[datatype]
    shape = [1 if (i == 0 and d == -1) else d for i, d in enumerate(spec_shape)]
    known = int(np.prod([d for d in shape if d != -1])) * dtype.itemsize
    variable = shape.count(-1)
    if variable > 1:
        raise InvalidInput("a raw binary request needs a model input with at most one variable dimension")
    if known == 0 or len(body) % known:
        raise InvalidInput(f"raw binary body of {len(body)} bytes does not fit input '{name}' {list(spec_shape)}")
    if variable:
        shape[shape.index(-1)] = len(body) // known
    elif len(body) != known:
        raise InvalidInput(f"raw binary body of {len(body)} bytes; input '{name}' needs {known}")
    arr = np.frombuffer(body, dtype=dtype).reshape(shape)
    return InferRequest(None, {name: arr}, {name: datatype}, None, True)


def classify(arr: np.ndarray, k: int, labels: list[str] | None) -> np.ndarray:
    """Triton's classification extension: top-k as 'score:index[:label]' strings per batch row."""
    rows = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)
    k = min(k, rows.shape[1])
    idx = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    out = np.empty(idx.shape, dtype=object)
    for r in range(idx.shape[0]):
        for j, i in enumerate(idx[r]):
            label = f":{labels[i]}" if labels and i < len(labels) else ""
            out[r, j] = f"{float(rows[r, i]):f}:{int(i)}{label}".encode()
    return out if arr.ndim > 1 else out.reshape(-1)


def encode_response(model: str, version: str, request_id: str | None,
                    outputs: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, dict[str, str]]:
    """Body and extra headers. Outputs flagged binary go after the JSON header."""
    tensors = []
    blobs: list[bytes] = []
    for name, arr, binary in outputs:
        datatype = v2_datatype(arr.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            blob = encode_bytes_elements(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b) for b in arr.reshape(-1)]
        elif arr.dtype.byteorder == ">" or arr.dtype == np.float16:
            entry["data"] = arr.astype(arr.dtype.newbyteorder("=") if arr.dtype != np.float16 else np.float32).reshape(-1).tolist()
        else:
            entry["data"] = np.ascontiguousarray(arr).reshape(-1)
        tensors.append(entry)
    resp: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request_id is not None:
        resp["id"] = request_id
    header = orjson.dumps(resp, option=JSON_OPTS)
    if not blobs:
        return header, {"content-type": "application/json"}
    return b"".join([header, *blobs]), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
