"""Request decoding alone (service/protocol.py `decode_request`): µs per call, no server.

    python -m bench.decode            # the bodies below, best of 5 repetitions each
    python -m bench.decode --reps 9

Bodies: the digits-cnn request of the tests (64 floats, under 1 KiB), an MLP input (784 random
floats), a 3x224x224 image as JSON with two-decimal pixels (the size a client sending normalised
8-bit pixels produces) and with full float32 digits, an INT64 token batch, and the binary form of the
image. Times are this thread's CPU time (time.thread_time), best of the repetitions, so other
processes on a shared machine inflate them less than wall time. Run it before and after a change to the decoder, on the same machine, in one sitting.
"""

from __future__ import annotations

import argparse
import time
import timeit

import numpy as np
import orjson

from service.protocol import decode_request


def _json(name: str, datatype: str, arr: np.ndarray) -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": list(arr.shape),
                                     "data": arr.reshape(-1).tolist()}]})


def bodies() -> dict[str, tuple[bytes, str | None]]:
    rng = np.random.default_rng(0)
    image = rng.random((1, 3, 224, 224), dtype=np.float32)
    header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(image.shape),
                                       "parameters": {"binary_data_size": image.nbytes}}]})
    return {
        "digits FP32 x64": (_json("input", "FP32", np.full((1, 1, 8, 8), 0.5, np.float32)), None),
        "mlp FP32 x784": (_json("input", "FP32", rng.random((1, 784), dtype=np.float32)), None),
        "image FP32 3x224x224, 2 decimals": (_json("input", "FP32", np.round(image.astype(np.float64), 2)), None),
        "image FP32 3x224x224, full digits": (_json("input", "FP32", image), None),
        "tokens INT64 8x512": (_json("ids", "INT64", rng.integers(0, 50_000, (8, 512))), None),
        "image binary": (header + image.tobytes(), str(len(header))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"{'body':36} {'bytes':>10} {'CPU µs/decode':>14}")
    for name, (body, hlen) in bodies().items():
        decode_request(body, hlen, None)  # warm the parser
        n = max(1, int(2e6 // len(body)))  # about 2 MB parsed per repetition
        best = min(timeit.repeat(lambda b=body, h=hlen: decode_request(b, h, None), number=n, repeat=args.reps,
                                  timer=time.thread_time)) / n
        print(f"{name:36} {len(body):>10,} {best * 1e6:>14.1f}")


if __name__ == "__main__":
    main()
