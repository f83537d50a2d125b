"""Start the peer servers (Seldon MLServer, KServe Python server) on the same ONNX file, pinned to a core.

Each runs from its own virtual environment (bench/.peers-venv/<peer>, made by bench.peers.setup) with
an ONNX Runtime model of 1 intra-op thread, the same session settings Kiln's onnxruntime backend uses.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

from tests.kiln_server import free_port, http_status

from . import setup

MLSERVER_RUNTIME = textwrap.dedent('''\
    import numpy as np
    import onnxruntime as ort
    from mlserver import MLModel
    from mlserver.codecs import NumpyCodec
    from mlserver.types import InferenceRequest, InferenceResponse


    class OnnxRuntime(MLModel):
        async def load(self) -> bool:
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.sess = ort.InferenceSession(self.settings.parameters.uri, so, providers=["CPUExecutionProvider"])
            self.input_name = self.sess.get_inputs()[0].name
            self.output_names = [o.name for o in self.sess.get_outputs()]
            return True

        async def predict(self, payload: InferenceRequest) -> InferenceResponse:
            x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
            results = self.sess.run(self.output_names, {self.input_name: x})
            return InferenceResponse(model_name=self.name, id=payload.id, outputs=[
                NumpyCodec.encode_output(n, r) for n, r in zip(self.output_names, results)])
''')

KSERVE_SERVER = textwrap.dedent('''\
    import sys

    import numpy as np
    import onnxruntime as ort
    from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


    class OnnxModel(Model):
        def __init__(self, name, path):
            super().__init__(name)
            self.path = path
            self.load()

        def load(self):
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.sess = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
            self.input_name = self.sess.get_inputs()[0].name
            self.output_names = [o.name for o in self.sess.get_outputs()]
            self.ready = True
            return True

        def predict(self, payload: InferRequest, headers=None, response_headers=None):
            x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
            results = self.sess.run(self.output_names, {self.input_name: x})
            outputs = []
            for n, r in zip(self.output_names, results):
                o = InferOutput(name=n, shape=list(r.shape), datatype="FP32")
                o.set_data_from_numpy(r, binary_data=False)
                outputs.append(o)
            return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs)


    if __name__ == "__main__":
        name, path, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
        sys.argv = sys.argv[:1]
        ModelServer(http_port=port, workers=1, enable_grpc=False, enable_latency_logging=False).start(
            [OnnxModel(name, path)])
''')


class Peer:
    def __init__(self, name: str, proc: subprocess.Popen, port: int, log: Path):
        self.name, self.proc, self.port, self.log = name, proc, port, log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, model: str, timeout: float = 120.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            if http_status(f"{self.url}/v2/models/{model}/ready", timeout=2) == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(peer: str, model: str, onnx_path: Path, workdir: Path, cpu: int | None = 0) -> Peer:
    python = setup.install(peer)
    workdir.mkdir(parents=True, exist_ok=True)
    port, grpc_port = free_port(), free_port()
    log = workdir / f"{peer}.log"
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    if peer == "mlserver":
        mdir = workdir / "mlserver" / model
        mdir.mkdir(parents=True, exist_ok=True)
        (mdir / "ort_runtime.py").write_text(MLSERVER_RUNTIME)
        (mdir / "model-settings.json").write_text(json.dumps({
            "name": model, "implementation": "ort_runtime.OnnxRuntime",
            "parameters": {"uri": str(onnx_path.resolve())}}))
        # parallel_workers 0: inference in the server process, MLServer's fastest setting on one core.
        (workdir / "mlserver" / "settings.json").write_text(json.dumps({
            "http_port": port, "grpc_port": grpc_port, "metrics_port": free_port(),
            "parallel_workers": 0, "debug": False}))
        cmd = [*pin, str(python.parent / "mlserver"), "start", str(workdir / "mlserver")]
        cwd = workdir / "mlserver"
    elif peer == "kserve":
        script = workdir / "kserve_server.py"
        script.write_text(KSERVE_SERVER)
        cmd = [*pin, str(python), str(script), model, str(onnx_path.resolve()), str(port)]
        cwd = workdir
    else:
        raise ValueError(peer)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    p = Peer(peer, proc, port, log)
    p.grpc_port = grpc_port if peer == "mlserver" else None  # MLServer serves the v2 gRPC protocol too
    try:
        p.wait_ready(model)
    except Exception:
        p.stop()
        raise
    return p
