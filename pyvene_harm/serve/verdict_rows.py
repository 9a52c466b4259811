"""A scoring batch's report cut back into each request's verdicts.

The worker scores the reads of several requests in one ``guard.report`` call, and a large
request over several calls; each read's figures are kept as a plain row until every read of a
request is scored, then its groups' rows are combined as
:func:`~pyvene_harm.guard.conversations.judge_groups` combines them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..guard.conversations import combine_parts

__all__ = ["combine_rows", "report_rows"]


def report_rows(rep: Any, a: int, b: int) -> list[dict[str, Any]]:
    """Rows ``a:b`` of a :class:`~pyvene_harm.guard.latent.GuardReport`, one dict per read."""
    return [{"harmful": bool(rep.harmful[i]), "score": float(rep.score[i]), "delta": float(rep.delta_harmful[i]),
             "probability": float(rep.probability[i]),
             "category": None if rep.category is None else rep.category[i],
             "category_scores": None if rep.category_scores is None else rep.category_scores[i],
             "delta_refuse": None if rep.delta_refuse is None else float(rep.delta_refuse[i]),
             "refuse_probability": None if rep.refuse_probability is None else float(rep.refuse_probability[i])}
            for i in range(a, b)]


def combine_rows(guard: Any, labels: list[str], rows: list[dict[str, Any]], names: list[str]) -> Any:
    """One verdict from the rows of one group's reads (as :func:`judge_groups` combines them)."""
    col = lambda k: np.asarray([r[k] for r in rows])  # noqa: E731
    cats = None if rows[0]["category"] is None else [r["category"] for r in rows]
    cat_scores = None if rows[0]["category_scores"] is None else np.stack([r["category_scores"] for r in rows])
    refuse = None if rows[0]["delta_refuse"] is None else col("delta_refuse")
    refuse_p = None if rows[0]["refuse_probability"] is None else col("refuse_probability")
    return combine_parts(labels, col("harmful"), col("score"), col("delta"), col("probability"), guard.threshold_,
                         cats, cat_scores, names, refuse, refuse_p)
