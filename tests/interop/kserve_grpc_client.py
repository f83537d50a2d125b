"""Runs inside a venv with the `kserve` package (bench/.peers-venv/kserve): KServe's own
InferenceGRPCClient against Kiln's gRPC port. argv: address, npz of inputs/expected outputs.
Prints one line per check and exits non-zero on the first mismatch."""

import asyncio
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest


async def main(address: str, data: str) -> int:
    cases = np.load(data, allow_pickle=True)
    client = InferenceGRPCClient(address, timeout=30)
    assert await client.is_server_live() and await client.is_server_ready()
    assert await client.is_model_ready("identity") and await client.is_model_ready("digits-cnn")
    checks = 0
    # digits-cnn: raw (set_data_from_numpy, binary) and typed contents (data=list).
    x, want = cases["digits_input"], cases["digits_logits"]
    for binary in (True, False):
        inp = InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        res = await client.infer(InferRequest("digits-cnn", [inp], request_id=f"k{binary}"))
        got = res.outputs[0].as_numpy()
        np.testing.assert_array_equal(got, want)
        assert res.id == f"k{binary}" and res.model_name == "digits-cnn"
        checks += 1
        print(f"digits-cnn binary={binary}: same logits as tritonclient.http")
    # identity: the 13 datatypes in one raw request.
    inputs, expected = [], {}
    for key in cases.files:
        if key.startswith("in_"):
            arr = cases[key]
            datatype = str(cases["dtype_" + key[3:]])
            inp = InferInput(key, list(arr.shape), datatype)
            inp.set_data_from_numpy(arr, binary_data=True)
            inputs.append(inp)
            expected["out_" + key[3:]] = cases["out_" + key[3:]]
    res = await client.infer(InferRequest("identity", inputs))
    for out in res.outputs:
        got = out.as_numpy()
        want = expected[out.name]
        if want.dtype == object:
            assert [g if isinstance(g, bytes) else str(g).encode() for g in got.reshape(-1)] == list(want.reshape(-1)), out.name
        else:
            assert got.dtype == want.dtype, (out.name, got.dtype, want.dtype)
            np.testing.assert_array_equal(got, want, err_msg=out.name)
        checks += 1
    print(f"identity: {len(res.outputs)} datatypes the same as tritonclient.http")
    await client.close()
    print(f"OK: {checks} checks")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2])))
