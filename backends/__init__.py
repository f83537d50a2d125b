"""Backend registry: one module per backend, imported only when a model asks for it."""

from __future__ import annotations

import importlib

from .base import Backend, BackendBase, BackendUnavailable, CompileFailed, CompileOptions, Int8Recipe, Runner, TensorInfo

# name -> "module:Class". Modules import their runtime lazily, so a missing runtime never breaks
# the registry; `available()` says what is missing.
REGISTRY: dict[str, str] = {
    "onnxruntime": "backends.ort:OnnxRuntimeBackend",
    "openvino": "backends.ov:OpenVinoBackend",
    "litert": "backends.litert:LiteRTBackend",
    "coreml": "backends.coreml:CoreMLBackend",
    "tensorrt": "backends.trt:TensorRTBackend",
}

# What a config without `backend:` builds with: it runs every ONNX model, and is the reference.
DEFAULT_BACKEND = "onnxruntime"

_instances: dict[str, Backend] = {}


def backend_names() -> list[str]:
    return list(REGISTRY)


def get_backend(name: str) -> Backend:
    if name not in REGISTRY:
        raise KeyError(f"unknown backend '{name}' (known: {', '.join(REGISTRY)})")
    if name not in _instances:
        module_name, _, cls_name = REGISTRY[name].partition(":")
        _instances[name] = getattr(importlib.import_module(module_name), cls_name)()
    return _instances[name]


__all__ = [
    "Backend",
    "BackendBase",
    "BackendUnavailable",
    "CompileFailed",
    "CompileOptions",
    "Int8Recipe",
    "DEFAULT_BACKEND",
    "Runner",
    "TensorInfo",
    "backend_names",
    "get_backend",
]
