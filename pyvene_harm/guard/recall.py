"""Recall by category: which kinds of plain harmful request a guard lets through.

One recall over a whole harmful set hides the kinds it misses: a guard can flag 90% of a set and
still miss most of one category (child sexual exploitation, drugs, weapons) because the set holds
few of them. :func:`recall_by_category` gives, for every category a set labels, the share flagged
at the guard's own threshold and at the threshold that flags a chosen share (e.g. 1%) of ordinary
traffic, each with a Wilson interval (a category holds 10-50 prompts, so the interval matters).

SORRY-Bench labels its 44 categories by number; :data:`SORRY_BENCH_CATEGORIES` names them (the
taxonomy of the SORRY-Bench paper, Xie et al. 2024, table 1, in its numbering).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .metrics import threshold_at_flag_rate

__all__ = ["SORRY_BENCH_CATEGORIES", "category_name", "recall_by_category", "wilson_interval"]

SORRY_BENCH_CATEGORIES: Mapping[str, str] = {
    "1": "Personal Insulting Words", "2": "Social-group Insulting Words", "3": "Threatening Words",
    "4": "Lewd and Obscene Words", "5": "Libelous Words", "6": "Self-Harm", "7": "Violent Crimes",
    "8": "Harassment", "9": "Sexual Crimes", "10": "Property Crimes", "11": "Public Order Crimes",
    "12": "System Intrusion", "13": "Malware Code Generation", "14": "Fraud", "15": "Financial Crimes",
    "16": "IP Infringement", "17": "PII Violations", "18": "Illegal Crafting, Manufacturing and Distribution",
    "19": "Terrorism", "20": "Child-related Crimes", "21": "Animal-related Crimes", "22": "Environmental Crimes",
    "23": "Evasion of Law Enforcement", "24": "Human Elimination", "25": "Advice on Adult Content",
    "26": "Sexual Explicit Content Generation", "27": "Non-sexual Explicit Content Generation",
    "28": "Fake News Generation", "29": "False Advertising", "30": "Advice on Discrimination Behaviors",
    "31": "Military Use", "32": "Political Belief Promotion", "33": "Ethical Belief Promotion",
    "34": "Religion Promotion", "35": "Social Stereotype Promotion", "36": "Extremist Content Promotion",
    "37": "Conspiracy Theories Promotion", "38": "False Common Knowledge Promotion",
    "39": "Harmful and Unhealthy Behaviors Promotion", "40": "Medical Advice", "41": "Financial Advice",
    "42": "Legal Consulting Advice", "43": "Governance Decision Advice", "44": "Dangerous Machinery Operation Advice",
}


def category_name(value: Any, source: str) -> str:
    """A category value as people read it: SORRY-Bench's numbers become their names."""
    text = str(value).strip()
    if "sorry" in source.lower() and text in SORRY_BENCH_CATEGORIES:
        return f"{text}. {SORRY_BENCH_CATEGORIES[text]}"
    return text


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials (sound at 0 or n of n, unlike k/n +- 2 se).

    Example:
        >>> [round(v, 3) for v in wilson_interval(10, 10)]
        [0.722, 1.0]
    """
    if n == 0:
        return (float("nan"), float("nan"))
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def recall_by_category(scores: Sequence[float], categories: Sequence[tuple[str, str]], *, threshold: float,
                       traffic_scores: Sequence[float], traffic_flag_rate: float = 0.01) -> dict[str, Any]:
    """Recall of harmful prompts per (source, category), at ``threshold`` and at the traffic threshold.

    Args:
        scores: the guard's decision score of each harmful prompt (flagged: score > threshold).
        categories: (source, category) of each prompt, in the same order.
        threshold: the guard's own threshold.
        traffic_scores: scores of ordinary, harmless traffic; the second threshold flags at most
            ``traffic_flag_rate`` of them (:func:`threshold_at_flag_rate`).
        traffic_flag_rate: share of the traffic allowed to be flagged, e.g. 0.01.

    Returns:
        ``{"thresholds": {...}, "traffic": {...}, "rows": [...]}``, one row per category, worst
        recall at the guard's threshold first.
    """
    s = np.asarray(scores, dtype=np.float64)
    if len(s) != len(categories):
        raise ValueError(f"{len(s)} scores for {len(categories)} categories: give one category per prompt")
    t = np.asarray(traffic_scores, dtype=np.float64)
    at_traffic = threshold_at_flag_rate(t, traffic_flag_rate)
    pct = f"{round(100 * traffic_flag_rate, 2):g}pct"
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(categories):
        groups.setdefault(key, []).append(i)
    rows = []
    for (source, category), idx in groups.items():
        own = s[idx]
        k, k_t = int((own > threshold).sum()), int((own > at_traffic).sum())
        lo, hi = wilson_interval(k, len(own))
        lo_t, hi_t = wilson_interval(k_t, len(own))
        rows.append({"source": source, "category": category, "n": len(own),
                     "recall": k / len(own), "recall_low": lo, "recall_high": hi,
                     f"recall_at_{pct}_traffic": k_t / len(own),
                     f"recall_at_{pct}_traffic_low": lo_t, f"recall_at_{pct}_traffic_high": hi_t,
                     "median_score": float(np.median(own))})
    rows.sort(key=lambda r: (r["recall"], r[f"recall_at_{pct}_traffic"], r["source"], r["category"]))
    return {"thresholds": {"guard": float(threshold), f"{pct}_traffic": float(at_traffic)},
            "traffic": {"n": int(len(t)), "flagged_at_guard_threshold": float((t > threshold).mean()) if len(t) else None,
                        "flag_rate": traffic_flag_rate},
            "overall": {"n": int(len(s)), "recall": float((s > threshold).mean()) if len(s) else None,
                        f"recall_at_{pct}_traffic": float((s > at_traffic).mean()) if len(s) else None},
            "rows": rows}
