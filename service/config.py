"""Model configuration (`model_repo/<model>/config.yaml`), validated by pydantic at load."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backends import DEFAULT_BACKEND
from backends.datatypes import V2_TO_NUMPY
from .errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
PRECISIONS = ("fp32", "fp16", "int8")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    name: str
    datatype: str
    # Full shape, batch dimension included; -1 marks a variable dimension.
    shape: list[int]

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, v: str) -> str:
        if v not in V2_TO_NUMPY and v != "BF16":
            raise ValueError(f"unknown datatype '{v}' (one of {', '.join(V2_TO_NUMPY)})")
        return v

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in v):
            raise ValueError("dimensions are positive integers or -1 (variable)")
        return v


class DynamicBatching(_Strict):
    max_queue_delay_ms: float = Field(2.0, ge=0, le=10_000)
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    max_queue_size: int = Field(1024, ge=1)


class Tolerance(_Strict):
    atol: float = Field(..., ge=0)
    rtol: float = Field(0.0, ge=0)


class ValueRange(_Strict):
    """Golden values drawn uniformly from [min, max] (integers: both ends included); a fixed value
    is written as a plain number and read as min == max."""

    min: float
    max: float

    @property
    def fixed(self) -> bool:
        return self.min == self.max

    @model_validator(mode="after")
    def _ordered(self) -> "ValueRange":
        if self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self


class VerifySpec(_Strict):
    # Parity tolerances for fp32 builds (and for lossy builds unless `precisions` overrides them).
    atol: float = Field(1e-4, ge=0)
    rtol: float = Field(1e-3, ge=0)
    # Per-precision parity tolerances, absolute, e.g. {int8: {atol: 1.0, rtol: 0.1}}. A lossy precision
    # without an entry uses the documented default rule (service/verify.py LOSSY_TOLERANCE): atol is a
    # fraction of the reference outputs' largest magnitude. Lossy builds also pass the accuracy gate.
    precisions: dict[Literal["fp16", "int8"], Tolerance] = Field(default_factory=dict)
    # .npz with one array per input name (or a single array for a single-input model).
    samples: str | None = None
    max_samples: int = Field(64, ge=1)
    # Concrete shapes (batch included) to verify and warm up at, per input: {image: [[1, 3, 224, 224]]}
    # or one shape {image: [1, 3, 224, 224]}. With several shapes, the k-th shape of every input forms
    # the k-th golden set, and every set is verified. Inputs not named get inferred shapes.
    shapes: dict[str, list[list[int]]] = Field(default_factory=dict)
    # Golden values per input: a fixed number ({sr: 16000}, {state: 0}) or a range
    # ({ids: {min: 0, max: 999}}). Other inputs get values inferred from the model.
    values: dict[str, ValueRange] = Field(default_factory=dict)
    # false: a build whose parity cannot be checked (no golden input the reference can run) still
    # serves, marked "parity: unverified". true (default): only the reference build itself may.
    required: bool = True

    @field_validator("shapes", mode="before")
    @classmethod
    def _one_or_more_shapes(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: [s] if isinstance(s, list) and s and all(isinstance(d, int) for d in s) else s
                    for k, s in v.items()}
        return v

    @field_validator("values", mode="before")
    @classmethod
    def _fixed_values(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: {"min": x, "max": x} if isinstance(x, (int, float)) and not isinstance(x, bool) else x
                    for k, x in v.items()}
        return v

    @field_validator("shapes")
    @classmethod
    def _concrete(cls, v: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        for name, shapes in v.items():
            if not shapes:
                raise ValueError(f"input '{name}': give at least one shape")
            for shape in shapes:
                if any(d < 1 for d in shape):
                    raise ValueError(f"input '{name}': shape {shape} must be concrete (every dimension >= 1)")
        return v


class AccuracySpec(_Strict):
    dataset: str
    metric: Literal["top1"] = "top1"
    max_drop: float = Field(0.01, ge=0, le=1)
    label_key: str = "label"
    # Fail the model when its own accuracy is below this, whatever the reference does.
    min_accuracy: float | None = Field(None, ge=0, le=1)


class AutoSpec(_Strict):
    """`backend: auto`: which backend x precision pairs to try and how to time them."""

    # "onnxruntime", "openvino:int8", ...; empty = every registered backend at fp32, plus its fp16/int8
    # when the config has an accuracy gate (lossy builds are never served without one).
    candidates: list[str] = Field(default_factory=list)
    # Batch sizes to time; empty = [1, max_batch_size]. The score is the geometric mean of the medians.
    batch_sizes: list[int] = Field(default_factory=list)
    runs: int = Field(30, ge=3, le=10_000)
    warmup: int = Field(5, ge=0, le=1000)

    @field_validator("candidates")
    @classmethod
    def _entries(cls, v: list[str]) -> list[str]:
        for entry in v:
            backend, _, precision = entry.partition(":")
            if not backend or backend == "auto":
                raise ValueError(f"auto candidate '{entry}' must name a backend")
            if precision and precision not in PRECISIONS:
                raise ValueError(f"auto candidate '{entry}': precision must be one of {PRECISIONS}")
        return v


class LimitsSpec(_Strict):
    """Per-model request limits (docs/hardening.md); each breach is a 400 with {"error"}."""

    # Elements per input tensor (batch dimension included); None = bounded by the body limit only.
    max_elements: int | None = Field(None, ge=1)
    # NaN / +-Inf in floating-point inputs: pass them to the model, or reject the request.
    nonfinite: Literal["pass", "reject"] = "pass"
    # Default per-request timeout for this model in ms (overrides KILN_REQUEST_TIMEOUT_S; a request's
    # own parameters.timeout may only shorten it).
    timeout_ms: float | None = Field(None, gt=0)


class DriftSpec(_Strict):
    """Input / prediction drift against the reference (docs/monitoring.md)."""

    enabled: bool = True
    # Share of requests whose rows enter the drift window (independent of capture's sample_rate).
    sample_rate: float = Field(1.0, ge=0, le=1)
    window: int = Field(250, ge=10, le=100_000)    # rows in the sliding window
    every: int = Field(50, ge=1)                   # evaluate every this many new rows
    p_value: float = Field(0.05, gt=0, lt=1)       # before the Bonferroni correction
    psi_bins: int = Field(10, ge=2, le=100)
    max_features: int = Field(64, ge=1, le=4096)   # larger inputs: this many evenly spaced elements
    # At most one evaluation per this many seconds (a busy model: once a second, not every N rows).
    min_interval_s: float = Field(1.0, ge=0)
    # Every feature's KS p-value at most this often (each costs ~1 ms of CPU); in between, those of the
    # drifting features (the verdict is exact at every evaluation).
    p_value_interval_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _every_within_window(self) -> "DriftSpec":
        if self.every > self.window:
            raise ValueError(f"every ({self.every}) must not exceed window ({self.window})")
        return self


class FeedbackSpec(_Strict):
    window: int = Field(1000, ge=1, le=1_000_000)  # labelled rows behind kiln_live_accuracy / kiln_live_mae
    # Labels for predictions older than this are 'late': stored, not counted in the live window.
    max_delay_s: float = Field(3600.0, gt=0)


class MonitorSpec(_Strict):
    """Traffic capture, feedback and drift for this model (docs/monitoring.md)."""

    enabled: bool = True
    # Share of requests captured (inputs, outputs, id, time, latency); None = the server's
    # --monitor-sample-rate / KILN_MONITOR_SAMPLE_RATE.
    sample_rate: float | None = Field(None, ge=0, le=1)
    # .npz drift reference (one array per input name); default verify.samples, then accuracy.dataset.
    reference: str | None = None
    # What feedback labels are: class indices (top-1 accuracy) or values (MAE); auto: by the output shape.
    task: Literal["auto", "classification", "regression"] = "auto"
    output: str | None = None  # the output the feedback is joined with (default: the first)
    drift: DriftSpec = Field(default_factory=DriftSpec)
    feedback: FeedbackSpec = Field(default_factory=FeedbackSpec)


class CanarySpec(_Strict):
    """Unversioned requests split by weight between the stable version and this one (service/rollout.py)."""

    version: int = Field(..., ge=1)
    weight: float = Field(..., ge=0, le=1)
    # Share of the canary's requests also run on the stable version, off the request path, to
    # measure disagreement on the same inputs.
    compare: float = Field(1.0, ge=0, le=1)


class ShadowSpec(_Strict):
    """A copy of sampled requests goes to this version off the request path; its answer is never returned."""

    version: int = Field(..., ge=1)
    sample: float = Field(1.0, ge=0, le=1)


class RolloutGuardSpec(_Strict):
    """Automatic rollback: the canary goes to weight 0 when one bound is broken over the window."""

    # server errors and timeouts / requests the canary answered
    max_error_rate: float | None = Field(None, ge=0, le=1)
    max_p99_ms: float | None = Field(None, gt=0)
    # disagreeing rows / compared rows (canary vs stable on the same inputs)
    max_disagreement: float | None = Field(None, ge=0, le=1)
    # live accuracy from feedback labels (service/monitor), when that is available
    min_live_accuracy: float | None = Field(None, ge=0, le=1)
    window: float = Field(60.0, gt=0, le=86_400)  # seconds
    # A bound is judged only once the window holds this many requests (or compared requests).
    min_requests: int = Field(20, ge=1)


class RolloutSpec(_Strict):
    canary: CanarySpec | None = None
    shadow: ShadowSpec | None = None
    # The version unversioned requests go to; default the highest READY version other than the
    # canary's and the shadow's.
    stable: int | None = Field(None, ge=1)
    # How two versions' answers are compared: top1 (classifiers), relative error, or auto (top1
    # when the config has labels or an accuracy gate).
    compare: Literal["auto", "top1", "relative"] = "auto"
    rtol: float = Field(1e-3, gt=0)  # relative: a row disagrees when max|a-b| / max|stable| exceeds it
    guard: RolloutGuardSpec | None = None

    @model_validator(mode="after")
    def _distinct(self) -> "RolloutSpec":
        for part in (self.canary, self.shadow):
            if part is not None and self.stable is not None and part.version == self.stable:
                raise ValueError(f"version {part.version} cannot be both the stable version and the "
                                 f"{'canary' if part is self.canary else 'shadow'}")
        return self


class VersionPolicy(_Strict):
    latest: int | None = Field(1, ge=1)
    all: bool = False
    specific: list[int] | None = None


class ModelConfig(_Strict):
    name: str | None = None
    backend: str = DEFAULT_BACKEND
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    # Tried in order when compile or a gate fails: "openvino", "fp16", or "openvino:int8".
    fallback: list[str] = Field(default_factory=list)
    # Folder (relative to the model folder) whose numeric sub-folders hold the sources;
    # lets two configs serve one source through different backends.
    source: str | None = None
    max_batch_size: int = Field(0, ge=0)
    dynamic_batching: DynamicBatching | None = None
    instances: int = Field(1, ge=1, le=64)
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    verify: VerifySpec = Field(default_factory=VerifySpec)
    accuracy: AccuracySpec | None = None
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    # Used when backend is "auto".
    auto: AutoSpec = Field(default_factory=AutoSpec)
    # Free-form knobs passed to the backend (threads, device, ...).
    backend_options: dict[str, Any] = Field(default_factory=dict)
    # Optional class labels file (one per line) for the classification extension.
    labels: str | None = None
    # Request limits: max elements per input, NaN/Inf policy, default timeout.
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    # Traffic capture, feedback / live accuracy and drift (service/monitor/).
    monitor: MonitorSpec = Field(default_factory=MonitorSpec)
    # Canary / shadow versions and automatic rollback (service/rollout.py).
    rollout: RolloutSpec | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError("model names use letters, digits, '_', '-', '.' and do not start with '.'")
        return v

    @field_validator("fallback")
    @classmethod
    def _fallback_entries(cls, v: list[str]) -> list[str]:
        for entry in v:
            backend, _, precision = entry.partition(":")
            if precision and precision not in PRECISIONS:
                raise ValueError(f"fallback entry '{entry}': precision must be one of {PRECISIONS}")
            if not backend:
                raise ValueError(f"fallback entry '{entry}' is empty")
        return v

    @model_validator(mode="after")
    def _batch_dims(self) -> "ModelConfig":
        if self.max_batch_size > 0:
            for spec in (self.inputs or []) + (self.outputs or []):
                if not spec.shape or spec.shape[0] != -1:
                    raise ValueError(
                        f"tensor '{spec.name}': with max_batch_size > 0 the first dimension is the batch and must be -1"
                    )
        return self


def format_validation_error(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{path}: field '{loc}': {e['msg']}")
    return "; ".join(lines)


def parse_config(data: Any, path: Path) -> ModelConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(path, err)) from None


def load_config(path: Path) -> ModelConfig:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    return parse_config(data, path)
