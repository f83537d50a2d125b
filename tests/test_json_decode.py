"""The JSON decoder (service/protocol.py) directly: one grammar whatever the body's size, and the v2
datatypes read strictly (issue 17, items 6-8). The same requests over the real server:
tests/test_hardening_decode.py."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from backends.datatypes import V2_TO_NUMPY
from service import protocol
from service.errors import InvalidInput
from service.protocol import decode_request

PAD = "p" * 1200  # an id this long puts any body past 1 KiB (where simdjson used to take over from orjson)


def _decode(body: bytes, header_length: str | None = None):
    """(tensors, datatypes, id, outputs, binary default) or the 400's message."""
    try:
        req = decode_request(body, header_length, None)
    except InvalidInput as err:
        assert err.status == 400
        return err.message
    tensors = {k: (v.dtype.str, v.shape, v.tolist()) for k, v in req.inputs.items()}
    return tensors, req.datatypes, req.id, req.outputs, req.binary_output_default


def _small_and_large(raw: bytes) -> tuple[bytes, bytes]:
    """The request as written, and the same with a 1,200-character id in front (its "id" replaced,
    when it has one, so that the large body holds the same keys)."""
    assert raw.startswith(b"{")
    large = b'{"id": "%s", ' % PAD.encode() + raw[1:]
    if b'"id"' in raw[1:]:
        large = large.replace(b'"id"', b'"_id"', 1)
    return raw, large


rng = np.random.default_rng(0)
X = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.5, -2.0]}
SIZE_CASES = {
    "fp32 flat": orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 20],
                                           "data": rng.random(40).round(6).tolist()}]}),
    "fp32 nested": orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                                             "data": [[0.1, 2, -3.5e-3], [1e30, -0.0, 7]]}]}),
    "int64 and bool": orjson.dumps({"inputs": [
        {"name": "i", "datatype": "INT64", "shape": [3], "data": [1, -2, 2**62]},
        {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]}]}),
    "bytes": orjson.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "data": ["héllo", "x"]}]}),
    "outputs and parameters": orjson.dumps({"inputs": [X], "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
                                            "parameters": {"binary_data_output": False, "timeout": 5}}),
    # Item 6: a repeated key, at each level Kiln reads, and a BOM.
    "inputs twice": b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], '
                    b'"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [2.0]}]}',
    "id twice": b'{"id": "a", "id": "b", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}',
    "data twice": b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0], "data": [2.0]}]}',
    "escaped name twice": b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0], '
                          b'"d\\u0061ta": [2.0]}]}',
    "input parameters twice": b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], '
                              b'"parameters": {"binary_data_size": 4, "binary_data_size": 8}}]}',
    "request parameters twice": b'{"parameters": {"binary_data_output": true, "binary_data_output": false}, '
                                b'"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}',
    "output twice": b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], '
                    b'"outputs": [{"name": "y", "name": "z"}]}',
    "output parameters twice": b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], '
                               b'"outputs": [{"name": "y", "parameters": {"binary_data": true, "binary_data": false}}]}',
    # Items 7 and 8 on both sides of the old threshold too.
    "huge zero-size shape": orjson.dumps({"inputs": [{**X, "shape": [2**62, 0], "data": []}]}),
    "null in fp32": orjson.dumps({"inputs": [{**X, "data": [1.0, None]}]}),
    "wrong element count": orjson.dumps({"inputs": [{**X, "shape": [3]}]}),
    "integer beyond 64 bits": b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], '
                              b'"data": [123456789012345678901234567890]}]}',
}
DUPLICATES = {"inputs twice": "inputs", "id twice": "id", "data twice": "data", "escaped name twice": "data",
              "input parameters twice": "binary_data_size", "request parameters twice": "binary_data_output",
              "output twice": "name", "output parameters twice": "binary_data"}


@pytest.mark.parametrize("case", list(SIZE_CASES))
def test_the_answer_does_not_depend_on_the_body_size(case):
    """Issue 17 item 6: below 1 KiB (orjson) the last duplicate won, from 1 KiB (simdjson) the first."""
    small, large = _small_and_large(SIZE_CASES[case])
    assert len(small) < 1024 <= len(large)
    got_small, got_large = _decode(small), _decode(large)
    if isinstance(got_small, tuple):
        assert got_large[2] == PAD and got_small[2] is None
        assert got_small[:2] == got_large[:2] and got_small[3:] == got_large[3:]
    else:
        assert got_small == got_large
    if case in DUPLICATES:
        assert got_small.startswith(f"duplicate key '{DUPLICATES[case]}'"), got_small


@pytest.mark.parametrize("raw", [b'{"inputs": []}', b'{"id": "%s", "inputs": []}' % PAD.encode()])
def test_a_utf8_bom_is_refused_at_any_size(raw):
    for body, hlen in ((b"\xef\xbb\xbf" + raw, None), (b"\xef\xbb\xbf" + raw, str(len(raw) + 3))):
        message = _decode(body, hlen)
        assert isinstance(message, str) and "byte order mark" in message, message
    assert "non-empty 'inputs'" in _decode(raw)  # the same body without its BOM reaches the next check


def test_keys_repeated_where_kiln_does_not_read_are_not_interpreted():
    """A key may repeat inside a value Kiln never reads; only the objects it reads are checked."""
    body = b'{"x-extra": {"a": 1, "a": 2}, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [3]}]}'
    tensors = _decode(body)[0]
    assert tensors == {"x": ("<f4", (1,), [3.0])}


# -- datatypes ------------------------------------------------------------------------------------
def _one(datatype: str, data, shape=None) -> object:
    """Decode one input "t"; `data` may be JSON text (bytes) for what Python cannot write: 1e309, 2**64."""
    shape = [len(data)] if shape is None else shape
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    got = _decode(b'{"inputs": [{"name": "t", "datatype": "%s", "shape": %s, "data": %s}]}'
                  % (datatype.encode(), orjson.dumps(shape), raw))
    return got if isinstance(got, str) else got[0]["t"]


INTS = ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
FLOATS = ["FP16", "FP32", "FP64"]


def test_the_table_covers_all_13_datatypes():
    assert set(V2_TO_NUMPY) == {"BOOL", "BYTES", *INTS, *FLOATS}


@pytest.mark.parametrize("datatype", INTS)
def test_integers_at_their_limits_decode_exactly(datatype):
    info = np.iinfo(V2_TO_NUMPY[datatype])
    got = _one(datatype, [int(info.min), 0, int(info.max)])
    assert got == (V2_TO_NUMPY[datatype].str, (3,), [int(info.min), 0, int(info.max)])


@pytest.mark.parametrize("datatype", INTS)
def test_integers_out_of_range_are_refused(datatype):
    info = np.iinfo(V2_TO_NUMPY[datatype])
    for bad in (int(info.min) - 1, int(info.max) + 1):
        if bad < -2**63 or bad >= 2**64:  # not a 64-bit JSON integer at all
            assert "does not fit in 64 bits" in _one(datatype, b"[0, %d]" % bad, shape=[2])
            continue
        message = _one(datatype, [0, bad])
        assert message == (f"input 't': element 1 is {bad}, out of range for {datatype} "
                           f"[{info.min}, {info.max}]"), message


@pytest.mark.parametrize("datatype", INTS)
@pytest.mark.parametrize("bad,shown", [(None, "null"), (True, "true"), ("1", 'the string "1"'), (1.0, "1.0"),
                                       (2.5, "2.5"), ({"v": 1}, "an object")])
def test_integers_take_json_integers_only(datatype, bad, shown):
    """As Triton (RapidJSON IsInt64/IsUint64): 1.0 and 1e2 are not integers in JSON's grammar."""
    message = _one(datatype, [1, 2, bad])
    assert message == f"input 't': element 2 is {shown}: {datatype} data must be JSON integers", message


@pytest.mark.parametrize("datatype", FLOATS)
@pytest.mark.parametrize("bad,shown", [(None, "null"), (True, "true"), (False, "false"), ("1.0", 'the string "1.0"'),
                                       ([], None), ({"v": 1}, "an object")])
def test_floats_take_json_numbers_only(datatype, bad, shown):
    if shown is None:  # an empty nested array is flattened away: the count is then wrong
        assert "needs 3 elements, data has 2" in _one(datatype, [1.5, 2, bad], shape=[3])
        return
    message = _one(datatype, [1.5, 2, bad])
    assert message == f"input 't': element 2 is {shown}: {datatype} data must be JSON numbers", message


@pytest.mark.parametrize("datatype,big", [("FP16", 65520.0), ("FP16", -1e5), ("FP32", 1e39), ("FP32", -3.5e38)])
def test_floats_beyond_their_datatype_are_refused_not_made_inf(datatype, big):
    info = np.finfo(V2_TO_NUMPY[datatype])
    assert _one(datatype, [float(info.max), float(info.min)]) == (V2_TO_NUMPY[datatype].str, (2,),
                                                                  [float(info.max), float(info.min)])
    message = _one(datatype, [0.0, float(info.max), big])
    assert message.startswith(f"input 't': element 2 is {big!r}, out of range for {datatype}"), message


def test_floats_in_range_and_underflow_decode():
    got = _one("FP32", [1e-50, 3.4028235e38, -0.0, 7])
    assert got[0] == "<f4" and got[2][0] == 0.0 and got[2][1] == float(np.finfo(np.float32).max)
    assert _one("FP64", [1e308, 5e-324]) == ("<f8", (2,), [1e308, 5e-324])
    assert "infinity" in _one("FP64", b"[1e309]", shape=[1])  # JSON's own limit: malformed, as orjson words it


def test_bool_takes_true_and_false_only():
    """As Triton (RapidJSON IsBool): 0 and 1 are numbers, not booleans."""
    assert _one("BOOL", [[True, False], [False, True]], shape=[2, 2]) == ("|b1", (2, 2), [[True, False], [False, True]])
    for bad, shown in ((0, "0"), (1, "1"), (None, "null"), ("true", 'the string "true"'), (1.0, "1.0")):
        message = _one("BOOL", [True, bad])
        assert message == f"input 't': element 1 is {shown}: BOOL data must be true or false", message


def test_bytes_take_strings_only():
    assert _one("BYTES", ["a", "é", ""]) == ("|O", (3,), [b"a", "é".encode(), b""])
    for bad, shown in ((1, "1"), (None, "null"), (True, "true"), ({"s": "x"}, "an object")):
        message = _one("BYTES", ["a", bad])
        assert message == f"input 't': element 1 is {shown}: BYTES data must be JSON strings", message


@pytest.mark.parametrize("datatype", ["BOOL", "BYTES", *INTS, *FLOATS])
def test_every_datatype_takes_ragged_and_nested_data_flattened_and_checks_the_count(datatype):
    value = {"BOOL": True, "BYTES": "s"}.get(datatype, 1)
    got = _one(datatype, [[value, value], [value]], shape=[3])
    assert got[1] == (3,) and got[0] == V2_TO_NUMPY[datatype].str
    assert _one(datatype, [[value], [value]], shape=[3]).endswith("needs 3 elements, data has 2")
    assert "'data' must be a JSON array, not" in _one(datatype, value, shape=[1])


@pytest.mark.parametrize("datatype", ["BOOL", "BYTES", "INT32", "FP32"])
def test_deeply_nested_data_is_flattened_for_every_datatype(datatype):
    """Nesting up to simdjson's 1024 levels is flattened alike by numeric and element-wise paths."""
    value = orjson.dumps({"BOOL": True, "BYTES": "s"}.get(datatype, 1))
    deep = b"[" * 1000 + value + b"]" * 1000  # orjson would not write it
    got = _one(datatype, b"[%s, %s, [[%s]]]" % (deep, value, value), shape=[3])
    assert got[0] == V2_TO_NUMPY[datatype].str and got[1] == (3,)
    bad = b"null" if datatype != "BYTES" else b"0"
    assert "element 1 is" in _one(datatype, b"[%s, %s, [[%s]]]" % (deep, bad, value), shape=[3])
    assert "malformed JSON" in _one(datatype, b"[" * 1100 + b"]" * 1100, shape=[0])  # simdjson's depth limit


# -- the request's other members -----------------------------------------------------------------
def _request(**members) -> object:
    return _decode(orjson.dumps({"inputs": [X], **members}))


@pytest.mark.parametrize("members,needle", [
    ({"id": {"a": 1}}, "'id' must be a JSON string, not an object"),
    ({"id": 7}, "'id' must be a JSON string, not 7"),
    ({"id": ["x"]}, "'id' must be a JSON string, not an array"),
    ({"parameters": []}, "the request: 'parameters' must be a JSON object"),
    ({"parameters": "x"}, "the request: 'parameters' must be a JSON object"),
    ({"parameters": {"p": None}}, "parameter 'p' must be a string, number or boolean, not null"),
    ({"parameters": {"p": {"q": 1}}}, "parameter 'p' must be a string, number or boolean, not an object"),
    ({"parameters": {"binary_data_output": "false"}}, "binary_data_output must be a boolean (true or false), not the string \"false\""),
    ({"parameters": {"binary_data_output": 0}}, "binary_data_output must be a boolean (true or false), not 0"),
    ({"outputs": [{"name": "y", "parameters": {"binary_data": "false"}}]},
     "output 'y': parameters.binary_data must be a boolean (true or false), not the string \"false\""),
    ({"outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}, "binary_data must be a boolean"),
    ({"outputs": [{"name": "y", "parameters": {"classification": True}}]}, "classification must be a non-negative integer"),
    ({"outputs": [{"name": "y", "parameters": []}]}, "output 'y': 'parameters' must be a JSON object"),
    ({"outputs": {"name": "y"}}, "'outputs' must be a list"),
    ({"outputs": [{"name": 3}]}, "each requested output needs a 'name'"),
])
def test_members_of_the_wrong_json_type_are_refused(members, needle):
    message = _request(**members)
    assert isinstance(message, str) and needle in message, message


def test_optional_members_sent_as_null_are_absent():
    """pydantic-based clients send unset optional members as null."""
    tensors, _, rid, outputs, binary = _request(id=None, parameters=None, outputs=None)
    assert tensors == {"x": ("<f4", (2,), [1.5, -2.0])} and rid is None and outputs is None and binary is False
    body = orjson.dumps({"inputs": [{**X, "parameters": None}], "outputs": [{"name": "y", "parameters": None}]})
    assert _decode(body)[3][0].binary is False


def test_binary_data_flags_are_read_as_booleans():
    _, _, rid, outputs, binary = _request(id="r1", parameters={"binary_data_output": True},
                                          outputs=[{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}])
    assert rid == "r1" and binary is True
    assert [(o.name, o.binary) for o in outputs] == [("a", True), ("b", False)]


# -- shapes (item 7) ------------------------------------------------------------------------------
def _binary(shape: list[int], size: int, datatype: str = "FP32") -> tuple[bytes, str]:
    header = orjson.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": shape,
                                       "parameters": {"binary_data_size": size}}]})
    return header + b"\0" * size, str(len(header))


@pytest.mark.parametrize("shape", [[2**62, 0], [0, 2**62], [2**31, 2**31, 0], [2**61, 0, 4]])
def test_a_zero_size_tensor_too_large_to_address_is_a_400_not_a_500(shape):
    """Issue 17 item 7: was `500 internal error: ValueError: array is too big` (numpy's reshape)."""
    for got in (_decode(orjson.dumps({"inputs": [{**X, "shape": shape, "data": []}]})), _decode(*_binary(shape, 0))):
        assert isinstance(got, str) and got.startswith(f"input 'x': shape {shape} is too large"), got
        assert "more than 2**63-1" in got


def test_addressable_zero_size_tensors_still_decode():
    assert _decode(orjson.dumps({"inputs": [{**X, "shape": [0, 8], "data": []}]}))[0]["x"] == ("<f4", (0, 8), [])
    req = decode_request(*_binary([2**40, 0], 0), None)
    assert req.inputs["x"].shape == (2**40, 0) and req.inputs["x"].dtype == np.float32


@pytest.mark.parametrize("shape", [[-1], [2**63], [2**64 - 1], [1.0], [True], "3", [[2]]])
def test_dimensions_must_be_int64_and_non_negative(shape):
    message = _decode(orjson.dumps({"inputs": [{**X, "shape": shape, "data": [1.0]}]}))
    assert isinstance(message, str) and "'shape' must be a list of non-negative integers" in message, message


def test_counts_are_checked_against_the_binary_size_before_allocating():
    message = _decode(*_binary([2**40, 2**20], 16))
    assert "needs 4611686018427387904 bytes, binary_data_size is 16" in message
    assert "at least" in _decode(*_binary([2**40], 16, "BYTES"))


# -- malformed JSON and parser reuse --------------------------------------------------------------
@pytest.mark.parametrize("raw,needle", [
    (b'{"inputs": [', "unexpected end of data"),
    (b'{"inputs": [1,]}', "trailing comma"),
    (b'{"inputs": NaN}', "unexpected character"),
    (b'{"id": "\\ud800", "inputs": []}', "surrogate"),
    (b'{"id": "\xff", "inputs": []}', "UTF-8"),
    (b'', "empty"),
    (b'[1]', "must be a JSON object"),
])
def test_malformed_json_is_worded_with_its_position(raw, needle):
    for body in (raw, raw + b" " * 1500):
        message = _decode(body)
        assert isinstance(message, str) and needle in message, message


def test_the_parser_is_reusable_after_a_refused_request():
    """A refusal raised while simdjson proxies are alive must not leave the thread's parser 'in use'
    (the next request would need a fresh parser, whose buffers grow again)."""
    _decode(orjson.dumps({"inputs": [X]}))
    parser = protocol._simd.parser
    int8_1000 = b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1000]}]}'
    for bad in (SIZE_CASES["null in fp32"], SIZE_CASES["inputs twice"], int8_1000,
                b'{"a": 123456789012345678901234567890}'):
        assert isinstance(_decode(bad), str)
        tensors = _decode(orjson.dumps({"inputs": [{**X, "data": [1.0, 2.5]}]}))[0]
        assert tensors == {"x": ("<f4", (2,), [1.0, 2.5])}
        assert protocol._simd.parser is parser


def test_a_culprit_past_the_search_bound_still_gets_a_400(monkeypatch):
    """The search for the element at fault stops after protocol._DATA_SCAN elements (bounded work
    for a bad body): the refusal then names the rule without an index."""
    monkeypatch.setattr(protocol, "_DATA_SCAN", 2)
    assert _one("FP32", [1.0, 2.0, None]) == "input 't': FP32 data must be JSON numbers"
    assert _one("INT16", [1, 2, 1.5]) == "input 't': INT16 data must be JSON integers"
    assert _one("FP32", [None, 2.0, 3.0]) == "input 't': element 0 is null: FP32 data must be JSON numbers"
