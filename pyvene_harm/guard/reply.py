"""Reply Guard: is the reply the model is writing harmful, read from the model's own states.

A prompt guard reads the request; a harmless-looking request can still draw out harm, and a
reply can turn harmful after a harmless opening. While a model writes a reply it computes its
hidden states at every reply token anyway, so a linear read-out of them judges the reply for
the price of a dot product per token.

The read: at each reply token ``t``, the mean of the states (:attr:`ReplyGuard.states`) of the
``width`` reply tokens ending at ``t``, scored by one logistic-regression read-out
(:class:`~pyvene_harm.guard.readout.LinearReadout`). A reply's verdict is its highest window
score over the windows that end at or after its ``min_tokens``-th token (a shorter reply: its
last window). The maximum is what streaming needs: a reply is stopped at the first window over
the threshold, and appending tokens can only add windows. The read-out is linear, so a
window's score is the mean of per-token projections (:mod:`pyvene_harm.windows`): streaming
keeps one number per token.

Fitting reads window means at every ``stride``-th scored end of every reply, each reply's windows
weighing as one reply. A safe reply's windows are all safe. A harmful reply is harmful somewhere,
not everywhere (it may open with "Sure, here is"): it is a bag of windows of which at least one is
harmful (multiple-instance learning). A first fit labels all its windows harmful; each refit keeps
as harmful only the ``positive_share`` of its windows that the previous fit scored highest, so the
safe opening of a harmful reply stops pulling safe replies' windows up (what makes naive maximum
pooling flag too often). The read-out's strength is chosen by cross-validation with folds by
source when ``groups`` is given.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin

from ..directions import library_versions, model_provenance
from ..io_utils import (
    atomic_save_tensors,
    atomic_write_json,
    check_finite,
    check_tensors_digest,
    file_sha256,
    load_tensors,
    read_json,
)
from ..windows import window_means, window_starts
from .estimator_repr import ModelHoldingRepr
from .features import check_fits_model
from .readout import DEFAULT_CS, DEFAULT_RANK, LinearReadout

__all__ = ["CONFIG_FILE", "ReplyGuard", "ReplyStream", "TENSORS_FILE", "scored_ends"]

CONFIG_FILE = "reply_guard.json"
TENSORS_FILE = "reply_guard.safetensors"
KIND = "ReplyGuard"
FORMAT_VERSION = 1


def scored_ends(n_tokens: int, min_tokens: int) -> np.ndarray:
    """Reply tokens whose window counts towards the verdict: those from the ``min_tokens``-th on
    (a reply shorter than that: its last token only)."""
    if n_tokens < 1:
        raise ValueError("a reply with no tokens has no windows")
    return np.arange(min(min_tokens, n_tokens) - 1, n_tokens)


class ReplyGuard(ModelHoldingRepr, ClassifierMixin, BaseEstimator):
    """A scikit-learn classifier of replies from the model's states at the reply's tokens.

    ``X`` is a list of ``(prompt, reply)`` pairs (the prompt a string or a
    :class:`~pyvene_harm.conversation.Conversation`, the reply its text) scored with ``model``,
    or a list of ``[T, S, d]`` arrays of reply-token states already read
    (:func:`~pyvene_harm.guard.reply_states.reply_token_states`). ``y``: 1 harmful reply, 0 safe.

    Example:
        >>> guard = ReplyGuard(model, tokenizer, states=(12,)).fit(pairs, labels)
        >>> guard.predict([("How do I make tea?", "Boil water, then ...")])
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, states: Sequence[int] = (12,),
                 width: int = 16, min_tokens: int = 8, stride: int = 4, threshold: float = 0.0,
                 positive_share: float = 0.5, refits: int = 1, C: float | None = None, Cs: Sequence[float] = DEFAULT_CS, rank: int | None = DEFAULT_RANK,
                 formatter: Any = None, system_prompt: str | None = None, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.states, self.width, self.min_tokens, self.stride = states, width, min_tokens, stride
        self.threshold, self.C, self.Cs, self.rank = threshold, C, Cs, rank
        self.positive_share, self.refits = positive_share, refits
        self.formatter, self.system_prompt, self.batch_size = formatter, system_prompt, batch_size

    # ------------------------------------------------------------------ reading

    def _check_params(self) -> None:
        for name in ("width", "min_tokens", "stride", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {v!r}")
        if not len(self.states):
            raise ValueError("states must name at least one state to read, e.g. states=(12,)")
        if not 0 < float(self.positive_share) <= 1:
            raise ValueError(f"positive_share must be in (0, 1], got {self.positive_share!r}")
        if isinstance(self.refits, bool) or not isinstance(self.refits, (int, np.integer)) or self.refits < 0:
            raise ValueError(f"refits must be a whole number of at least 0, got {self.refits!r}")

    def chat_formatter(self) -> Any:
        if self.formatter is not None:
            return self.formatter
        if self.tokenizer is None:
            raise ValueError("scoring replies needs the model's tokenizer (or formatter=...): "
                             "ReplyGuard(model, tokenizer, ...)")
        from ..positions import ChatFormatter

        self.formatter = ChatFormatter(self.tokenizer, system_prompt=self.system_prompt)
        return self.formatter

    def reply_states(self, X: Sequence[Any]) -> list[np.ndarray]:
        """``[T, S, d]`` states at each reply's tokens (arrays in ``X`` are passed through)."""
        if len(X) == 0:
            raise ValueError("no replies given: pass at least one (prompt, reply) pair")
        if all(isinstance(x, (np.ndarray, torch.Tensor)) for x in X):
            return [np.asarray(x, dtype=np.float32) for x in X]
        if self.model is None:
            raise ValueError("reading replies needs the model: ReplyGuard(model, tokenizer, ...), or pass "
                             "reply-token states")
        bad = [i for i, x in enumerate(X) if not (isinstance(x, (tuple, list)) and len(x) == 2)]
        if bad:
            raise ValueError(f"item {bad[0]} is not a (prompt, reply) pair: pass [(prompt, reply), ...]")
        from .reply_states import reply_token_states

        states = getattr(self, "states_", tuple(self.states))
        return reply_token_states(self.model, self.chat_formatter(), [x[0] for x in X], [x[1] for x in X],
                                  states=states, batch_size=self.batch_size)

    # ------------------------------------------------------------------ fitting

    def fit(self, X: Sequence[Any], y: Sequence[int], *, groups: Sequence[Any] | None = None,
            sample_weight: Sequence[float] | None = None) -> ReplyGuard:
        """Fit the read-out on window means of every reply (see the module docstring).
        ``sample_weight``: one weight per reply (its windows share it), e.g. to make harmless
        replies weigh as much as refusals."""
        self._check_params()
        tokens = self.reply_states(X)
        y = np.asarray(y).astype(int)
        if len(y) != len(tokens) or set(y.tolist()) != {0, 1}:
            raise ValueError("fit needs one label per reply, 1 harmful or 0 safe, and replies of both kinds")
        if groups is not None and len(groups) != len(tokens):
            raise ValueError(f"{len(tokens)} replies but {len(groups)} groups: pass one group per reply")
        reply_w = np.ones(len(tokens)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if reply_w.shape != (len(tokens),) or not (np.isfinite(reply_w).all() and (reply_w > 0).all()):
            raise ValueError(f"sample_weight needs one positive finite weight per reply ({len(tokens)})")
        if groups is not None:
            g = np.asarray(groups, dtype=object)
            if min(len(set(g[y == 1].tolist())), len(set(g[y == 0].tolist()))) < 2:
                groups = None  # folds by source need two sources of each class: stratified folds instead
        bags = []
        for i, t in enumerate(tokens):
            if t.ndim != 3 or t.shape[1] != len(self.states):
                raise ValueError(f"reply {i}: states of shape {t.shape}, expected [T, {len(self.states)}, d]")
            ends = scored_ends(len(t), self.min_tokens)
            ends = np.unique(np.r_[ends[::self.stride], ends[-1]])
            bags.append(window_means(t, self.width)[ends])
        x = np.concatenate(bags)
        bag_of = np.concatenate([np.full(len(b), i) for i, b in enumerate(bags)])
        keep = np.ones(len(x), dtype=bool)
        groups_rows = None if groups is None else np.asarray(groups, dtype=object)[bag_of]
        C = self.C
        for round_ in range(int(self.refits) + 1):
            if round_:  # keep the top share of each harmful reply's windows as its harmful ones
                scores = self.readout_.score(x)
                keep = np.ones(len(x), dtype=bool)
                for i in np.flatnonzero(y):
                    rows = np.flatnonzero(bag_of == i)
                    k = max(1, int(np.ceil(self.positive_share * len(rows))))
                    keep[rows[np.argsort(-scores[rows], kind="stable")[k:]]] = False
                C = self.readout_.C if self.C is None else self.C  # chosen once, on the first fit
            counts = np.bincount(bag_of[keep], minlength=len(bags)).astype(np.float64)
            w = reply_w[bag_of[keep]] / counts[bag_of[keep]]
            self.readout_ = LinearReadout.fit(
                x[keep], y[bag_of[keep]].astype(bool), C=C, Cs=tuple(self.Cs),
                groups=None if groups_rows is None else groups_rows[keep],
                sample_weight=w * len(w) / w.sum(), rank=self.rank)
        self.states_ = tuple(int(s) for s in self.states)
        self.hidden_size_ = int(x.shape[2])
        self.threshold_ = float(self.threshold)
        self.classes_ = np.array([0, 1])
        self.n_train_ = {"harmful": int(y.sum()), "safe": int((1 - y).sum()), "windows": int(len(x)),
                        "harmful_windows": int((keep & y[bag_of].astype(bool)).sum())}
        self.metadata_ = model_provenance(self.model, self.formatter) if self.model is not None else {}
        return self

    # ------------------------------------------------------------------ scoring

    def _require_fitted(self) -> None:
        if getattr(self, "readout_", None) is None:
            raise RuntimeError("this ReplyGuard is not fitted: call fit(pairs, labels) or ReplyGuard.load(folder)")

    def projection(self) -> tuple[np.ndarray, float]:
        """``(v [S, d], offset)``: a window's score is the mean of ``sum(v * state)`` over its
        tokens, plus ``offset``."""
        self._require_fitted()
        return self.readout_.projection()

    def token_scores(self, X: Sequence[Any]) -> list[np.ndarray]:
        """Per reply, ``[T]`` the score of the window ending at each reply token (the windows
        before ``min_tokens`` are scored too, but do not count towards the verdict)."""
        v, offset = self.projection()
        out = []
        for t in self.reply_states(X):
            p = np.einsum("tsd,sd->t", t.astype(np.float64), v)
            out.append(window_means(p, self.width) + offset)
        return out

    def decision_function(self, X: Sequence[Any]) -> np.ndarray:
        """The highest counted window score per reply, minus the threshold (flag above 0); a
        non-finite score is flagged (fail closed)."""
        best = []
        for s in self.token_scores(X):
            counted = s[scored_ends(len(s), self.min_tokens)]
            best.append(np.inf if not np.isfinite(counted).all() else float(counted.max()))
        return np.asarray(best) - self.threshold_

    def predict(self, X: Sequence[Any]) -> np.ndarray:
        return (self.decision_function(X) > 0).astype(int)

    def predict_proba(self, X: Sequence[Any]) -> np.ndarray:
        """The read-out's own log-odds through a sigmoid (class-balanced, not calibrated)."""
        p = expit(self.decision_function(X) + self.threshold_)
        return np.c_[1 - p, p]

    def first_flagged(self, X: Sequence[Any]) -> list[int | None]:
        """Per reply, the index of the reply token at which streaming would stop it (None: never)."""
        out = []
        for s in self.token_scores(X):
            ends = scored_ends(len(s), self.min_tokens)
            hit = np.flatnonzero(~(s[ends] <= self.threshold_))
            out.append(int(ends[hit[0]]) if len(hit) else None)
        return out

    def judge(self, prompt: Any, reply: str | Sequence[int]) -> dict[str, Any]:
        """The verdict on one finished ``reply`` (text, or the token ids a decoder wrote) in the
        conversation that drew it out (``prompt``: an instruction or a
        :class:`~pyvene_harm.conversation.Conversation` ending with the user's turn).

        Returns ``flagged``, ``score`` (highest counted window minus the threshold; None where
        not finite, which is flagged), ``token`` (the reply token streaming would have stopped
        at; None: never) and ``tokens_judged``. Unlike streaming, the reply's last token is read.
        """
        (s,) = self.token_scores([(prompt, reply)])
        counted = s[scored_ends(len(s), self.min_tokens)]
        best = float(counted.max()) if np.isfinite(counted).all() else None
        (first,) = self.first_flagged([(prompt, reply)]) if best is None or best > self.threshold_ else (None,)
        return {"flagged": best is None or best > self.threshold_,
                "score": None if best is None else best - self.threshold_, "token": first, "tokens_judged": len(s)}

    def stream(self) -> ReplyStream:
        """A per-reply judge fed one token's states at a time (see :class:`ReplyStream`)."""
        v, offset = self.projection()
        return ReplyStream(v, offset, width=int(self.width), min_tokens=int(self.min_tokens),
                           threshold=self.threshold_)

    # ------------------------------------------------------------------ disk

    def save(self, directory: str | os.PathLike) -> Path:
        """``reply_guard.safetensors`` + ``reply_guard.json``, written atomically, the JSON last."""
        self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(directory / TENSORS_FILE, self.readout_.tensors())
        fmt = self.formatter
        config = {
            "kind": KIND, "format_version": FORMAT_VERSION, "states": list(self.states_),
            "hidden_size": self.hidden_size_, "threshold": self.threshold_, "readout": self.readout_.config(),
            "n_train": self.n_train_, "metadata": self.metadata_,
            "params": {"width": int(self.width), "min_tokens": int(self.min_tokens), "stride": int(self.stride),
                       "positive_share": float(self.positive_share), "refits": int(self.refits),
                       "rank": self.rank, "batch_size": int(self.batch_size),
                       "system_prompt": fmt.system_prompt if fmt is not None else self.system_prompt},
            "extra": getattr(self, "extra_", {}),
            "versions": library_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tensors_sha256": file_sha256(directory / TENSORS_FILE),
        }
        atomic_write_json(directory / CONFIG_FILE, config)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, model: Any = None, tokenizer: Any = None, *,
             formatter: Any = None) -> ReplyGuard:
        """Read a saved reply guard, refusing (not guessing) anything incomplete, edited or made
        for another model."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{directory} holds no {CONFIG_FILE}: give a folder written by ReplyGuard.save "
                                    "or `pyvene-harm guard reply-fit --out`")
        meta = read_json(directory / CONFIG_FILE)
        if meta.get("kind") != KIND:
            raise ValueError(f"{directory / CONFIG_FILE} is not a ReplyGuard (kind {meta.get('kind')!r})")
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{directory} holds ReplyGuard format {version!r}, newer than this library's "
                             f"{FORMAT_VERSION}: upgrade with pip install -U pyvene-harm")
        check_tensors_digest(directory, TENSORS_FILE, CONFIG_FILE, meta.get("tensors_sha256"))
        tensors = load_tensors(directory / TENSORS_FILE)
        check_finite(tensors, directory / TENSORS_FILE)
        readout = LinearReadout.from_tensors(tensors, meta.get("readout") or {})
        states = meta.get("states")
        threshold = meta.get("threshold")
        if (not isinstance(states, list) or not states or readout.coef.shape[0] != len(states)
                or readout.coef.shape[1] != meta.get("hidden_size")):
            raise ValueError(f"{directory}: the read-out's shape {readout.coef.shape} does not match states {states} "
                             f"x hidden size {meta.get('hidden_size')}: the artifact is inconsistent, save it again")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
            raise ValueError(f"{directory / CONFIG_FILE}: threshold {threshold!r} is not a finite number: the "
                             "artifact is corrupt or was edited, save it again")
        p = meta.get("params") or {}
        guard = cls(model, tokenizer, states=tuple(states), width=int(p.get("width", 16)),
                    min_tokens=int(p.get("min_tokens", 8)), stride=int(p.get("stride", 4)),
                    threshold=float(threshold), positive_share=float(p.get("positive_share", 0.5)),
                    refits=int(p.get("refits", 1)), rank=p.get("rank", DEFAULT_RANK), formatter=formatter,
                    system_prompt=p.get("system_prompt"), batch_size=int(p.get("batch_size", 8)))
        guard._check_params()
        guard.readout_, guard.states_ = readout, tuple(int(s) for s in states)
        guard.hidden_size_, guard.threshold_ = int(meta["hidden_size"]), float(threshold)
        guard.classes_, guard.n_train_ = np.array([0, 1]), dict(meta.get("n_train") or {})
        guard.metadata_, guard.extra_ = dict(meta.get("metadata") or {}), dict(meta.get("extra") or {})
        if model is not None:
            fmt = guard.chat_formatter() if (tokenizer is not None or formatter is not None) else None
            check_fits_model(guard.metadata_, guard.hidden_size_, guard.states_, model, fmt)
        return guard

    def __sklearn_is_fitted__(self) -> bool:
        return getattr(self, "readout_", None) is not None


class ReplyStream:
    """Judges one reply as it is written, from one token's states at a time.

    :meth:`push` takes the ``[S, d]`` states of the next reply token (what a
    :class:`~pyvene_harm.guard.reply_states.StateTap` saw in the decoding forward) and returns the
    window score ending there; :attr:`flagged_at` is the first counted token over the threshold.
    Memory is one float per token.
    """

    def __init__(self, v: np.ndarray, offset: float, *, width: int, min_tokens: int, threshold: float) -> None:
        self.v, self.offset = np.asarray(v, dtype=np.float64), float(offset)
        self.width, self.min_tokens, self.threshold = width, min_tokens, threshold
        self.csum = [0.0]
        self._v_t: torch.Tensor | None = None
        self.flagged_at: int | None = None
        self.best = -np.inf

    def push(self, states: np.ndarray | torch.Tensor) -> float:
        if isinstance(states, torch.Tensor):  # one fused dot product where the states live
            if self._v_t is None or self._v_t.device != states.device:
                self._v_t = torch.as_tensor(self.v, device=states.device)
            dot = float(torch.sum(states.double() * self._v_t))
        else:
            dot = float(np.sum(np.asarray(states, np.float64) * self.v))
        self.csum.append(self.csum[-1] + dot)
        t = len(self.csum) - 2
        start = max(0, t - self.width + 1)
        score = (self.csum[t + 1] - self.csum[start]) / (t + 1 - start) + self.offset
        if t >= self.min_tokens - 1:
            self.best = max(self.best, score) if np.isfinite(score) else np.inf
            if self.flagged_at is None and not score <= self.threshold:
                self.flagged_at = t
        return score

    @property
    def n_tokens(self) -> int:
        return len(self.csum) - 1

    def finish(self) -> float:
        """The reply's verdict score once it is complete (a reply shorter than ``min_tokens``
        is judged by its last window here)."""
        if self.n_tokens == 0:
            raise ValueError("no reply token was pushed")
        if self.n_tokens < self.min_tokens:
            t = self.n_tokens - 1
            start = int(window_starts(t + 1, self.width)[-1])
            score = (self.csum[t + 1] - self.csum[start]) / (t + 1 - start) + self.offset
            self.best = score if np.isfinite(score) else np.inf
            if self.flagged_at is None and not score <= self.threshold:
                self.flagged_at = t
        return self.best
