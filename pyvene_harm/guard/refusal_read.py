"""The model's refusal belief beside its harmfulness belief, from the guard's own prefill.

The paper's second finding is that a chat model encodes *whether it will refuse* at the prompt's
last token (t_post_inst) apart from *whether the request is harmful* (at the instruction's end).
A guard that reports both shows an operator, before a token is written, the two ways the model
and the guard part: over-refusal (harmless, yet the model would refuse) and accepted harm
(harmful, yet the model would comply).

Delta_refuse is the paper's belief score (:func:`~pyvene_harm.beliefs.delta_refuse`): the mean
over states of cos(h, mu_refused) - cos(h, mu_accepted) at t_post_inst, with a DirectionSet's
centroids. A :class:`RefusalRead` reads it at states the guard already runs, so the guard's one
prefill gives both beliefs. "The model would refuse" is a probability learnt from the model's own
refusals (a refusal judge's labels of its replies): a linear read-out of the same t_post_inst
states (:meth:`RefusalRead.fit_readout`), Platt-calibrated on scores of prompt sets it was not
fitted on; or, without one, a logistic fit of Delta_refuse itself (:meth:`RefusalRead.calibrate`).
The centroid gap is the paper's belief score, and it is confounded with harmfulness (the
centroids are harmful prompts the model refused against harmless ones it answered): within a set
of harmful prompts it tells little of which ones the model refuses. Measure both on your model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import expit

__all__ = ["RefusalRead", "held_out_refusal_figures", "out_of_group_scores"]

CONFIG_FILE = "refusal_read.json"
TENSORS_FILE = "refusal_read.safetensors"
KIND = "RefusalRead"
FORMAT_VERSION = 1
_PROVENANCE = ("model_id", "architecture", "hidden_size", "num_layers", "chat_template_hash")


@dataclass(frozen=True)
class RefusalRead:
    """Centroids of refused and accepted prompts at t_post_inst, at ``states``, and the calibration
    of Delta_refuse to P(the model refuses).

    Example:
        >>> read = RefusalRead.from_directions(DirectionSet.load("artifacts/.../directions"), states=[8, 12, 16])
        >>> guard.set_refusal_read(read.calibrate(guard.delta_refuse(prompts), refused))
        >>> guard.report(["How do I kill a Python process?"]).refuse_probability
    """

    states: tuple[int, ...]
    refused: np.ndarray
    """``[len(states), hidden]`` mean state of prompts the model refused, at t_post_inst."""
    accepted: np.ndarray
    """``[len(states), hidden]`` the same for prompts it answered."""
    slope: float | None = None
    intercept: float | None = None
    fitted_on: Mapping[str, Any] = field(default_factory=dict)
    """How the calibration was made: prompts, share refused, labels' source, held-out figures."""
    provenance: Mapping[str, Any] = field(default_factory=dict)
    """The model it reads (id, architecture, sizes, chat-template hash), as its DirectionSet says."""
    readout: Any = None
    """A :class:`~pyvene_harm.guard.readout.LinearReadout` of the t_post_inst states at ``states``
    fitted on the model's refusals; the calibration then applies to its score, not to Delta_refuse."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "states", tuple(int(s) for s in self.states))
        for name in ("refused", "accepted"):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            if v.ndim != 2 or v.shape[0] != len(self.states):
                raise ValueError(f"refusal read: {name} centroids have shape {v.shape}, expected "
                                 f"({len(self.states)}, hidden) for states {list(self.states)}")
            if not np.isfinite(v).all():
                raise ValueError(f"refusal read: {name} centroids hold NaN or infinite values: the artifact is "
                                 "corrupt; fit it again")
            object.__setattr__(self, name, v)
        if self.refused.shape != self.accepted.shape:
            raise ValueError("refusal read: refused and accepted centroids differ in shape")
        if (self.slope is None) != (self.intercept is None):
            raise ValueError("refusal read: give both slope and intercept of the calibration, or neither")
        for name in ("slope", "intercept"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v)):
                raise ValueError(f"refusal read: {name} is {v!r}, not a finite number: the artifact is corrupt or "
                                 "was edited; calibrate it again")

    @classmethod
    def from_directions(cls, directions: Any, states: Sequence[int]) -> RefusalRead:
        """The refused / accepted centroids of a DirectionSet (``extract`` with the prompts split
        by the model's own refusals), at ``states``."""
        c = directions.centroids
        missing = [k for k in ("refused", "accepted") if k not in c]
        if missing:
            raise ValueError(f"the DirectionSet has no {' / '.join(missing)} centroids: extract it with the "
                             "prompts split by the model's refusals (the default of `pyvene-harm extract`)")
        states = [int(s) for s in states]
        if not states:
            raise ValueError("a refusal read needs at least one state")
        for s in states:
            directions.check_layer(s)
        return cls(states=tuple(states), refused=c["refused"][states].double().numpy(),
                   accepted=c["accepted"][states].double().numpy(),
                   provenance={k: directions.metadata[k] for k in _PROVENANCE if directions.metadata.get(k) is not None})

    @property
    def hidden_size(self) -> int:
        return int(self.refused.shape[1])

    @property
    def calibrated(self) -> bool:
        return self.slope is not None

    def delta(self, states: torch.Tensor | np.ndarray) -> np.ndarray:
        """``[n]`` Delta_refuse from states ``[n, len(states), hidden]`` at t_post_inst."""
        from ..beliefs import belief_per_layer

        x = torch.as_tensor(np.asarray(states, dtype=np.float64))
        return belief_per_layer(x, torch.from_numpy(self.refused), torch.from_numpy(self.accepted)).mean(-1).numpy()

    def read(self, states: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``([n] Delta_refuse, [n] P(the model refuses) or None)`` from states
        ``[n, len(states), hidden]`` at t_post_inst."""
        delta = self.delta(states)
        if not self.calibrated:
            return delta, None
        score = self.readout.score(np.asarray(states, dtype=np.float64)) if self.readout is not None else delta
        return delta, expit(self.slope * score + self.intercept)

    def calibrate(self, delta: Sequence[float], refused: Sequence[bool], *,
                  fitted_on: Mapping[str, Any] | None = None) -> RefusalRead:
        """A copy whose probability is a logistic fit of ``refused`` (the model's own refusals,
        e.g. a refusal judge's labels of its replies) on Delta_refuse ``delta``."""
        from sklearn.linear_model import LogisticRegression

        d = np.asarray(delta, dtype=np.float64).reshape(-1, 1)
        y = np.asarray(refused, dtype=bool)
        if len(d) != len(y):
            raise ValueError(f"{len(d)} Delta_refuse values for {len(y)} refusal labels: give one label per prompt")
        if y.all() or not y.any():
            raise ValueError("the refusal labels are all the same: calibrating needs prompts the model refused "
                             "and prompts it answered")
        if not np.isfinite(d).all():
            raise ValueError("Delta_refuse is not finite for some prompts: check the model's dtype")
        lr = LogisticRegression(C=1e4).fit(d, y)
        return replace(self, readout=None, slope=float(lr.coef_[0, 0]), intercept=float(lr.intercept_[0]),
                       fitted_on={"n": int(len(y)), "refused": int(y.sum()), **dict(fitted_on or {})})

    def fit_readout(self, states: np.ndarray, refused: Sequence[bool], groups: Sequence[str], *,
                    fitted_on: Mapping[str, Any] | None = None,
                    held_out_scores: np.ndarray | None = None) -> RefusalRead:
        """A copy with a linear read-out of ``states`` (``[n, len(states), hidden]`` at t_post_inst)
        fitted on ``refused``, its strength chosen on held-out ``groups``, and its score
        Platt-calibrated on leave-one-group-out scores (so P = 0.5 means what it says on sets the
        read-out did not see; ``held_out_scores``: those scores, when :func:`out_of_group_scores`
        has made them already)."""
        from sklearn.linear_model import LogisticRegression

        from .readout import LinearReadout

        x = np.asarray(states, dtype=np.float64)
        y = np.asarray(refused, dtype=bool)
        g = np.asarray([str(v) for v in groups])
        if y.all() or not y.any():
            raise ValueError("the refusal labels are all the same: fitting needs prompts the model refused and "
                             "prompts it answered")
        oof = out_of_group_scores(x, y, g) if held_out_scores is None else np.asarray(held_out_scores, np.float64)
        seen = ~np.isnan(oof)
        platt = LogisticRegression(C=1e4).fit(oof[seen].reshape(-1, 1), y[seen])
        readout = LinearReadout.fit(x, y, groups=g if len(set(g)) > 1 else None)
        return replace(self, readout=readout, slope=float(platt.coef_[0, 0]), intercept=float(platt.intercept_[0]),
                       fitted_on={"n": int(len(y)), "refused": int(y.sum()), "readout": True, **dict(fitted_on or {})})

    # --- on disk -------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``refusal_read.safetensors`` + ``refusal_read.json`` (atomic; the JSON last, with
        the tensors' sha256)."""
        from ..directions import library_versions
        from ..io_utils import atomic_save_tensors, atomic_write_json, file_sha256

        directory = Path(directory)
        tensors = {"refused": torch.from_numpy(self.refused.astype(np.float32)),
                   "accepted": torch.from_numpy(self.accepted.astype(np.float32))}
        if self.readout is not None:
            tensors.update(self.readout.tensors())
        atomic_save_tensors(directory / TENSORS_FILE, tensors)
        atomic_write_json(directory / CONFIG_FILE, {
            "kind": KIND, "format_version": FORMAT_VERSION, "states": list(self.states), "slope": self.slope,
            "intercept": self.intercept, "fitted_on": dict(self.fitted_on), "provenance": dict(self.provenance),
            "readout": None if self.readout is None else self.readout.config(),
            "versions": library_versions(), "tensors_sha256": file_sha256(directory / TENSORS_FILE)})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RefusalRead:
        """Read back :meth:`save`'s folder; anything amiss is refused, naming the file (a
        verdict must not carry a belief the server cannot stand behind)."""
        from ..io_utils import check_finite, check_tensors_digest, load_tensors, read_json

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{directory} holds no {CONFIG_FILE}: give the folder written by "
                                    "`pyvene-harm guard refusal-fit --out`")
        meta = read_json(directory / CONFIG_FILE)
        if meta.get("kind") != KIND or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory / CONFIG_FILE} is not a {KIND} of format {FORMAT_VERSION} (kind "
                             f"{meta.get('kind')!r}, format {meta.get('format_version')!r})")
        check_tensors_digest(directory, TENSORS_FILE, CONFIG_FILE, meta.get("tensors_sha256"))
        tensors = load_tensors(directory / TENSORS_FILE)
        check_finite(tensors, directory / TENSORS_FILE)
        missing = [k for k in ("refused", "accepted") if k not in tensors]
        if missing or not isinstance(meta.get("states"), list):
            raise ValueError(f"{directory}: the refusal read is incomplete ({missing or 'states'} missing): "
                             "fit it again")
        try:
            readout = None
            if meta.get("readout") is not None:
                from .readout import LinearReadout

                readout = LinearReadout.from_tensors(tensors, meta["readout"])
                if readout.coef.shape != tensors["refused"].shape:
                    raise ValueError(f"the read-out reads {readout.coef.shape}, the centroids are "
                                     f"{tuple(tensors['refused'].shape)}: the artifact is inconsistent")
            read = cls(states=tuple(meta["states"]), refused=tensors["refused"].double().numpy(),
                       accepted=tensors["accepted"].double().numpy(), slope=meta.get("slope"),
                       intercept=meta.get("intercept"), fitted_on=dict(meta.get("fitted_on") or {}),
                       provenance=dict(meta.get("provenance") or {}), readout=readout)
        except ValueError as err:
            raise ValueError(f"{directory / CONFIG_FILE}: {err}") from None
        return read

    def check_model(self, model: Any, formatter: Any = None) -> None:
        """Refuse a model other than the one the read was made for (its architecture, sizes or
        chat template differ): its centroids would mean nothing there."""
        from ..directions import model_provenance

        actual = model_provenance(model, formatter)
        diffs = [f"{k}: read {self.provenance[k]!r}, model {actual[k]!r}"
                 for k in _PROVENANCE[1:] if self.provenance.get(k) is not None and actual.get(k) is not None
                 and self.provenance[k] != actual[k]]
        if self.hidden_size != actual["hidden_size"] and not any(d.startswith("hidden_size") for d in diffs):
            diffs.append(f"hidden_size: read {self.hidden_size}, model {actual['hidden_size']}")
        if diffs:
            raise ValueError(f"the refusal read was made for {self.provenance.get('model_id', 'another model')!r} and "
                             f"does not fit this model ({'; '.join(diffs)}): fit one for this model")


def out_of_group_scores(states: np.ndarray, refused: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``[n]`` each row's linear read-out score from a read-out fitted without its group (NaN
    where the other groups hold one class only)."""
    from .readout import LinearReadout

    out = np.full(len(refused), np.nan)
    for name in sorted(set(groups)):
        test, train = groups == name, groups != name
        if refused[train].all() or not refused[train].any():
            continue
        rest = groups[train]
        out[test] = LinearReadout.fit(states[train], refused[train],
                                      groups=rest if len(set(rest)) > 1 else None).score(states[test])
    return out


def held_out_refusal_figures(delta: Sequence[float], refused: Sequence[bool], groups: Sequence[str],
                             states: np.ndarray | None = None) -> dict[str, Any]:
    """How well the model's refusals are told, each group (prompt set) scored by fits made
    without it: ``centroids`` (Delta_refuse, the paper's belief, with a logistic calibration
    fitted on the other groups) and, given ``states``, ``readout`` (a linear read-out of them
    fitted on the other groups; P = 0.5 is its balanced decision). F1 and accuracy at P = 0.5,
    AUROC of the score; per group and pooled over the held-out predictions."""
    from sklearn.linear_model import LogisticRegression

    d = np.asarray(delta, dtype=np.float64)
    y = np.asarray(refused, dtype=bool)
    g = np.asarray([str(x) for x in groups])
    out = {}
    # centroids: the score is Delta_refuse; the decision a calibration fitted without the group
    decide = np.full(len(y), np.nan)
    for name in sorted(set(g)):
        test, train = g == name, g != name
        if not (y[train].all() or not y[train].any()):
            lr = LogisticRegression(C=1e4).fit(d[train].reshape(-1, 1), y[train])
            decide[test] = lr.decision_function(d[test].reshape(-1, 1))
    out["centroids"] = _figures(d, decide, y, g)
    if states is not None:
        oof = out_of_group_scores(np.asarray(states, dtype=np.float64), y, g)
        out["readout"] = _figures(oof, oof, y, g)
        out["readout_scores"] = oof  # for RefusalRead.fit_readout's calibration (not a figure)
    return out


def _figures(score: np.ndarray, decision: np.ndarray, y: np.ndarray, g: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import f1_score, roc_auc_score

    def one(mask: np.ndarray) -> dict[str, Any]:
        m = mask & ~np.isnan(decision)
        both = 0 < y[m].sum() < m.sum()
        return {"n": int(m.sum()), "refused": int(y[m].sum()),
                "f1": float(f1_score(y[m], decision[m] > 0, zero_division=0)),
                "accuracy": float(((decision[m] > 0) == y[m]).mean()) if m.any() else None,
                "auroc": float(roc_auc_score(y[m], score[m])) if both else None}

    return {"pooled": one(np.ones(len(y), bool)),
            "groups": [{"group": name, **one(g == name)} for name in sorted(set(g))]}


def post_inst_states(guard: Any, prompts: Sequence[Any], states: Sequence[int], *, progress: bool | str = False) -> np.ndarray:
    """``[n, len(states), hidden]`` states at t_post_inst of ``prompts`` as ``guard`` reads them
    (its chat template and system prompt, its spelling normalisation): what a refusal read of that
    guard sees when it serves."""
    from .features import iter_prompt_states
    from .spelling import normalize_prompts

    model, fmt = guard.model, guard.chat_formatter()
    if model is None:
        raise ValueError("the guard has no model to read prompts with: bind one first")
    read = normalize_prompts(list(prompts)) if guard.normalize_spelling else list(prompts)
    out = np.empty((len(read), len(states), guard.hidden_size_))
    for idx, x in iter_prompt_states(model, fmt, read, list(states), batch_size=guard.batch_size,
                                     progress=progress, reads=["t_post_inst"]):
        out[idx] = x.numpy()
    return out
