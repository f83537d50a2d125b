"""The FP32 reference: ONNX Runtime on the CPU over the ONNX source, or torch.export's program when
the model has only a `.pt2`. The yardstick of every gate the server runs and every figure the
toolkit reports, so there is exactly one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Reference:
    """FP32 execution of the source, the yardstick of every gate."""

    def __init__(self, sources: dict[str, Path]):
        if "onnx" in sources:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            self._session = ort.InferenceSession(str(sources["onnx"]), so, providers=["CPUExecutionProvider"])
            self._names = [o.name for o in self._session.get_outputs()]
            self.kind = "onnxruntime-fp32"
        else:
            import torch

            self._module = torch.export.load(str(sources["pt2"])).module()
            self.kind = "torch-fp32"

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.kind == "onnxruntime-fp32":
            from backends.ort import ort_strings

            return dict(zip(self._names, self._session.run(self._names, {k: ort_strings(v) for k, v in inputs.items()})))
        import torch

        with torch.no_grad():
            out = self._module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values()))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {f"output_{i}": o.numpy() for i, o in enumerate(outs)}
