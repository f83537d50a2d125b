"""TensorRT on an NVIDIA GPU: ONNX parser → builder (FP16/INT8, dynamic-batch optimization profile,
timing cache) → serialized engine, run with the TensorRT runtime (`execute_async_v3`).

Written against the TensorRT 10 Python API (also fine on 8.6: the explicit-batch flag is set when the
enum still has it). Imports are lazy: without TensorRT or a GPU, `available()` says which is missing
("TensorRT runtime not installed: ..." / "no NVIDIA GPU: ...") and the model falls back.

Engine cache: an engine only runs on the GPU model, compute capability and TensorRT version it was
built with, so `version()` returns all three; the compile cache key includes `version()`, which keys
every serialized engine by them. The builder's timing cache is kept beside the compile cache in
`<cache>/tensorrt-timing/<same triple>.cache` and reused across models and restarts.

INT8: implicit quantization with an IInt8EntropyCalibrator2 fed from the model's calibration data
(the calibration cache is stored with the engine). TensorRT 10 deprecates implicit INT8 in favour of
explicit Q/DQ graphs; feeding it the QDQ model that the onnxruntime backend produces (`quantize_int8`
in backends/ort.py) is the drop-in alternative: `backend_options.trt_int8: qdq`.

Device buffers: torch CUDA tensors when torch has CUDA, else cuda-python (`cuda.bindings.runtime`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .base import BackendBase, BackendUnavailable, CompileFailed, CompileOptions, Int8Recipe

ENGINE = "model.engine"


def _import_trt():
    try:
        import tensorrt as trt  # noqa: F401
    except (ImportError, OSError) as err:  # the bindings-only wheel raises OSError for missing libnv*.so
        raise BackendUnavailable(f"TensorRT runtime not installed: {type(err).__name__}: {err}") from err
    return trt


def gpu_info() -> tuple[bool, str, str]:
    """(present, name, compute capability 'X.Y') of GPU 0, asked through the CUDA driver."""
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cuda as driver  # older cuda-python
        except ImportError:
            driver = None
    if driver is not None:
        try:
            (err,) = driver.cuInit(0)
            if int(err) != 0:
                return False, f"cuInit failed ({err})", ""
            err, dev = driver.cuDeviceGet(0)
            err, raw = driver.cuDeviceGetName(64, dev)
            name = raw.split(b"\0", 1)[0].decode()
            attr = driver.CUdevice_attribute
            _, major = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
            _, minor = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
            return True, name, f"{major}.{minor}"
        except Exception as err:  # no driver / no device
            return False, f"{type(err).__name__}: {err}", ""
    if not (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()):
        return False, "no NVIDIA driver or device (/dev/nvidiactl missing)", ""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return True, torch.cuda.get_device_name(0), f"{major}.{minor}"
        return False, f"torch {torch.__version__} sees no CUDA device", ""
    except ImportError:
        pass
    return False, "an NVIDIA driver is present but neither cuda-python nor a CUDA build of torch is installed", ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


class _Buffers:
    """Device memory + host<->device copies: torch CUDA tensors, or cuda-python runtime calls."""

    def __init__(self):
        try:
            import torch

            if torch.cuda.is_available():
                self.torch = torch
                self.stream = torch.cuda.Stream()
                self.handle = self.stream.cuda_stream
                return
        except ImportError:
            pass
        self.torch = None
        from cuda.bindings import runtime as cudart

        self.cudart = cudart
        err, self.handle = cudart.cudaStreamCreate()
        if int(err) != 0:
            raise RuntimeError(f"cudaStreamCreate failed: {err}")

    def alloc(self, nbytes: int):
        if self.torch is not None:
            return self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device="cuda")
        err, ptr = self.cudart.cudaMalloc(max(nbytes, 1))
        if int(err) != 0:
            raise RuntimeError(f"cudaMalloc({nbytes}) failed: {err}")
        return ptr

    def ptr(self, buf) -> int:
        return int(buf.data_ptr()) if self.torch is not None else int(buf)

    def to_device(self, buf, host: np.ndarray) -> None:
        if self.torch is not None:
            with self.torch.cuda.stream(self.stream):
                buf[: host.nbytes].copy_(self.torch.from_numpy(host.reshape(-1).view(np.uint8)), non_blocking=False)
            return
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.cudart.cudaMemcpyAsync(self.ptr(buf), host.ctypes.data, host.nbytes, kind, self.handle)

    def to_host(self, host: np.ndarray, buf) -> None:
        if self.torch is not None:
            self.stream.synchronize()
            host.reshape(-1).view(np.uint8)[:] = buf[: host.nbytes].cpu().numpy()
            return
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.cudart.cudaMemcpyAsync(host.ctypes.data, self.ptr(buf), host.nbytes, kind, self.handle)

    def sync(self) -> None:
        if self.torch is not None:
            self.stream.synchronize()
        else:
            self.cudart.cudaStreamSynchronize(self.handle)

    def free(self, buf) -> None:
        if self.torch is None:
            self.cudart.cudaFree(buf)


class TensorRTRunner:
    def __init__(self, engine_bytes: bytes, max_batch: int):
        trt = _import_trt()
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine (built for another GPU or TensorRT?)")
        self.context = self.engine.create_execution_context()
        self.bufs = _Buffers()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        # One device buffer per tensor, sized for the profile's max shape.
        self.device = {}
        for n in names:
            shape = list(self.engine.get_tensor_shape(n))
            if n in self.inputs:
                shape = list(self.engine.get_tensor_profile_shape(n, 0)[2])
            shape = [max_batch if d < 0 else d for d in shape]
            self.device[n] = self.bufs.alloc(int(np.prod(shape)) * self.dtypes[n].itemsize)
            self.context.set_tensor_address(n, self.bufs.ptr(self.device[n]))

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        staged = []  # host arrays stay alive until the stream is synchronized
        for n in self.inputs:
            host = np.ascontiguousarray(inputs[n], dtype=self.dtypes[n])
            staged.append(host)
            self.context.set_input_shape(n, host.shape)
            self.bufs.to_device(self.device[n], host)
        if not self.context.execute_async_v3(self.bufs.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        out = {}
        for n in self.outputs:
            host = np.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n])
            self.bufs.to_host(host, self.device[n])
            out[n] = host
        self.bufs.sync()
        del staged
        return out

    def close(self) -> None:
        for buf in getattr(self, "device", {}).values():
            self.bufs.free(buf)
        self.device = {}
        self.context = None
        self.engine = None


class _EntropyCalibrator:
    """IInt8EntropyCalibrator2 over the calibration arrays (made a real subclass at build time)."""

    @staticmethod
    def make(trt, calibration: dict[str, np.ndarray], input_names: list[str], batch: int, bufs: _Buffers,
             cache_path: Path):
        class Calibrator(trt.IInt8EntropyCalibrator2):
            def __init__(self):
                trt.IInt8EntropyCalibrator2.__init__(self)
                self.n = len(next(iter(calibration.values())))
                self.pos = 0
                self.device = {k: bufs.alloc(calibration[k][:batch].nbytes) for k in input_names}

            def get_batch_size(self):
                return batch

            def get_batch(self, names):
                if self.pos + batch > self.n:
                    return None
                for k in input_names:
                    bufs.to_device(self.device[k], np.ascontiguousarray(calibration[k][self.pos:self.pos + batch]))
                bufs.sync()
                self.pos += batch
                return [bufs.ptr(self.device[k]) for k in names]

            def read_calibration_cache(self):
                return cache_path.read_bytes() if cache_path.exists() else None

            def write_calibration_cache(self, cache):
                cache_path.write_bytes(bytes(cache))

        return Calibrator()


class TensorRTBackend(BackendBase):
    name = "tensorrt"
    platform = "tensorrt_plan"
    artifact_formats = ("plan",)
    source_formats = ("onnx",)
    precisions = ("fp32", "fp16", "int8")
    int8_isa = ()  # a GPU backend: the CPU's ISA does not matter

    def int8_recipe(self, mode: str, units: str, int8_dot: bool, x86: bool) -> Int8Recipe | None:
        if mode != "static":
            return None
        return Int8Recipe("TensorRT INT8 (IInt8EntropyCalibrator2 on the calibration data; backend_options.trt_int8: qdq "
                          "for explicit Q/DQ)", "the GPU's INT8 tensor cores; the CPU does not take part")

    def version(self) -> str:
        try:
            trt = _import_trt()
        except BackendUnavailable:
            return "-"
        ok, gpu, cc = gpu_info()
        return f"tensorrt {trt.__version__}; {gpu if ok else 'no-gpu'}; sm {cc or '-'}"

    def available(self) -> tuple[bool, str]:
        problems = []
        try:
            trt = _import_trt()
        except BackendUnavailable as err:
            trt = None
            problems.append(str(err))
        ok, gpu, cc = gpu_info()
        if not ok:
            problems.append(f"no NVIDIA GPU: {gpu}")
        if problems:
            return False, "; ".join(problems)
        return True, f"tensorrt {trt.__version__} on {gpu} (compute capability {cc})"

    def compile(self, source: Path, options: CompileOptions, workdir: Path) -> Path:
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(why)
        trt = _import_trt()
        if options.precision not in self.precisions:
            raise CompileFailed(f"tensorrt: precision '{options.precision}' is not supported")
        extra = options.extra
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        onnx_path = source
        if options.precision == "int8" and extra.get("trt_int8") == "qdq":
            from .ort import quantize_int8  # explicit quantization: TensorRT reads the Q/DQ scales

            onnx_path = quantize_int8(source, options, workdir)
        if not parser.parse(Path(onnx_path).read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise CompileFailed(f"TensorRT ONNX parser: {errors}")
        if onnx_path != source:
            Path(onnx_path).unlink(missing_ok=True)

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(extra.get("workspace_mb", 1024)) << 20)
        if options.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)  # int8 layers fall back to fp16, not fp32
        # Dynamic batch: one profile, min 1, opt = preferred size, max = max_batch_size.
        top = max(options.max_batch_size, 1)
        opt = int(extra.get("opt_batch", top))
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            dims = list(t.shape)
            if dims and dims[0] == -1:
                rest = dims[1:]
                if any(d < 0 for d in rest):
                    raise CompileFailed(f"tensorrt: input '{t.name}' has dynamic non-batch dims {dims}")
                profile.set_shape(t.name, (1, *rest), (min(opt, top), *rest), (top, *rest))
        config.add_optimization_profile(profile)
        if options.precision == "int8" and extra.get("trt_int8") != "qdq":
            if not options.calibration:
                raise CompileFailed("tensorrt int8 needs calibration data (config verify.samples)")
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_calibration_profile(profile)
            names = [network.get_input(i).name for i in range(network.num_inputs)]
            calib = {n: options.calibration[spec.name] for n, spec in zip(names, options.inputs)}
            config.int8_calibrator = _EntropyCalibrator.make(
                trt, calib, names, min(top, len(next(iter(calib.values())))), _Buffers(), workdir / "calibration.cache")
        # Timing cache shared by every build for this GPU + TensorRT.
        timing_dir = workdir.parent / "tensorrt-timing"
        timing_dir.mkdir(parents=True, exist_ok=True)
        timing_path = timing_dir / f"{_slug(self.version())}.cache"
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.exists() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise CompileFailed("TensorRT engine build failed (see the TensorRT log above)")
        timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        artifact = workdir / ENGINE
        artifact.write_bytes(bytes(serialized))
        (workdir / "engine.json").write_text(json.dumps(
            {"tensorrt": self.version(), "precision": options.precision, "profile": {"min": 1, "opt": opt, "max": top}}))
        return artifact

    def load(self, artifact: Path, options: CompileOptions) -> TensorRTRunner:
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(why)
        return TensorRTRunner(Path(artifact).read_bytes(), max(options.max_batch_size, 1))


def engine_signature(path: Path) -> tuple[list, list]:
    """Inputs and outputs of a serialized engine (a `model.plan` a user brought): needs the runtime
    and a GPU, like serving it does."""
    from .base import TensorInfo
    from .datatypes import v2_datatype

    ok, why = TensorRTBackend().available()
    if not ok:
        raise BackendUnavailable(f"cannot read {Path(path).name}: {why}")
    trt = _import_trt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {Path(path).name} (built for another GPU or TensorRT?)")
    ins, outs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        info = TensorInfo(name, v2_datatype(np.dtype(trt.nptype(engine.get_tensor_dtype(name)))),
                          tuple(int(d) for d in engine.get_tensor_shape(name)))
        (ins if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outs).append(info)
    return ins, outs
