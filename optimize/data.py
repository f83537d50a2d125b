"""DATA for every ``kiln optimize`` command, and its one seeded split.

``--data`` is an ``.npz`` (arrays named after the model's inputs, optional ``labels``), a folder of
images in class sub-folders (``--image-size``, ``--mean``, ``--std``), or ``path/to/file.py:function``
returning ``(inputs, labels)`` (inputs: one array or a dict name -> array; labels may be None).
It is split once, seeded, into calibration / fine-tune / validation / held-out evaluation
(:func:`split`), or the parts are given apart (``--calib``, ``--train``, ``--eval``). The split is
recorded (:meth:`Splits.record`) in every output's optimize.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OptimizeError

LABEL_KEYS = ("labels", "label")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Data:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    origin: str = ""

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, idx: np.ndarray) -> "Data":
        return Data({k: np.ascontiguousarray(v[idx]) for k, v in self.inputs.items()},
                    None if self.labels is None else np.ascontiguousarray(self.labels[idx]), self.origin)

    def head(self, n: int) -> "Data":
        return self.take(np.arange(min(n, len(self))))


@dataclass
class Splits:
    calib: Data
    train: Data
    val: Data
    eval: Data
    how: dict

    def record(self) -> dict:
        return {**self.how, "sizes": {k: len(getattr(self, k)) for k in ("calib", "train", "val", "eval")},
                "labels": self.eval.labels is not None}


@dataclass
class ImageOptions:
    size: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise OptimizeError(f"{what} must be comma-separated numbers, got '{text}'") from None
    if what == "--std" and any(v <= 0 for v in vals):
        raise OptimizeError(f"--std values must be > 0, got '{text}'")
    return vals


def _from_arrays(inputs, labels, origin: str, input_names: list[str]) -> Data:
    if isinstance(inputs, np.ndarray):
        if len(input_names) > 1:
            raise OptimizeError(f"{origin}: one array given, the model has inputs {input_names}")
        inputs = {(input_names or ["input"])[0]: inputs}
    if not isinstance(inputs, dict) or not inputs or not all(isinstance(v, np.ndarray) for v in inputs.values()):
        raise OptimizeError(f"{origin}: inputs must be a numpy array or a dict of name -> numpy array")
    lengths = {len(v) for v in inputs.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise OptimizeError(f"{origin}: inputs must be non-empty with the same number of rows, got "
                            + ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items()))
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != next(iter(lengths)):
            raise OptimizeError(f"{origin}: {len(next(iter(inputs.values())))} inputs but {len(labels)} labels")
    return Data({k: np.ascontiguousarray(v) for k, v in inputs.items()}, labels, origin)


def load_npz(path: Path, input_names: list[str]) -> Data:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:
        raise OptimizeError(f"{path}: not a readable .npz file ({type(err).__name__})") from None
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    labels = arrays.pop(label_key) if label_key else None
    if not arrays:
        raise OptimizeError(f"{path}: no input arrays (found only {label_key})")
    if input_names and set(input_names) <= set(arrays):
        inputs = {n: arrays[n] for n in input_names}
    elif not input_names:  # a factory's inputs are named by its data
        inputs = arrays
    elif len(input_names) == 1 and list(arrays) == ["input"]:
        inputs = {input_names[0]: arrays["input"]}  # the toolkit's own one-input files (data/calib.npz)
    else:
        raise OptimizeError(f"{path}: arrays {sorted(arrays)} do not match the model's inputs {input_names} "
                            "(name each array after an input; labels go in 'labels')")
    return _from_arrays(inputs, labels, str(path), input_names)


def load_image_folder(path: Path, input_names: list[str], opts: ImageOptions) -> Data:
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise OptimizeError(f"{path}: an image folder needs one sub-folder per class (e.g. {path}/cat/1.jpg)")
    mean = np.asarray(opts.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(opts.std, np.float32).reshape(-1, 1, 1)
    images, labels = [], []
    for ci, cls in enumerate(classes):
        for f in sorted((path / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB" if len(opts.mean) == 3 else "L").resize((opts.size, opts.size), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / np.float32(255.0)
            except Exception as err:
                raise OptimizeError(f"{f}: not a readable image ({type(err).__name__})") from None
            arr = arr.reshape(arr.shape[0], arr.shape[1], -1).transpose(2, 0, 1)
            images.append((arr - mean) / std)
            labels.append(ci)
    if not images:
        raise OptimizeError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class sub-folders")
    if len(input_names) > 1:
        raise OptimizeError(f"{path}: an image folder feeds a one-input model, this one has {input_names}")
    return Data({(input_names or ["input"])[0]: np.stack(images).astype(np.float32)}, np.asarray(labels, np.int64),
                f"{path} (classes: {', '.join(classes)})")


def load_data(spec: str | Path, input_names: list[str], images: ImageOptions | None = None, what: str = "--data") -> Data:
    """Read one DATA argument (see the module docstring)."""
    from .source import is_factory_spec, load_python_function

    text = str(spec)
    if is_factory_spec(text):
        func = load_python_function(text, what)
        try:
            got = func()
        except Exception as err:
            raise OptimizeError(f"{what} {text} raised {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from None
        if not isinstance(got, tuple) or len(got) != 2:
            raise OptimizeError(f"{what} {text} must return (inputs, labels), got {type(got).__name__}")
        return _from_arrays(got[0], got[1], text, input_names)
    path = Path(text)
    if not path.exists():
        raise OptimizeError(f"{what} {path}: file not found")
    if path.is_dir():
        return load_image_folder(path, input_names, images or ImageOptions())
    if path.suffix == ".npz":
        return load_npz(path, input_names)
    raise OptimizeError(f"{what} {path}: expected an .npz, an image folder with class sub-folders, or file.py:function")


def check_against(data: Data, inputs) -> None:
    """The data's names, dtypes and per-row shapes match the model's inputs (a TensorInfo list)."""
    from backends.datatypes import numpy_dtype

    want = [t.name for t in inputs]
    if sorted(data.inputs) != sorted(want):
        raise OptimizeError(f"{data.origin}: data inputs {sorted(data.inputs)} do not match the model's inputs {want}")
    for t in inputs:
        arr = data.inputs[t.name]
        dt = numpy_dtype(t.datatype)
        if arr.dtype != dt:
            raise OptimizeError(f"{data.origin}: '{t.name}' is {arr.dtype}, the model's input is {dt}")
        if arr.ndim != len(t.shape) or any(w > 0 and w != g for w, g in zip(t.shape[1:], arr.shape[1:])):
            raise OptimizeError(f"{data.origin}: '{t.name}' has rows of shape {list(arr.shape[1:])}, the model's input is "
                                f"{list(t.shape)}")
    data.inputs = {t.name: data.inputs[t.name] for t in inputs}  # the model's order


FRACTIONS = {"calib": 0.1, "train": 0.6, "val": 0.1, "eval": 0.2}


def split(data: Data, seed: int = 0, calib_max: int = 256) -> Splits:
    """One seeded permutation cut into calibration / fine-tune / validation / held-out evaluation.

    Calibration rows come from their own slice (not the eval slice); at least one row per part."""
    n = len(data)
    if n < 8:
        raise OptimizeError(f"{data.origin}: {n} rows are too few to split into calibration/train/validation/eval (need ≥ 8)")
    perm = np.random.default_rng(seed).permutation(n)
    n_cal = max(1, min(calib_max, int(round(FRACTIONS["calib"] * n))))
    n_val = max(1, int(round(FRACTIONS["val"] * n)))
    n_eval = max(1, int(round(FRACTIONS["eval"] * n)))
    cuts = np.cumsum([n_cal, n_val, n_eval])
    cal, val, ev, tr = np.split(perm, cuts)
    if len(tr) == 0:
        raise OptimizeError(f"{data.origin}: too few rows for a training split")
    parts = {k: np.sort(v) for k, v in (("calib", cal), ("val", val), ("eval", ev), ("train", tr))}
    return Splits(**{k: data.take(v) for k, v in parts.items()},
                  how={"data": data.origin, "seed": seed, "method": "seeded permutation", "fractions": FRACTIONS})


def given_apart(calib: Data | None, train: Data | None, evaluation: Data, seed: int = 0) -> Splits:
    """``--calib/--train/--eval``: validation is carved (15%, seeded) from train; calibration defaults to train's head."""
    if train is not None and len(train) >= 8:
        perm = np.random.default_rng(seed).permutation(len(train))
        n_val = max(1, int(round(0.15 * len(train))))
        val, tr = train.take(np.sort(perm[:n_val])), train.take(np.sort(perm[n_val:]))
    else:
        tr = val = train if train is not None else evaluation
    cal = calib if calib is not None else (tr.head(256))
    return Splits(cal, tr, val, evaluation, how={"calib": cal.origin, "train": tr.origin, "eval": evaluation.origin,
                                                 "seed": seed, "method": "given apart; validation = 15% of train"})


def digits_splits() -> Splits:
    """The bundled digits: the default data of the bundled DigitsCNN (and only of it)."""
    from . import digits, modelio

    s = digits.load_splits(modelio.DATA_SEED)
    from .distill import carve_validation

    (xt, yt), (xv, yv) = carve_validation(s.x_train, s.y_train, 0.15, 0)
    mk = lambda x, y, what: Data({"input": x}, y, f"scikit-learn digits ({what})")  # noqa: E731
    return Splits(mk(s.x_calib, s.y_calib, "calib"), mk(xt, yt, "train"), mk(xv, yv, "validation"),
                  mk(s.x_eval, s.y_eval, "held-out eval"),
                  how={"data": "scikit-learn load_digits (the bundled model's own split)", "seed": modelio.DATA_SEED})


def rename(splits: Splits, names: list[str]) -> Splits:
    """Give single-input data the model's input name."""
    for part in (splits.calib, splits.train, splits.val, splits.eval):
        if len(part.inputs) == 1 and len(names) == 1 and names[0] not in part.inputs:
            part.inputs = {names[0]: next(iter(part.inputs.values()))}
    return splits
