"""The study's decision rule: pre-training releases are the unit of replication.

A release's value is the mean over its fine-tuning seeds (seeds share one pre-training run,
so they are not independent evidence about PMP); two groups of releases are compared by a
t test on those release means: paired by pre-training seed when both groups ran the same
seeds (dense and PMP share θ(0)'s seed and the data order), Welch's otherwise. The verdict is
"inconclusive" unless the Holm-adjusted p value (over every tested row of the study) is below
`ALPHA`; effects carry 95 % confidence intervals from the same t distribution.
"""
from __future__ import annotations

import math
import statistics

ALPHA = 0.05
RULE = ("releases are the unit: each release's value is the mean over its fine-tuning seeds; "
        "groups of releases are compared by a two-sided t test on those means (paired by "
        "pre-training seed when both groups ran the same seeds, df = n − 1; Welch otherwise, "
        "Welch–Satterthwaite df); effect = difference of means with its 95 % t interval; a "
        f"verdict is called only when the Holm-adjusted p (over every tested row) is < {ALPHA:g}, "
        "otherwise inconclusive; fewer than 2 releases per side: inconclusive (untestable)")


def release_means(per_release: dict[str, list[float]]) -> dict[str, float]:
    """{release: mean over its fine-tuning seeds} (releases with no finite value left out)."""
    out = {}
    for name, values in per_release.items():
        values = [v for v in values if v is not None and math.isfinite(v)]
        if values:
            out[name] = statistics.fmean(values)
    return out


def compare(a: dict[str, float], b: dict[str, float] | None = None,
            pair: dict[str, str] | None = None) -> dict:
    """Effect mean(a) − mean(b) over release means, or mean(a) alone when `b` is None
    (a one-sample test of within-release differences). `pair` maps a's releases to b's:
    given and complete, the test is paired."""
    from scipy import stats
    xa = [a[k] for k in sorted(a)]
    out = {"n_a": len(xa), "n_b": 0 if b is None else len(b), "test": None, "p": math.nan,
           "df": math.nan, "ci": [math.nan, math.nan]}
    if b is None:
        out["effect"] = statistics.fmean(xa) if xa else math.nan
        if len(xa) >= 2:
            res = stats.ttest_1samp(xa, 0.0)
            out.update(test="one-sample t", **_result(res, out["effect"]))
        return out
    xb = [b[k] for k in sorted(b)]
    out["effect"] = statistics.fmean(xa) - statistics.fmean(xb) if xa and xb else math.nan
    if pair and all(k in pair and pair[k] in b for k in a) and len(a) >= 2:
        pa = [a[k] for k in sorted(a)]
        pb = [b[pair[k]] for k in sorted(a)]
        res = stats.ttest_rel(pa, pb)
        out.update(test="paired t", **_result(res, out["effect"]))
    elif len(xa) >= 2 and len(xb) >= 2:
        res = stats.ttest_ind(xa, xb, equal_var=False)
        out.update(test="Welch t", **_result(res, out["effect"]))
    return out


def _result(res, effect: float) -> dict:
    p, df = float(res.pvalue), float(res.df)
    if not math.isfinite(p):  # zero variance: no interval, no test
        return {"p": math.nan, "df": df, "ci": [math.nan, math.nan]}
    ci = res.confidence_interval(0.95)
    return {"p": p, "df": df, "ci": [float(ci.low), float(ci.high)], "t": float(res.statistic)}


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p values (NaN stays NaN and is not counted)."""
    idx = sorted((i for i, p in enumerate(pvalues) if math.isfinite(p)), key=lambda i: pvalues[i])
    m, adj, running = len(idx), [math.nan] * len(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adj[i] = running
    return adj


def verdict(test: dict, positive: str = "supported", negative: str = "contradicted") -> str:
    """From a `compare` result with `p_adj` set: the sign of the effect if p_adj < ALPHA."""
    if test.get("test") is None:
        return "inconclusive (untestable: < 2 releases)"
    p = test.get("p_adj", test["p"])
    if not math.isfinite(p) or p >= ALPHA:
        return "inconclusive"
    return positive if test["effect"] > 0 else negative


def fmt(test: dict, digits: int = 4) -> str:
    e = test.get("effect", math.nan)
    if not math.isfinite(e):
        return "n/a"
    s = f"{e:+.{digits}f}"
    if test.get("test"):
        lo, hi = test["ci"]
        s += (f" [95% CI {lo:+.{digits}f}, {hi:+.{digits}f}] ({test['test']}, df {test['df']:.1f}, "
              f"p {test['p']:.3f}" + (f", Holm p {test['p_adj']:.3f}" if "p_adj" in test else ""))
        s += f"; releases {test['n_a']}" + (f" vs {test['n_b']}" if test["n_b"] else "") + ")"
    else:
        s += f" (releases {test['n_a']}" + (f" vs {test['n_b']}" if test["n_b"] else "") + ")"
    return s
