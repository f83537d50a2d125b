"""JSON bodies of 1 KB and more are parsed with simdjson (float data straight into numpy), smaller ones
with orjson (service/protocol.py `_parse_simd`). Both must give the same tensors and the same errors."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from service import protocol
from service.errors import InvalidInput
from service.protocol import decode_request

PAD = "p" * 1200  # makes any body larger than SIMD_MIN_BYTES


def _body(inputs, **extra) -> bytes:
    return orjson.dumps({"id": PAD, "inputs": inputs, **extra})


def _decode(body: bytes, parser: str):
    """(inputs, datatypes, id) or the InvalidInput message, through the chosen parser."""
    old = protocol.SIMD_MIN_BYTES
    protocol.SIMD_MIN_BYTES = 0 if parser == "simdjson" else 1 << 62
    try:
        req = decode_request(body, None, None)
        return {k: (v.dtype.str, v.shape, v.tolist()) for k, v in req.inputs.items()}, req.datatypes, req.id
    except InvalidInput as err:
        return err.message
    finally:
        protocol.SIMD_MIN_BYTES = old


rng = np.random.default_rng(0)
CASES = {
    "fp32 flat": [{"name": "x", "datatype": "FP32", "shape": [2, 300], "data": rng.random(600).tolist()}],
    "fp32 nested": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                     "data": [[0.1, 2, -3.5e-3], [1e30, -0.0, 7]]}],
    "fp16 and fp64": [{"name": "a", "datatype": "FP16", "shape": [4], "data": [0.1, 65504, -2, 1e-8]},
                      {"name": "b", "datatype": "FP64", "shape": [3], "data": [0.1, 1e300, -5e-324]}],
    "fp32 overflows to inf": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [3.5e38, -1e39]}],
    "int64 and bool": [{"name": "i", "datatype": "INT64", "shape": [3], "data": [1, -2, 2**62]},
                       {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]}],
    "bytes": [{"name": "s", "datatype": "BYTES", "shape": [2], "data": ["héllo", "x"]}],
    "string in fp32 data": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, "a"]}],
    "null in fp32 data": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, None]}],
    "wrong element count": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0]}],
    "int8 out of range": [{"name": "x", "datatype": "INT8", "shape": [2], "data": [1, 300]}],
    "data is an object": [{"name": "x", "datatype": "FP32", "shape": [1], "data": {"a": 1}}],
    "unknown datatype": [{"name": "x", "datatype": "FP33", "shape": [1], "data": [1]}],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_simdjson_and_orjson_agree(case):
    body = _body(CASES[case], parameters={"binary_data_output": False})
    assert len(body) >= protocol.SIMD_MIN_BYTES
    assert protocol._parse_simd(body) is not None  # noqa: SLF001 - the fast parser did take it
    simd, plain = _decode(body, "simdjson"), _decode(body, "orjson")
    assert repr(simd) == repr(plain)  # repr: NaN (from a null) compares equal to itself
    if case.startswith(("fp", "int64", "bytes", "null")):  # null is NaN in both, as np.asarray makes it
        assert isinstance(simd, tuple), simd  # these decode; the rest are errors
    else:
        assert isinstance(simd, str), simd


@pytest.mark.parametrize("raw", [
    b'{"id": "%s", "inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [123456789012345678901234567890]}]}',
    b'{"id": "%s", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0,]}]}',
    b'["%s"]',
    b'{"id": "%s", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1e400]}]}',
])
def test_what_simdjson_refuses_is_worded_by_orjson(raw):
    """Integers beyond 64 bits, invalid JSON, a non-object: simdjson hands over to orjson, which gives
    the usual 400 message (the fuzz test once found a 500 here)."""
    body = raw.replace(b"%s", PAD.encode())
    assert protocol._parse_simd(body) is None  # noqa: SLF001
    with pytest.raises(InvalidInput) as err:
        decode_request(body, None, None)
    assert err.value.status == 400 and err.value.message


def test_parser_is_reusable_after_a_failed_conversion():
    """A conversion that fails half-way leaves simdjson proxies behind in the traceback; the next
    request must still decode (a fresh parser), not fail with 'parser in use'."""
    bad = _body([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}],
                parameters={"big": 1}).replace(b'"big":1', b'"big":1000000000000000000000000000000')
    assert protocol._parse_simd(bad) is None  # noqa: SLF001
    good = _body([{"name": "x", "datatype": "FP32", "shape": [3], "data": [1.0, 2.5, -4.0]}])
    req = decode_request(good, None, None)
    np.testing.assert_array_equal(req.inputs["x"], np.array([1.0, 2.5, -4.0], np.float32))
