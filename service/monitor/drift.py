"""Input and prediction drift: a sliding window of live rows against a reference sample.

Per input feature (a flattened input element): the two-sample Kolmogorov–Smirnov statistic and its
p-value, and the population stability index (PSI); the verdict is alibi-detect's KSDrift rule,
drift when the smallest p-value is below `p_value / tests` (Bonferroni). For classifiers the
predicted-class histogram of the window is compared with the reference's predictions
(chi-square test of homogeneity, and PSI), and counts as one more test in the correction.

The KS statistic is computed here (the reference sorted once), the p-value with SciPy's
asymptotic distribution of the two-sided statistic (`scipy.stats.kstwo`), exactly as
`scipy.stats.ks_2samp(..., method="asymp")` does: tests/test_monitor_drift.py checks both.
Memory is bounded: the reference (rows × features) and a ring buffer of `window` rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import special, stats

PSI_EPS = 1e-4  # empty bins: a proportion of 0 would make PSI infinite


def ks_statistic(window: np.ndarray, reference_sorted: np.ndarray) -> float:
    """Two-sided two-sample KS statistic of one feature (as scipy.stats.ks_2samp computes it)."""
    data1 = np.sort(window)
    data2 = reference_sorted
    data_all = np.concatenate([data1, data2])
    cdf1 = np.searchsorted(data1, data_all, side="right") / len(data1)
    cdf2 = np.searchsorted(data2, data_all, side="right") / len(data2)
    diff = cdf1 - cdf2
    return float(max(np.clip(-diff.min(), 0, 1), diff.max()))


def ks_statistics(window: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """ks_statistic of every feature (column) at once: the pooled sample sorted per feature, the two
    empirical CDFs counted at the last element of each run of equal values (searchsorted 'right').
    Features-major (one contiguous row per feature), so each sort and cumulative sum runs on
    contiguous memory rather than with a stride of the feature count. The sort need not be stable:
    within a run of equal values only the run's last position counts, where both counts are the
    same in any order. The CDF difference is kept in integers, n1 n2 (cdf1 - cdf2) = c1 n - k n1
    after k pooled values of which c1 are the window's, and divided once per feature."""
    n1, n2 = len(window), len(reference)
    n, features = n1 + n2, window.shape[1]
    pooled = np.concatenate([window, reference]).T.copy()
    order = np.argsort(pooled, axis=1)
    values = pooled.ravel().take((order + (np.arange(features) * n)[:, None]).ravel()).reshape(features, n)
    scaled = np.cumsum(order < n1, axis=1) * n - np.arange(1, n + 1) * n1
    scaled[:, :-1] *= values[:, 1:] != values[:, :-1]
    return np.maximum(np.clip(-scaled.min(axis=1), 0, None), scaled.max(axis=1)) / (n1 * n2)


def chi2_homogeneity(table: np.ndarray) -> tuple[float, float]:
    """Chi-square test of homogeneity of a 2 x k table of counts (no empty column): what
    scipy.stats.chi2_contingency returns (Yates' correction when dof is 1), without its generic
    wrappers, which cost a millisecond a call."""
    table = np.asarray(table, dtype=np.float64)
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    dof = table.shape[1] - 1
    observed = table
    if dof == 1:  # Yates: every |observed - expected| moved 0.5 towards 0, at most to 0
        diff = expected - observed
        observed = observed + np.sign(diff) * np.minimum(0.5, np.abs(diff))
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    return chi2, float(special.chdtrc(dof, chi2))


def ks_n(n1: int, n2: int) -> float:
    """The effective sample size of ks_2samp's asymptotic p-value: round(n1 n2 / (n1 + n2))."""
    m, n = sorted([float(n1), float(n2)], reverse=True)
    return float(np.round(m * n / (m + n)))


def ks_2samp(window: np.ndarray, reference_sorted: np.ndarray) -> tuple[float, float]:
    """Two-sided two-sample KS statistic and asymptotic p-value of one feature."""
    d = ks_statistic(window, reference_sorted)
    return d, _kstwo_sf(d, ks_n(len(window), len(reference_sorted)))


@lru_cache(maxsize=65536)
def _kstwo_sf(d: float, n: float) -> float:
    """P(D_n >= d): SciPy's kstwo takes ~1 ms a value; D only takes values k / lcm(n1, n2), so
    windows of one size repeat them (a constant feature is always 0, whose p-value is 1)."""
    if d <= 0.0:
        return 1.0
    return float(np.clip(stats.kstwo.sf(d, n), 0, 1))


@lru_cache(maxsize=256)
def ks_quiet_below(n: float, threshold: float) -> float:
    """A statistic at or below which _kstwo_sf(d, n) >= threshold: what a feature whose statistic is
    that small does not need its p-value computed for, to be judged not drifting. Found by
    bisection, then moved down by a margin (SciPy switches method across the range, so the sf may
    not fall strictly), and checked."""
    lo, hi = 0.0, 1.0
    for _ in range(14):  # to 1/16384: well inside the margin
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _kstwo_sf(mid, n) >= threshold else (lo, mid)
    quiet = max(0.0, lo - 0.01)
    return quiet if _kstwo_sf(quiet, n) >= threshold else 0.0


def psi_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (ties merged, so discrete features get fewer bins)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    return edges


def proportions(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return counts / max(1, len(values))


def psi(live: np.ndarray, expected: np.ndarray) -> float:
    """Population stability index of two proportion vectors: sum((a - e) * ln(a / e))."""
    a = np.clip(live, PSI_EPS, None)
    e = np.clip(expected, PSI_EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_all(live: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """psi() of each row of two features x bins proportion arrays."""
    a = np.clip(live, PSI_EPS, None)
    e = np.clip(expected, PSI_EPS, None)
    return np.sum((a - e) * np.log(a / e), axis=1)


@dataclass
class DriftResult:
    """One evaluation of the window."""

    rows: int                       # rows in the window
    features: list[str]
    ks: np.ndarray                  # per feature
    p_values: np.ndarray            # per feature
    psi: np.ndarray                 # per feature
    threshold: float                # Bonferroni-corrected p-value threshold
    class_chi2: float | None = None
    class_p_value: float | None = None
    class_psi: float | None = None
    detected: bool = False
    drifted: list[str] = field(default_factory=list)
    seen: int = 0                   # rows the detector had taken in when it evaluated
    fresh: np.ndarray | None = None  # per feature: p-value computed in this evaluation (else 1, not known)

    def summary(self) -> dict:
        worst = np.argsort(-self.ks, kind="stable")[:5]
        out = {"seen": self.seen, "threshold": self.threshold, "drifted": self.drifted[:20], "n_drifted": len(self.drifted),
               "worst": [{"input": self.features[i], "ks": round(float(self.ks[i]), 6),
                          "p_value": float(self.p_values[i]), "psi": round(float(self.psi[i]), 6)} for i in worst]}
        if self.class_p_value is not None:
            out["predicted_class"] = {"chi2": self.class_chi2, "p_value": self.class_p_value, "psi": self.class_psi}
        return out


class DriftDetector:
    """Sliding window of the last `window` rows; evaluated every `every` new rows (once the window
    holds at least `every` rows). Not thread-safe: one owner (the monitor's worker thread)."""

    def __init__(self, reference: np.ndarray, features: list[str], *, window: int = 250, every: int = 50,
                 p_value: float = 0.05, bins: int = 10, reference_classes: np.ndarray | None = None,
                 n_classes: int | None = None, p_value_interval_s: float = 0.0,
                 clock=time.monotonic):
        reference = np.asarray(reference, dtype=np.float64)
        if reference.ndim != 2 or reference.shape[1] != len(features) or len(reference) < 2:
            raise ValueError(f"reference must be rows x {len(features)} features with at least 2 rows, "
                             f"got shape {list(reference.shape)}")
        if not 1 <= every <= window:
            raise ValueError(f"drift: every ({every}) must be between 1 and window ({window})")
        self.features = features
        self.window, self.every, self.p_value = window, every, p_value
        # How often a busy model is evaluated is the feeder's choice (service/monitor/hub.py hands
        # over `every` rows per min_interval_s); the clock only spaces the full p-value runs.
        self.clock = clock
        self.p_value_interval_s = p_value_interval_s
        self._last_p_values = -float("inf")
        self.reference_sorted = np.sort(reference, axis=0)
        self.edges = [psi_edges(reference[:, j], bins) for j in range(reference.shape[1])]
        self.expected = [proportions(reference[:, j], e) for j, e in enumerate(self.edges)]
        # The same bins for all features at once: edges padded with +inf (a bin nothing falls in).
        self._bins = bins
        self._edge_grid = np.full((len(features), max(1, bins - 1)), np.inf)
        for j, e in enumerate(self.edges):
            self._edge_grid[j, :len(e)] = e
        self._expected = self._proportions(reference)
        self.n_classes = n_classes
        self.reference_classes = None
        if reference_classes is not None and n_classes:
            self.reference_classes = np.bincount(np.asarray(reference_classes, dtype=np.int64), minlength=n_classes)
        # The statistic a full window's feature needs no p-value at (see evaluate): found now, with the
        # reference, rather than in the middle of serving.
        tests = len(features) + (1 if self.reference_classes is not None else 0)
        self._quiet = ks_quiet_below(ks_n(window, len(reference)), p_value / tests)
        self._rows = np.zeros((window, len(features)), dtype=np.float64)
        self._classes = np.zeros(window, dtype=np.int64)
        self._filled = 0      # rows in the ring (≤ window)
        self._next = 0        # where the next row goes
        self._since = 0       # rows added since the last evaluation
        self.seen = 0

    def add(self, rows: np.ndarray, classes: np.ndarray | None = None) -> list[DriftResult]:
        """Append rows (n × features) and their predicted classes; the evaluations that fell due."""
        rows = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
        results = []
        pos = 0
        while pos < len(rows):  # an evaluation lands every `every` rows, whatever the batch sizes
            take = min(len(rows) - pos, self.every - self._since)
            self._push(rows[pos:pos + take], None if classes is None else classes[pos:pos + take])
            pos += take
            if self._since >= self.every:
                results.append(self.evaluate())
        return results

    def _push(self, rows: np.ndarray, classes: np.ndarray | None) -> None:
        idx = (self._next + np.arange(len(rows))) % self.window
        self._rows[idx] = rows
        if classes is not None:
            self._classes[idx] = classes
        self._next = (self._next + len(rows)) % self.window
        self._filled = min(self.window, self._filled + len(rows))
        self._since += len(rows)
        self.seen += len(rows)

    def _proportions(self, rows: np.ndarray) -> np.ndarray:
        """features x bins: the share of rows in each feature's bins (proportions() of every column).
        The bin index is the number of edges at or below the value (= searchsorted(..., "right")),
        summed over the edge axis while the row axis stays contiguous."""
        nf = len(self.features)
        index = (rows.T[:, None, :] >= self._edge_grid[:, :, None]).sum(axis=1, dtype=np.int64)
        index += (np.arange(nf) * self._bins)[:, None]
        counts = np.bincount(index.ravel(), minlength=nf * self._bins).reshape(nf, self._bins)
        return counts / max(1, len(rows))

    def window_rows(self) -> np.ndarray:
        """The window's rows, oldest first."""
        if self._filled < self.window:
            return self._rows[:self._filled].copy()
        return np.concatenate([self._rows[self._next:], self._rows[:self._next]])

    def window_classes(self) -> np.ndarray:
        if self._filled < self.window:
            return self._classes[:self._filled].copy()
        return np.concatenate([self._classes[self._next:], self._classes[:self._next]])

    def evaluate(self) -> DriftResult:
        """KS statistic and PSI of every feature; p-values (SciPy's kstwo, ~1 ms each) for the
        features that drift — in descending statistic order until one does not: the same n for all
        features makes the p-value fall as the statistic grows, so a statistic at or below
        ks_quiet_below needs none — and for all of them at most once per `p_value_interval_s`
        (result.fresh marks which are from this evaluation)."""
        self._since = 0
        now = self.clock()
        rows = self.window_rows()
        nf = len(self.features)
        pv = np.ones(nf)
        n_ref = len(self.reference_sorted)
        ks = ks_statistics(rows, self.reference_sorted)
        ps = psi_all(self._proportions(rows), self._expected)
        tests = nf + (1 if self.reference_classes is not None else 0)
        threshold = self.p_value / tests
        en = ks_n(len(rows), n_ref)
        fresh = np.zeros(nf, dtype=bool)
        if now - self._last_p_values >= self.p_value_interval_s:
            self._last_p_values = now
            for j in range(nf):
                pv[j] = _kstwo_sf(float(ks[j]), en)
            fresh[:] = True
        else:
            quiet = self._quiet if len(rows) == self.window else 0.0  # the bound is for a full window's n
            for j in np.argsort(-ks, kind="stable"):
                if ks[j] <= quiet:  # this one and the rest are not drifting: their p-values are >= threshold
                    break
                pv[j], fresh[j] = _kstwo_sf(float(ks[j]), en), True
                if pv[j] >= threshold:
                    break
        result = DriftResult(len(rows), self.features, ks, pv, ps, threshold, seen=self.seen, fresh=fresh)
        if self.reference_classes is not None:
            live = np.bincount(self.window_classes(), minlength=self.n_classes)[:self.n_classes]
            table = np.stack([live, self.reference_classes])
            table = table[:, table.sum(axis=0) > 0]
            if table.shape[1] > 1:
                result.class_chi2, result.class_p_value = chi2_homogeneity(table)
            else:
                result.class_chi2, result.class_p_value = 0.0, 1.0
            result.class_psi = psi(live / max(1, live.sum()), self.reference_classes / self.reference_classes.sum())
        result.drifted = [self.features[j] for j in np.flatnonzero(pv < threshold)]
        result.detected = bool(result.drifted) or (result.class_p_value is not None
                                                     and result.class_p_value < threshold)
        return result


def feature_index(shape: tuple[int, ...], max_features: int) -> np.ndarray:
    """Which flattened elements of a row are features: all of them, or `max_features` evenly spaced."""
    total = int(np.prod(shape)) if shape else 1
    if total <= max_features:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, max_features).round().astype(np.int64))
