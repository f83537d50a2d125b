"""A temporary model repository for the model-update tests: digits-cnn v1, a second version that
disagrees with it on some inputs (perturbed classifier weights), and a broken version."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from tests.kiln_server import DEFAULT_REPO

SOURCE = DEFAULT_REPO / "digits-cnn"

CONFIG = """backend: onnxruntime
precision: fp32
max_batch_size: 32
dynamic_batching: {max_queue_delay_ms: 1, max_queue_size: 4096}
verify: {samples: data/calib.npz, max_samples: 16}
accuracy: {dataset: data/eval.npz, metric: top1, max_drop: 0.01}
"""


def make_model(repo: Path, name: str = "digits", config: str = CONFIG, versions: dict[int, str] | None = None) -> Path:
    """repo/name with config.yaml, data/ and the given versions ({number: "v1" | "v2" | "broken"})."""
    folder = repo / name
    (folder / "data").mkdir(parents=True)
    for f in ("calib.npz", "eval.npz"):
        shutil.copy(SOURCE / "data" / f, folder / "data" / f)
    (folder / "config.yaml").write_text(config)
    for number, kind in (versions or {1: "v1"}).items():
        write_version(folder, number, kind)
    return folder


def write_version(folder: Path, number: int, kind: str) -> Path:
    """Write version `number` off to the side, then move it in whole (as a deploy tool would)."""
    staging = folder.parent / f".staging-{folder.name}-{number}-{time.monotonic_ns()}"
    staging.mkdir()
    target = staging / "model.onnx"
    if kind == "v1":
        shutil.copy(SOURCE / "1" / "model.onnx", target)
    elif kind == "v2":
        target.write_bytes(perturbed_model())
    elif kind == "broken":
        target.write_bytes(b"this is not an ONNX model" * 64)
    else:
        raise ValueError(kind)
    final = folder / str(number)
    os.rename(staging, final)
    return final


def perturbed_model(scale: float = 0.35, seed: int = 7) -> bytes:
    """digits-cnn with noise on its last layer: same signature, its own gates pass, and its top-1
    answer differs from v1's on part of the inputs."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(SOURCE / "1" / "model.onnx")
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.name == "classifier.3.weight":
            w = numpy_helper.to_array(init)
            noisy = (w + rng.normal(0, scale * float(np.abs(w).mean()) * 3, w.shape)).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    return model.SerializeToString()


def eval_inputs() -> tuple[np.ndarray, np.ndarray]:
    with np.load(SOURCE / "data" / "eval.npz") as f:
        return f["input"], f["label"]


def offline_logits(model_bytes_or_path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    src = model_bytes_or_path if isinstance(model_bytes_or_path, bytes) else str(model_bytes_or_path)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


class Load:
    """Real clients (tritonclient.http, one per thread) sending eval rows without pause; every answer
    is checked against the offline output of the version that says it answered."""

    def __init__(self, address: str, model: str, expected: dict[str, np.ndarray], threads: int = 3,
                 version: str = "", rows: int = 1, ids: bool = True):
        self.address, self.model, self.expected = address, model, expected
        self.version, self.rows, self.ids = version, rows, ids
        self.x, _ = eval_inputs()
        self.results: list[tuple[float, float, str, str]] = []  # (start, seconds, version or "", error)
        self._stop = __import__("threading").Event()
        self._threads = [__import__("threading").Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, seed: int) -> None:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.address, network_timeout=30)
        rng = np.random.default_rng(seed)
        n = 0
        while not self._stop.is_set():
            i = int(rng.integers(0, len(self.x) - self.rows))
            inp = httpclient.InferInput("input", [self.rows, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(self.x[i:i + self.rows], binary_data=True)
            rid = f"load-{seed}-{n}" if self.ids else ""
            n += 1
            t0 = time.perf_counter()
            try:
                res = client.infer(self.model, [inp], model_version=self.version, request_id=rid)
                version = res.get_response()["model_version"]
                got = res.as_numpy("logits")
                want = self.expected.get(version)
                error = "" if want is not None and np.allclose(got, want[i:i + self.rows], atol=1e-4) else \
                    f"wrong answer from version {version}"
            except Exception as err:  # every failure is recorded, none stops the load
                version, error = "", f"{type(err).__name__}: {err}"
            self.results.append((t0, time.perf_counter() - t0, version, error))
        client.close()

    def failures(self) -> list[tuple[float, float, str, str]]:
        return [r for r in self.results if r[3]]

    def versions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r[2]] = out.get(r[2], 0) + 1
        return out


def wait_for(predicate, timeout: float = 60.0, every: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not reached after {timeout}s")


def index(url: str) -> list[dict]:
    import httpx

    return httpx.post(url + "/v2/repository/index", timeout=10).json()


def states(url: str, model: str) -> dict[str, str]:
    return {e["version"]: e["state"] for e in index(url) if e["name"] == model and "version" in e}
