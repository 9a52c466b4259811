"""Guard designs: what a guard reads and how it is fitted, named and parsed from ``key=value``.

``guard crossval`` compares designs, ``guard fit --design`` fits one; both read them from
:data:`DESIGNS` presets or ``NAME:key=value,...`` specs (:func:`parse_design`). A design is
either a Latent Guard (``method="paper"`` or ``"linear"``, reading the model's states) or a
text-only control (``"ngram"``, ``"length"``) that a latent guard has to beat.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..reads import check_reads
from .controls import CONTROLS, TextControl

__all__ = ["DESIGNS", "GuardDesign", "middle_states", "parse_design"]


@dataclass(frozen=True)
class GuardDesign:
    """How to build a guard from training sources: what a :class:`LatentGuard` reads and how it
    is fitted, plus which sources it may learn from.

    Args:
        name: the design's name in tables.
        method: ``"paper"`` or ``"linear"`` (see :class:`LatentGuard`), or a control that reads
            only the text: ``"ngram"`` or ``"length"`` (see :mod:`~pyvene_harm.guard.controls`).
        reads: where states are read (see :data:`~pyvene_harm.reads.READS`).
        layers: state indices; None = all.
        augment: fit on surface variants of every training prompt as well.
        C: the linear read-out's strength; None = chosen by cross-validation over the training
            sources (folds by source).
        rank: principal directions the linear read-out works in (None = all).
        train_on: names of the sources it may be fitted on (None = all); a narrower pool shows
            what broad pools add.
        mine_negatives: after a first fit, add this many prompts of the training-only harmless
            pools that the guard scores most harmful (its own false positives) and refit.
        balance_sources: weight prompts so that every source has the same say within its class.
        Cs: the grid ``C`` is chosen from: ``"default"`` (1e-3..10) or ``"wide"`` (1e-5..10).
        scan_negatives: for a ``scan:K`` read, the highest-scoring windows of each harmless
            training prompt added as harmless rows before the final fit (see :class:`LatentGuard`).
        calibrate_max: for a ``scan:K`` read, map the read-out by a Platt fit of training prompts'
            highest windows under refits that left their source out
            (:mod:`~pyvene_harm.guard.max_calibration`).
        max_threshold: with ``calibrate_max``, where the calibrated maximum is cut (``platt`` or
            ``worst_source``).
        sentence_budget: for a ``sent:K`` read, the share of any harmless training source that its
            earlier sentence ends may flag beyond the last window, which fixes the margin they must
            clear (:func:`~pyvene_harm.sentences.fit_margin`); None: no margin (every sentence end is
            cut at the threshold, so appending text cannot lower a verdict).
        margin_only: for a ``sent:K`` read with a budget, harmless sources the margin is also fitted
            on (each within the budget, scored by the fitted read-out) that the read-out is never
            fitted on: the read-out stays the one fitted without them, and only the margin learns
            what they hold (``guard fit --margin-harmless``; ninth decision).
    """

    name: str
    method: str = "paper"
    reads: tuple[str, ...] = ("t_inst",)
    layers: tuple[int, ...] | None = None
    augment: bool = False
    C: float | None = None
    rank: int | None = 256
    train_on: tuple[str, ...] | None = None
    mine_negatives: int = 0
    balance_sources: bool = False
    Cs: str = "default"
    scan_negatives: int = 2
    calibrate_max: bool = False
    max_threshold: str = "platt"
    sentence_budget: float | None = None
    margin_only: tuple[str, ...] | None = None

    def fits_on(self, name: str, origin: str | None = None) -> bool:
        """Whether the design may be fitted on the source ``name`` (part of the source
        ``origin``): one ``train_on`` names, if it names any, and never a ``margin_only`` source
        or a part of one (its pools included)."""
        return ((self.train_on is None or name in self.train_on)
                and not {name, origin or name} & set(self.margin_only or ()))

    @property
    def is_control(self) -> bool:
        """True for the text-only controls, which read prompts rather than states."""
        return self.method in CONTROLS

    def __post_init__(self) -> None:
        object.__setattr__(self, "reads", tuple(check_reads(self.reads)))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
        if self.method not in ("paper", "linear", *CONTROLS):
            raise ValueError(f"design {self.name!r}: unknown method {self.method!r}: use paper, linear, "
                             f"{' or '.join(CONTROLS)}")
        if self.Cs not in ("default", "wide"):
            raise ValueError(f"design {self.name!r}: Cs must be default or wide, got {self.Cs!r}")
        if self.mine_negatives < 0:
            raise ValueError(f"design {self.name!r}: mine_negatives must be >= 0")
        if self.scan_negatives < 0:
            raise ValueError(f"design {self.name!r}: scan_negatives must be >= 0")
        if not self.is_control and any(r.startswith(("scan:", "sent:")) for r in self.reads):
            if len(self.reads) > 1 or self.method != "linear":
                raise ValueError(f"design {self.name!r}: a scan or sent read stands alone with method=linear")
        if self.sentence_budget is not None:
            if self.is_control or not self.reads[0].startswith("sent:"):
                raise ValueError(f"design {self.name!r}: sentence_budget sets the margin of a sent:K read's earlier "
                                 "sentence ends: use reads=sent:K")
            if not 0 <= self.sentence_budget < 1:
                raise ValueError(f"design {self.name!r}: sentence_budget is a share in [0, 1), "
                                 f"got {self.sentence_budget!r}")
        if self.margin_only is not None:
            object.__setattr__(self, "margin_only", (self.margin_only,) if isinstance(self.margin_only, str)
                               else tuple(self.margin_only))
            if self.sentence_budget is None:
                raise ValueError(f"design {self.name!r}: margin_only names sources a sentence margin is fitted on: add "
                                 "sentence_budget (and reads=sent:K)")
            both = sorted(set(self.margin_only) & set(self.train_on or ()))
            if both:
                raise ValueError(f"design {self.name!r}: {both} in both train_on and margin_only: a margin-only source "
                                 "is never fitted on; name it in one of them")
        if self.calibrate_max and (self.is_control or not self.reads[0].startswith("scan:")):
            raise ValueError(f"design {self.name!r}: calibrate_max calibrates a scan read's maximum: use reads=scan:K")
        if self.max_threshold not in ("platt", "worst_source"):  # max_calibration.MAX_THRESHOLDS (torch-free here)
            raise ValueError(f"design {self.name!r}: max_threshold must be platt or worst_source, got "
                             f"{self.max_threshold!r}")
        if self.max_threshold != "platt" and not self.calibrate_max:
            raise ValueError(f"design {self.name!r}: max_threshold cuts a calibrated maximum: add calibrate_max=1")

    def estimator(self, layers: Sequence[int] | None) -> Any:
        """An unfitted :class:`LatentGuard` for precomputed states of ``layers`` (None: every
        state; a :class:`~pyvene_harm.guard.controls.TextControl` for a control). Everything the
        design says of the guard is set here; a caller adds the model and how to run it."""
        from .latent import LatentGuard
        from .readout import WIDE_CS

        if self.is_control:
            return TextControl(self.method, C=self.C)
        return LatentGuard(method=self.method, reads=self.reads, layers=None if layers is None else list(layers),
                           C=self.C, rank=self.rank,
                           Cs=WIDE_CS if self.Cs == "wide" else None, scan_negatives=self.scan_negatives,
                           calibrate_max=self.calibrate_max, max_threshold=self.max_threshold,
                           sentence_budget=self.sentence_budget)

    def as_dict(self) -> dict[str, Any]:
        """The design as a run's ``config.json`` records it. ``max_threshold`` came after runs
        were published with calibrated designs; it is written only where it is not ``platt``, so
        those runs' configs still describe what they ran and can be resumed."""
        d = asdict(self)
        for key, default in (("max_threshold", "platt"), ("sentence_budget", None), ("margin_only", None)):
            if d[key] == default:
                del d[key]
        d["reads"] = list(self.reads)
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["train_on"] = list(self.train_on) if self.train_on is not None else None
        if self.margin_only is not None:
            d["margin_only"] = list(self.margin_only)
        return d


DESIGNS: dict[str, str] = {
    "paper": "method=paper,reads=t_inst",
    "paper-mean": "method=paper,reads=mean_inst",
    "linear-tinst-aug": "method=linear,reads=t_inst,layers=middle,augment=1",
    "linear-mean": "method=linear,reads=mean_inst,layers=middle",
    "linear-mean-aug": "method=linear,reads=mean_inst,layers=middle,augment=1",
    "linear-last16-aug": "method=linear,reads=last:16,layers=middle,augment=1",
    "linear-last16-mined": "method=linear,reads=last:16,layers=middle,augment=1,mine_negatives=150",
    "linear-scan16-mined": "method=linear,reads=scan:16,layers=middle,augment=1,mine_negatives=150",
    "linear-scan8-mined": "method=linear,reads=scan:8,layers=middle,augment=1,mine_negatives=150",
    "linear-scan4-mined": "method=linear,reads=scan:4,layers=middle,augment=1,mine_negatives=150",
    "linear-scan16-cal": "method=linear,reads=scan:16,layers=middle,augment=1,mine_negatives=150,calibrate_max=1",
    "linear-scan16-cal-worst": ("method=linear,reads=scan:16,layers=middle,augment=1,mine_negatives=150,calibrate_max=1,"
                                "max_threshold=worst_source"),
    "linear-sent16-mined": "method=linear,reads=sent:16,layers=middle,augment=1,mine_negatives=150",
    "linear-sent16-b1": "method=linear,reads=sent:16,layers=middle,augment=1,mine_negatives=150,sentence_budget=0.01",
    "linear-sent16-b2": "method=linear,reads=sent:16,layers=middle,augment=1,mine_negatives=150,sentence_budget=0.02",
    "linear-sent16-mo-b2": ("method=linear,reads=sent:16,layers=middle,augment=1,mine_negatives=150,sentence_budget=0.02,"
                            "margin_only=multi-sentence"),
    "linear-sent16-mo-b1": ("method=linear,reads=sent:16,layers=middle,augment=1,mine_negatives=150,sentence_budget=0.01,"
                            "margin_only=multi-sentence"),
    "linear-post1-aug": "method=linear,reads=post:1,layers=middle,augment=1",
    "linear-mean-tpost-aug": "method=linear,reads=mean_inst+t_post_inst,layers=middle,augment=1",
    "ngram": "method=ngram,augment=1",
    "length": "method=length,augment=1",
}
"""Named designs (``--design NAME``), as the ``key=value`` specs :func:`parse_design` reads.

``paper`` is the paper's guard (centroid gap at t_inst, every state); the others vary one thing
at a time: where the states are read (the mean over the instruction's tokens, its last 16
tokens, the first post-instruction token, t_post_inst beside the mean), a logistic read-out over
the middle states instead of centroids, and fitting on surface variants (``-aug``). ``ngram``
and ``length`` are the text-only controls, fitted on the same rows as the ``-aug`` designs.
``linear-last16-mined`` adds 150 hard negatives mined from the harmless pools (``--pool``) and
refits; the ``linear-scanK-mined`` designs read the same way at every window of K tokens along
the instruction and take the highest (:mod:`~pyvene_harm.windows`): text appended after a
request cannot dilute them; ``linear-scan16-cal`` also calibrates the maximum on the training
sources' out-of-source maxima (:mod:`~pyvene_harm.guard.max_calibration`), which cuts false
positives on unseen harmless sources at some cost in recall (``docs/guard-choice.md``, fifth
decision). The ``linear-sent16`` designs keep the shipped read-out and read it also at every
earlier sentence end of the instruction (:mod:`~pyvene_harm.sentences`), with no margin or with
one fitted to a budget of 1% or 2% added flags per harmless training source (seventh decision);
the ``linear-sent16-mo`` designs fit that margin also on the ``multi-sentence`` source (long
harmless requests) but never their read-out, which stays the shipped one (ninth decision).
"""


def middle_states(n_states: int) -> tuple[int, ...]:
    """Every other state from a third to two thirds of the depth (``layers=middle``).

    Harmfulness is linearly readable in the middle of the network; early states still mostly
    encode the tokens themselves (surface form) and late ones the reply being prepared. For the
    0.5B demo model (25 states): 8, 10, 12, 14, 16.
    """
    if n_states < 3:
        raise ValueError(f"layers=middle needs a model with at least 3 states, got {n_states}")
    lo, hi = round(n_states / 3), round(2 * n_states / 3)
    return tuple(range(lo, max(hi, lo + 1), 2))


def parse_design(text: str, n_states: int | None = None) -> GuardDesign:
    """A design from a preset name (:data:`DESIGNS`), or ``name:key=value,key=value`` (keys:
    method, reads (``+`` between reads), layers (``8-16``, ``8+12+16``, ``middle`` or ``all``),
    augment, C, Cs (``default`` or ``wide``), rank, train_on and margin_only (``+`` between source
    names), mine_negatives, balance_sources, scan_negatives, calibrate_max, max_threshold,
    sentence_budget).

    Example:
        >>> parse_design("mine:method=linear,reads=mean_inst+t_post_inst,layers=8-16,augment=1").reads
        ('mean_inst', 't_post_inst')
    """
    name, sep, spec = text.partition(":")
    name = name.strip()
    if not sep:
        if name not in DESIGNS:
            raise ValueError(f"unknown design {name!r}: use one of {', '.join(DESIGNS)} or NAME:key=value,...")
        spec = DESIGNS[name]
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"design {text!r}: {part!r} is not key=value")
        key, value = key.strip(), value.strip()
        if key == "method":
            kwargs[key] = value
        elif key in ("reads", "train_on", "margin_only"):
            kwargs[key] = tuple(v for v in value.split("+") if v)
        elif key == "layers" and value == "middle":
            if n_states is None:
                raise ValueError(f"design {text!r}: layers=middle needs the model's number of states; give layers")
            kwargs[key] = middle_states(n_states)
        elif key == "layers":
            kwargs[key] = None if value == "all" else _parse_ints(value, text)
        elif key in ("augment", "balance_sources", "calibrate_max"):
            kwargs[key] = value.lower() in ("1", "true", "yes", "on")
        elif key == "C":
            kwargs[key] = None if value.lower() in ("auto", "cv", "none") else float(value)
        elif key in ("Cs", "max_threshold"):
            kwargs[key] = value
        elif key == "sentence_budget":
            kwargs[key] = None if value.lower() == "none" else _parse_float(value, text)
        elif key in ("mine_negatives", "rank", "scan_negatives"):
            kwargs[key] = None if value.lower() in ("all", "none") else int(value)
        else:
            raise ValueError(f"design {text!r}: unknown key {key!r}")
    design = GuardDesign(name, **kwargs)
    if n_states is not None and design.layers is not None:
        bad = [x for x in design.layers if not 0 <= x < n_states]
        if bad:
            raise ValueError(f"design {name!r}: layer {bad[0]} is out of range (states 0-{n_states - 1})")
    return design


def _parse_ints(value: str, text: str) -> tuple[int, ...]:
    out: set[int] = set()
    try:
        for part in re.split(r"[;+]", value):
            a, dash, b = part.partition("-")
            out.update(range(int(a), int(b) + 1) if dash else [int(a)])
    except ValueError:
        raise ValueError(f"design {text!r}: cannot read layers {value!r} (use 8-16 or 8+12+16)") from None
    return tuple(sorted(out))


def _parse_float(value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"design {text!r}: cannot read {value!r} as a number") from None
