"""Statistics over the per-pair numbers of tables: mean and std over finite values, the paired Wilcoxon test."""
from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

import numpy as np

__all__ = ["mean_std", "paired_values", "wilcoxon", "is_number", "is_finite_number"]


class PerPairTable(Protocol):
    """What the tests need of a table (:class:`deqreg_lite.evaluate.tables.Table`, which imports this module):
    its per-pair rows (dicts with ``"pair"``) and ``values(metric)``, the metric's value per row."""

    rows: list

    def values(self, metric: str) -> list: ...




def is_number(v: Any) -> bool:
    """A real number (Python or NumPy, int or float), not a bool."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """:func:`is_number` and finite."""
    return is_number(v) and math.isfinite(float(v))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population, ddof=0) standard deviation over the finite values; NaN when there are none."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())


def paired_values(table_a: PerPairTable, table_b: PerPairTable, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The values of ``metric`` of the same pairs in two tables, as two float64 arrays ``(n,)``.

    Pairs are matched by their ``pair`` ids when both tables have the same unique ids, else by position (then the
    tables must have as many rows: ``ValueError`` if not). Pairs where either value is NaN are dropped.
    """
    ids_a = [r.get("pair") for r in table_a.rows]
    ids_b = [r.get("pair") for r in table_b.rows]
    if None not in ids_a and len(set(ids_a)) == len(ids_a) and set(ids_a) == set(ids_b) and \
            len(set(ids_b)) == len(ids_b):
        by_b = {r["pair"]: float(r.get(metric, float("nan"))) for r in table_b.rows}
        a = np.asarray(table_a.values(metric), dtype=np.float64)
        b = np.asarray([by_b[i] for i in ids_a], dtype=np.float64)
    else:
        if len(table_a.rows) != len(table_b.rows):
            raise ValueError(f"the tables hold different pairs ({len(table_a.rows)} and {len(table_b.rows)} rows, "
                             "ids not matching): evaluate both methods on the same pairs")
        a = np.asarray(table_a.values(metric), dtype=np.float64)
        b = np.asarray(table_b.values(metric), dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def wilcoxon(table_a: PerPairTable, table_b: PerPairTable, metric: str = "dice", alternative: str = "two-sided") -> float:
    """Paired Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) of ``metric`` between two tables of the same
    pairs (matched by their ``pair`` ids, else by position; :func:`paired_values`); returns the p-value.

    Pairs where either value is NaN are dropped. Returns NaN with no pairs left, and 1.0 when every difference is
    zero (no evidence of a difference). With few pairs the p-value cannot be small: with n pairs and no ties the
    smallest two-sided p is ``2 / 2^n`` (n = 5 gives 0.0625), so use at least 6 pairs.
    """
    from scipy import stats

    a, b = paired_values(table_a, table_b, metric)
    if a.size == 0:
        return float("nan")
    if np.all(a == b):
        return 1.0
    return float(stats.wilcoxon(a, b, alternative=alternative).pvalue)


def min_pairs_for_test(alpha: float = 0.05) -> int:
    """The fewest pairs with which a two-sided paired Wilcoxon signed-rank test can give ``p < alpha``: with ``n``
    pairs and no ties the smallest p is ``2 / 2^n``, so 6 for ``alpha = 0.05`` (5 pairs reach only 0.0625)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    n = 1
    while 2.0 / 2 ** n >= alpha:
        n += 1
    return n


def no_test_note(n_pairs: int, alpha: float = 0.05) -> str:
    """Why no significance test is reported for ``n_pairs`` pairs (fewer than :func:`min_pairs_for_test`), and what
    the std beside a mean then means: a sentence for under a table."""
    need = min_pairs_for_test(alpha)
    return (f"{n_pairs} pair{'s' if n_pairs != 1 else ''}: no significance test is run (a paired Wilcoxon test needs "
            f"at least {need} pairs to reach p < {alpha:g}), "
            + ("and the std in brackets is 0 by construction." if n_pairs == 1 else
               "and the std is over these pairs only."))
