"""The CPU's INT8-relevant features, and the INT8 recipe each backend runs on it: one reading of
/proc/cpuinfo for serving (the compile cache's key, a served int8 model's compile options) and for
`kiln optimize`.

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


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _fields(cpuinfo: str) -> tuple[set[str], str]:
    """The first CPU's flags (x86 "flags", ARM "Features") and model name."""
    flags: set[str] = set()
    model = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
    return flags, model


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    return _fields(_cpuinfo() if cpuinfo is None else cpuinfo)[0]


def detect(cpuinfo: str | None = None) -> CpuInfo:
    """Parse ``/proc/cpuinfo`` (or the given text) for the model name and the INT8-relevant ISA flags."""
    flags, model = _fields(_cpuinfo() if cpuinfo is None else cpuinfo)
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


def int8_units(cpu: CpuInfo) -> str:
    """The CPU's int8 dot-product units, in words."""
    if cpu.amx:
        return "AMX int8 tiles" + (" + AVX-512 VNNI" if cpu.vnni else "")
    if cpu.vnni:
        return "AVX-512 VNNI" if cpu.isa.get("avx512_vnni") else "AVX-VNNI"
    if cpu.isa.get("arm_dotprod") or cpu.isa.get("arm_i8mm"):
        return "ARM dot-product" + (" + i8mm" if cpu.isa.get("arm_i8mm") else "")
    if cpu.isa.get("avx2"):
        return "AVX2 only (no VNNI)"
    return "no int8 SIMD"


def auto_backend(cpu: CpuInfo, available: list[str]) -> tuple[str, str]:
    """The available backend whose int8 kernels use this CPU's int8 units (each backend's ``int8_isa``), else the
    first available backend with a CPU-independent int8 path."""
    from . import get_backend

    for name in available:
        used = [f for f in get_backend(name).int8_isa if cpu.isa.get(f)]
        if used:
            return name, f"its int8 kernels use the CPU's {', '.join(used)}"
    for name in available:
        be = get_backend(name)
        if not be.int8_isa and be.int8_recipe("static", int8_units(cpu), cpu.int8_dot, cpu.arch in ("x86_64", "AMD64")):
            return name, "its int8 path runs on any CPU"
    return available[0], "the only backend available"


def choose_recipe(backend: str, mode: str, cpu: CpuInfo | None = None) -> Recipe:
    """Which INT8 recipe the backend runs on this CPU, and why: the backend's own ``int8_recipe``."""
    from . import get_backend

    cpu = cpu or detect()
    rc = get_backend(backend).int8_recipe(mode, int8_units(cpu), cpu.int8_dot, cpu.arch in ("x86_64", "AMD64"))
    if rc is None:
        raise ValueError(f"no {mode} INT8 recipe for backend {backend}")
    return Recipe(backend, mode, rc.name, rc.reason, dict(rc.extra))
