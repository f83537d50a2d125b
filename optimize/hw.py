"""Hardware fingerprint and the INT8 recipe each CPU calls for.

INT8 pays off when the CPU has integer dot-product instructions: x86 AVX-512 VNNI / AVX-VNNI
(``vpdpbusd``: u8×s8 → s32 in one instruction), AMX (int8 tile matmul), ARM dot-product
(``sdot``/``udot``, ``asimddp``) or i8mm. With only AVX2 the u8×s8 multiply-add (``vpmaddubsw``)
saturates 16-bit sums, so ONNX Runtime's documentation recommends 7-bit weights (``reduce_range``).
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

ISA_FLAGS = {
    # name -> /proc/cpuinfo flags (x86 "flags", ARM "Features") that imply it
    "avx2": ("avx2",),
    "avx512f": ("avx512f",),
    "avx512_vnni": ("avx512_vnni", "avx512vnni"),
    "avx_vnni": ("avx_vnni",),
    "avx512_bf16": ("avx512_bf16",),
    "amx_int8": ("amx_int8",),
    "amx_tile": ("amx_tile",),
    "arm_dotprod": ("asimddp",),
    "arm_i8mm": ("i8mm",),
    "arm_fp16": ("asimdhp",),
}


@dataclass
class CpuInfo:
    model: str
    arch: str
    logical_cpus: int
    usable_cpus: int
    isa: dict[str, bool] = field(default_factory=dict)

    @property
    def vnni(self) -> bool:
        return self.isa.get("avx512_vnni", False) or self.isa.get("avx_vnni", False)

    @property
    def amx(self) -> bool:
        return self.isa.get("amx_int8", False) or self.isa.get("amx_tile", False)

    @property
    def int8_dot(self) -> bool:
        return self.vnni or self.amx or self.isa.get("arm_dotprod", False) or self.isa.get("arm_i8mm", False)

    def summary(self) -> str:
        have = [k for k, v in self.isa.items() if v]
        return f"{self.model} ({self.arch}, {self.usable_cpus}/{self.logical_cpus} CPUs usable; {', '.join(have) or 'no SIMD int8 extensions'})"

    def as_dict(self) -> dict:
        return asdict(self)


def detect(cpuinfo: str | None = None) -> CpuInfo:
    """Parse ``/proc/cpuinfo`` (or the given text) for the model name and the INT8-relevant ISA flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    model = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
    if not model:
        model = platform.processor() or platform.machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    isa = {name: any(f in flags for f in aliases) for name, aliases in ISA_FLAGS.items()}
    return CpuInfo(model=re.sub(r"\s+", " ", model), arch=platform.machine(), logical_cpus=os.cpu_count() or 1,
                   usable_cpus=usable, isa=isa)


@dataclass
class Recipe:
    backend: str
    mode: str  # static | dynamic
    name: str  # what the recipe does
    reason: str  # why, on this CPU
    extra: dict = field(default_factory=dict)  # hints passed to the backend's compile (backend_options)


def auto_backend(cpu: CpuInfo, available: list[str]) -> tuple[str, str]:
    """The backend whose INT8 path suits this CPU best, among those available."""
    prefs: list[tuple[str, str]] = []
    if cpu.amx or cpu.vnni:
        prefs.append(("openvino", "AMX/VNNI int8 kernels in oneDNN (OpenVINO) use the CPU's int8 dot-product units"))
    if cpu.isa.get("arm_dotprod") or cpu.isa.get("arm_i8mm"):
        prefs.append(("litert", "XNNPACK's int8 kernels use ARM sdot/i8mm"))
    prefs.append(("onnxruntime", "ONNX Runtime QDQ runs on any CPU (MLAS int8 GEMM)"))
    for name, why in prefs:
        if name in available:
            return name, why
    return available[0], "the only backend available"


def choose_recipe(backend: str, mode: str, cpu: CpuInfo | None = None) -> Recipe:
    """Which INT8 recipe the backend runs on this CPU, and why."""
    cpu = cpu or detect()
    if cpu.amx:
        units = "AMX int8 tiles" + (" + AVX-512 VNNI" if cpu.vnni else "")
    elif cpu.vnni:
        units = "AVX-512 VNNI" if cpu.isa.get("avx512_vnni") else "AVX-VNNI"
    elif cpu.isa.get("arm_dotprod") or cpu.isa.get("arm_i8mm"):
        units = "ARM dot-product" + (" + i8mm" if cpu.isa.get("arm_i8mm") else "")
    elif cpu.isa.get("avx2"):
        units = "AVX2 only (no VNNI)"
    else:
        units = "no int8 SIMD"
    if backend == "onnxruntime" and mode == "dynamic":
        return Recipe(backend, mode, "ONNX Runtime dynamic INT8 (quantize_dynamic: int8 weights, activations quantized per call; "
                      "MatMulInteger/ConvInteger)",
                      f"{units}: no calibration needed; pays off for MatMul-heavy models, usually slower for convolutions "
                      "(ConvInteger has no fused fast path)",
                      {"reduce_range": not cpu.int8_dot and cpu.arch in ("x86_64", "AMD64")})
    if mode == "dynamic":
        raise ValueError(f"no dynamic INT8 recipe for backend {backend}")
    if backend == "onnxruntime":
        rr = not cpu.int8_dot and cpu.arch in ("x86_64", "AMD64")
        why = (f"{units}: full 8-bit weights (u8 activations × s8 weights accumulate exactly in VNNI/AMX/sdot)"
               if not rr else f"{units}: 7-bit weights (reduce_range) so u8×s8 pairwise sums cannot saturate vpmaddubsw")
        return Recipe(backend, mode, "ONNX Runtime static QDQ (quantize_static: u8 activations, s8 per-channel weights, "
                      "MinMax calibration)", why, {"reduce_range": rr})
    if backend == "openvino":
        return Recipe(backend, mode, "OpenVINO NNCF post-training quantization (nncf.quantize, performance preset: symmetric INT8 weights and activations)",
                      f"{units}: oneDNN picks " + ("AMX/VNNI int8 kernels" if (cpu.amx or cpu.vnni) else "AVX2 int8 kernels (smaller gain)"),
                      {})
    if backend == "litert":
        return Recipe(backend, mode, "LiteRT PT2E static INT8 (XNNPACK quantizer, per-channel weights)",
                      f"{units}: XNNPACK's qs8 kernels " + ("use the int8 dot-product instructions" if cpu.int8_dot else "emulate int8 dot products"),
                      {})
    return Recipe(backend, mode, f"{backend} int8 (the backend's own recipe)", units, {})
