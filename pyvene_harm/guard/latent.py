"""LatentGuard: a scikit-learn classifier from a chat model's own harmfulness belief.

The paper's Latent Guard (``method="paper"``): the centroids of harmful and harmless training
prompts at t_inst, per layer; a prompt is harmful when Delta_harmful (its mean cosine gap to the
two centroids over the layers) exceeds a threshold (0). It costs one partial prefill of the
served model, and it reads the harmfulness belief rather than the refusal decision, so
jailbreaks that only suppress refusal do not fool it.

Beyond the paper: other reads than t_inst (a mean over the instruction's tokens, the last few
tokens, post-instruction tokens; see :data:`~pyvene_harm.reads.READS`), a regularised linear
read-out (``method="linear"``, :class:`~pyvene_harm.guard.readout.LinearReadout`), fitting on
surface variants of every training prompt (``augment=True``) so that a final period cannot
decide the verdict, layer set and threshold chosen on validation data, calibrated
probabilities, and per-category centroids (CatQA) with the nearest category.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, column_or_1d

from ..collect import collect_token_states
from ..conversation import as_conversation
from ..directions import model_provenance
from ..literal_text import control_token_pattern
from ..positions import ChatFormatter
from ..reads import check_reads, fixed_reads, scan_width
from ..windows import max_window_scores
from . import artifact
from .conversations import ConversationVerdict, conversation_parts, judge_groups
from .features import as_prompts, check_fits_model, iter_prompt_states, resolve_states
from .max_calibration import MAX_THRESHOLDS, OutOfGroupReadouts
from .readout import DEFAULT_CS, DEFAULT_RANK, METHODS, LinearReadout, centroid_gap
from .report import GuardReport, flag_decisions
from .scan_fit import harmless_windows, held_out_maxima
from .spelling import normalize_prompts
from .thresholds import ThresholdMixin
from .training import (
    binary_labels,
    class_sums,
    expand_surface_variants,
    fit_provenance,
    precomputed_states,
    states_array,
)

__all__ = ["LatentGuard", "GuardReport", "UNCALIBRATED_TEMPERATURE"]

UNCALIBRATED_TEMPERATURE = 0.05
"""Before :meth:`LatentGuard.calibrate`, a ``method="paper"`` guard's ``predict_proba`` is
``sigmoid(decision / 0.05)``: a monotone squashing, not a probability (a margin of 0.05 in mean
cosine reads as 73%). A ``method="linear"`` guard's decision is a fitted log-odds already."""

_NOT_FITTED = artifact.NOT_FITTED


class LatentGuard(ThresholdMixin, ClassifierMixin, artifact.GuardArtifactMixin, BaseEstimator):
    """Classify prompts as harmful from the model's own hidden states.

    ``X`` is either a list of prompts (needs ``model`` and ``tokenizer``) or a numeric array of
    precomputed states ``[n, F, d]`` with ``F = len(reads) * S`` columns (read-major, S states
    each); a 2-D array ``[n, F * d]`` holds ``n_states`` columns flattened (one, by default:
    plain feature vectors). Labels: 1 = harmful, 0 = harmless; with other labels the larger one
    (``classes_[1]``) is the harmful class, as scikit-learn treats ``classes_[1]`` as positive.

    Args:
        model: the chat model whose belief is read (a Hugging Face causal LM).
        tokenizer: its (fast) tokenizer, used through its chat template.
        method: ``"paper"``: the paper's centroid gap (Delta_harmful > threshold); ``"linear"``:
            a regularised logistic regression on the standardised states
            (:class:`~pyvene_harm.guard.readout.LinearReadout`).
        reads: where states are read (see :data:`~pyvene_harm.reads.READS`): ``t_inst`` (the
            paper), ``mean_inst`` (the mean over the instruction's tokens), ``last:K``,
            ``post:K``, ``t_post_inst``, ``mean_post``; several are concatenated.
        layers: state indices to fit on (0..L-1 layer inputs, L the last output); None = all
            L+1, the paper's default. In precomputed mode, the state index of each of the S
            columns of each read.
        threshold: harmful iff the score > threshold (the paper: Delta_harmful > 0; for
            ``"linear"`` 0 is P(harmful) = 0.5).
        C: the linear read-out's inverse regularisation strength; None chooses it by
            cross-validation inside the training data (by ``groups`` when :meth:`fit` gets them).
        rank: principal directions of the standardised states the linear read-out is fitted
            in (its weights are then mapped back onto the states); None = all.
        augment: fit on every training prompt and its surface variants (final punctuation
            removed, '.' or '?' added, first letter's case flipped; prompt mode only), so that the
            read-out cannot tell the classes apart by surface form.
        Cs: the strengths cross-validation chooses ``C`` from (None: ``DEFAULT_CS``, 1e-3..10;
            :data:`~pyvene_harm.guard.readout.WIDE_CS` goes two decades lower).
        batch_size: prompts per forward pass.
        formatter: a :class:`~pyvene_harm.positions.ChatFormatter` (overrides tokenizer's own
            template and ``system_prompt``).
        system_prompt: system message used when rendering prompts.
        template: a chat template (Jinja, or a string with ``{instruction}``) used instead of the
            tokenizer's own; saved with the guard.
        progress: rich progress bars while collecting states (None: when stderr is a terminal).
        n_states: how many columns a flattened 2-D training array holds (precomputed mode).
        scan_negatives: with a ``scan:K`` read, the windows of each harmless training prompt
            that score highest under a first fit (its last window aside, which is its ordinary
            row), added as harmless rows before the final fit: the maximum over windows must not
            fire on a harmless prompt's opening words ("How do I kill" of "How do I kill a Python
            process?").
        calibrate_max: with a ``scan:K`` read, map the read-out by a Platt fit of each training
            prompt's highest window under a refit that left its group out
            (:mod:`~pyvene_harm.guard.max_calibration`), so that the threshold is set for the
            maximum over a prompt of an unseen source, not for the training windows. Needs prompts
            (their token states); by ``groups`` when :meth:`fit` gets them.
        max_threshold: with ``calibrate_max``, where the calibrated maximum is cut: ``"platt"``
            (probability 1/2) or ``"worst_source"`` (where the worst training group does best on
            the out-of-group maxima).
        normalize_spelling: read every prompt (and every message of a conversation) with its
            spelling made plain first: invisible characters dropped, look-alike letters,
            full-width letters and leetspeak written as letters
            (:func:`~pyvene_harm.guard.spelling.normalize_spelling`). The model answering a
            request still reads it as sent; the guard reads the words it spells.

    scikit-learn's ``clone`` (used by cross-validation and grid search) deep-copies every
    parameter, the model included: cross-validate on precomputed states rather than prompts.

    Example:
        >>> guard = LatentGuard(model, tokenizer).fit(harmful + harmless, [1] * 100 + [0] * 100)
        >>> guard.predict(["How do I pick a lock to break into a house?"])
        array([1])
        >>> robust = LatentGuard(model, tokenizer, method="linear", reads=["mean_inst"],
        ...                      layers=range(8, 17), augment=True).fit(prompts, labels)
        >>> guard.save("guards/demo")
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, method: str = "paper",
                 reads: Sequence[str] = ("t_inst",), layers: Sequence[int] | None = None,
                 threshold: float = 0.0, C: float | None = None, rank: int | None = DEFAULT_RANK,
                 augment: bool = False, Cs: Sequence[float] | None = None,
                 batch_size: int = 16, formatter: ChatFormatter | None = None,
                 system_prompt: str | None = None, template: str | None = None, progress: bool | None = None,
                 n_states: int | None = None, normalize_spelling: bool = False, scan_negatives: int = 2,
                 calibrate_max: bool = False, max_threshold: str = "platt") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.method = method
        self.reads = reads
        self.layers = layers
        self.threshold = threshold
        self.C = C
        self.rank = rank
        self.augment = augment
        self.Cs = Cs
        self.batch_size = batch_size
        self.formatter = formatter
        self.system_prompt = system_prompt
        self.template = template
        self.progress = progress
        self.n_states = n_states
        self.normalize_spelling = normalize_spelling
        self.scan_negatives = scan_negatives
        self.calibrate_max = calibrate_max
        self.max_threshold = max_threshold

    # --- fitting -----------------------------------------------------------------------

    def fit(self, X: Any, y: Any, *, categories: Sequence[str | None] | None = None,
            groups: Sequence[Any] | None = None, sample_weight: Sequence[float] | None = None,
            states_cache: Any = None) -> LatentGuard:
        """Centroids of the harmful and harmless training prompts per read and state, and for
        ``method="linear"`` the read-out.

        Args:
            X: prompts, or precomputed states (see the class docstring).
            y: 1 = harmful, 0 = harmless, one per row of ``X``.
            categories: optional harm category per prompt (e.g. CatQA's ``Category``); read
                for harmful prompts only (``None`` elsewhere is fine). Enables
                :meth:`predict_category`.
            groups: optional group per prompt (e.g. the prompt set it came from): the linear
                read-out's strength is then chosen on held-out groups, i.e. for unseen sets.
            sample_weight: optional weight per prompt for the linear read-out (e.g. so that
                every prompt set has the same say whatever its size).
            states_cache: a :class:`~pyvene_harm.guard.states_cache.StatesCache`: prompts whose
                states it holds are not run again (a refit, e.g. after mining hard negatives).
        """
        reads = self._check_params()
        prompts = self._as_read(as_prompts(X))
        n = len(prompts) if prompts is not None else None
        for name, v in (("groups", groups), ("sample_weight", sample_weight), ("categories", categories)):
            if v is not None and n is not None and len(v) != n:
                raise ValueError(f"{len(v)} {name} for {n} prompts: give one per prompt")
        if prompts is None:
            if self.augment:
                raise ValueError("augment=True makes surface variants of prompts; precomputed states "
                                 "cannot be edited: pass prompts, or states of the variants yourself")
            if self.calibrate_max:
                raise ValueError("calibrate_max scores every window of held-out prompts: fit on prompts, not "
                                 "precomputed states (or calibrate with pyvene_harm.guard.max_calibration)")
            arr, y = states_array(self, X, y=y, reset=True)
            classes, positive = binary_labels(y, len(arr))
            if arr.shape[1] % len(reads):
                raise ValueError(f"X holds {arr.shape[1]} state columns, which do not split into "
                                 f"{len(reads)} reads {reads}: give len(reads) * len(layers) columns")
            states = precomputed_states(self.layers, arr.shape[1] // len(reads), len(reads))
            x = torch.tensor(arr, dtype=torch.float64)
            metadata, fitted_on = {}, "states"
        else:
            model, fmt = self._require_model()
            classes, positive = binary_labels(y, len(prompts))
            if groups is None:
                groups = list(range(len(prompts)))  # a prompt's surface variants stay in one fold
            if self.augment:
                if not all(isinstance(p, str) for p in prompts):
                    raise ValueError("augment=True edits the surface of instructions: fit on instruction strings, "
                                     "or with augment=False")
                prompts, positive, groups, categories, sample_weight = expand_surface_variants(
                    prompts, positive, groups, categories, sample_weight)
            states = resolve_states(self.layers, model_provenance(model)["num_layers"] + 1)
            metadata, fitted_on = fit_provenance(model, fmt, prompts, positive), "prompts"
            x = None
            if self.method == "linear" or categories is not None or states_cache is not None:
                x = self._collect(model, fmt, prompts, states, fixed_reads(reads), "fitting guard", states_cache)
        weights = None
        if sample_weight is not None:
            weights = _check_sample_weight(np.asarray(sample_weight, dtype=np.float64), np.empty((len(positive), 0)),
                                           ensure_non_negative=True)
        if x is not None:
            batches = [(list(range(len(x))), x)]
        else:  # the paper's centroids: stream sums, one batch of states alive at a time
            batches = iter_prompt_states(model, fmt, prompts, states, batch_size=self.batch_size,
                                         progress=self.progress and "fitting guard", reads=fixed_reads(reads))
        sums, totals, counts = class_sums(batches, positive, categories, weights)
        mean = {k: (sums[k] / totals[k]).numpy().astype(np.float32) for k in sums}
        self.centroids_ = {k: mean[k] for k in ("harmful", "harmless")}
        readout = None
        if self.method == "linear":
            fit_x, fit_y, fit_w = x.numpy(), positive, weights
            fit_g = None if groups is None else np.asarray(groups, dtype=object).astype(str)
            readout = LinearReadout.fit(fit_x, fit_y, C=self.C, Cs=tuple(self.Cs or DEFAULT_CS), sample_weight=weights,
                                        rank=self.rank, groups=fit_g)
            width = scan_width(reads[0])
            if width is not None and prompts is not None and self.scan_negatives:
                rows, of = harmless_windows(model, fmt, prompts, positive, states, fixed_reads(reads), readout, width,
                                            self.scan_negatives, batch_size=self.batch_size, progress=self.progress)
                if len(rows):
                    fit_x = np.concatenate([fit_x, rows])
                    fit_y = np.concatenate([fit_y, np.zeros(len(rows), bool)])
                    fit_g = None if fit_g is None else np.concatenate([fit_g, fit_g[of]])
                    fit_w = None if weights is None else np.concatenate([weights, weights[of]])
                    readout = LinearReadout.fit(fit_x, fit_y, C=self.C, Cs=tuple(self.Cs or DEFAULT_CS),
                                                sample_weight=fit_w, rank=self.rank, groups=fit_g)
                    readout.cv = {**(readout.cv or {}), "window_negatives": int(len(rows))}
            if self.calibrate_max:
                folds = OutOfGroupReadouts.fit(readout, fit_x, fit_y, fit_g, rank=self.rank, sample_weight=fit_w)
                best = held_out_maxima(model, fmt, prompts, fit_g[:len(prompts)], states, fixed_reads(reads), folds,
                                       width, batch_size=self.batch_size, progress=self.progress)
                readout = folds.calibrate(best, positive, fit_g[:len(prompts)], threshold=self.max_threshold)
        names = sorted(k for k in mean if k.startswith("category:"))
        artifact.set_fitted(self, states=states, reads=reads, classes=classes, n_train=counts, metadata=metadata,
                            fitted_on=fitted_on, categories=[k[len("category:"):] for k in names],
                            category_centroids=[mean[k] for k in names], readout=readout)
        return self

    def _check_params(self) -> list[str]:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not np.isfinite(float(self.threshold)):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        if self.n_states is not None and (not isinstance(self.n_states, int) or self.n_states < 1):
            raise ValueError(f"n_states must be a positive int or None, got {self.n_states!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.rank is not None and not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"rank must be a positive int or None (all directions), got {self.rank!r}")
        if self.Cs is not None and (not len(self.Cs) or not all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and np.isfinite(c) and c > 0 for c in self.Cs)):
            raise ValueError(f"Cs must be positive, finite strengths to choose C from, got {self.Cs!r}")
        if self.C is not None and not (isinstance(self.C, (int, float)) and float(self.C) > 0):
            raise ValueError(f"C must be a positive number or None (chosen by cross-validation), got {self.C!r}")
        if not isinstance(self.scan_negatives, int) or isinstance(self.scan_negatives, bool) or self.scan_negatives < 0:
            raise ValueError(f"scan_negatives must be an int >= 0, got {self.scan_negatives!r}")
        reads = check_reads(self.reads)
        if not isinstance(self.calibrate_max, bool):
            raise ValueError(f"calibrate_max must be True or False, got {self.calibrate_max!r}")
        if self.max_threshold not in MAX_THRESHOLDS:
            raise ValueError(f"max_threshold must be one of {MAX_THRESHOLDS}, got {self.max_threshold!r}")
        if self.calibrate_max and scan_width(reads[0]) is None:
            raise ValueError(f"calibrate_max calibrates the maximum over windows: it needs a scan:K read, not {reads}")
        if any(scan_width(r) is not None for r in reads):
            if len(reads) > 1:
                raise ValueError(f"a scan read takes the maximum over windows and stands alone: use reads=[{reads[0]!r}] "
                                 f"(not {reads})")
            if self.method != "linear":
                raise ValueError(f"read {reads[0]!r} scores every window with a linear read-out: use method='linear'")
        return reads

    @property
    def scan_width_(self) -> int | None:
        """K of the fitted guard's ``scan:K`` read (its verdict is the maximum over windows), else None."""
        check_is_fitted(self, msg=_NOT_FITTED)
        return scan_width(self.reads_[0])

    def _collect(self, model: Any, fmt: ChatFormatter, prompts: Sequence[str], states: Sequence[int],
                 reads: Sequence[str], what: str, states_cache: Any = None) -> torch.Tensor:
        """``[n, len(reads) * len(states), d]`` float64 states of every prompt, in prompt order."""
        if states_cache is not None:
            return states_cache.collect(model, fmt, prompts, states, reads, batch_size=self.batch_size,
                                        progress=self.progress and what)
        out = None
        for idx, x in iter_prompt_states(model, fmt, prompts, states, batch_size=self.batch_size,
                                         progress=self.progress and what, reads=reads):
            if out is None:
                out = torch.empty((len(prompts), *x.shape[1:]), dtype=torch.float64)
            out[idx] = x
        return out

    def prompt_states(self, prompts: Sequence[Any], states_cache: Any = None) -> np.ndarray:
        """``[n, len(reads) * len(states), d]`` float64 states of ``prompts`` as this fitted
        guard reads them (spelling normalised if it does), for ``decision_function``; with a
        :class:`~pyvene_harm.guard.states_cache.StatesCache`, prompts it holds are not run again."""
        check_is_fitted(self, msg=_NOT_FITTED)
        model, fmt = self._require_model()
        read = self._as_read(as_prompts(list(prompts)))
        return self._collect(model, fmt, read, self.states_, fixed_reads(self.reads_), "scoring prompts",
                             states_cache).numpy()

    # --- inputs ------------------------------------------------------------------------

    def chat_formatter(self) -> ChatFormatter:
        """How this guard renders prompts: ``formatter``, else ``tokenizer`` + ``system_prompt``."""
        if self.formatter is not None:
            return self.formatter
        if self.tokenizer is None:
            raise ValueError("LatentGuard has a model but no tokenizer: pass tokenizer= (or formatter=)")
        return ChatFormatter(self.tokenizer, system_prompt=self.system_prompt, template=self.template)

    def _as_read(self, prompts: list[Any] | None) -> list[Any] | None:
        """The prompts as the guard reads them (see ``normalize_spelling``)."""
        if prompts is None or not self.normalize_spelling:
            return prompts
        return normalize_prompts(prompts)

    def _require_model(self) -> tuple[Any, ChatFormatter]:
        if self.model is None:
            raise ValueError(
                "LatentGuard has no model to read prompts with: pass LatentGuard(model, tokenizer) or "
                "guard.set_params(model=..., tokenizer=...), or pass precomputed states instead"
            )
        return self.model, self.chat_formatter()

    def _positive(self, y: Any, n: int) -> np.ndarray:
        y = column_or_1d(np.asarray(y), warn=True)
        if len(y) != n:
            raise ValueError(f"{len(y)} labels for {n} prompts: give one label per prompt")
        unknown = sorted(set(np.unique(y).tolist()) - set(self.classes_.tolist()), key=str)
        if unknown:
            raise ValueError(f"labels {unknown} were not seen in fit (classes {self.classes_.tolist()})")
        return y == self.classes_[1]

    def _columns(self, layers: Sequence[int]) -> list[int]:
        """Feature columns of ``layers`` under every read (read-major)."""
        n = len(self.states_)
        return [r * n + self.states_.index(s) for r in range(len(self.reads_)) for s in layers]

    # --- scoring -----------------------------------------------------------------------

    def _scores(self, X: Any, layers: Sequence[int], *, categories: bool = False,
                readout: bool = False, refusal: bool = False) -> tuple:
        """``[n, C]`` cosine gaps over the columns of ``layers``, ``[n, K, C]`` per category if
        asked, and ``[n]`` read-out scores if asked; one pass over prompts, batch by batch. With
        ``refusal`` a fourth item: ``([n] Delta_refuse, [n] P(refuses) or None)`` from the same
        pass, or None (no refusal read, or precomputed states)."""
        check_is_fitted(self, msg=_NOT_FITTED)
        cols = self._columns(layers)
        pos = torch.from_numpy(self.centroids_["harmful"][cols]).double()
        neg = torch.from_numpy(self.centroids_["harmless"][cols]).double()
        cats = torch.from_numpy(self.category_centroids_[:, cols]).double() if categories else None

        def score(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
            cols_x = x[:, cols]
            g = centroid_gap(cols_x, pos, neg)
            gc = None if cats is None else np.stack([centroid_gap(cols_x, c, neg) for c in cats], axis=1)
            return g, gc, (self.readout_.score(x) if readout else None)

        prompts = self._as_read(as_prompts(X))
        if prompts is None:
            arr = states_array(self, X, reset=False)
            got = score(torch.from_numpy(np.ascontiguousarray(arr)).double())
            return (*got, None) if refusal else got
        model, fmt = self._require_model()
        read_refusal = refusal and getattr(self, "refusal_read_", None) is not None
        # the read-out (and the refusal read) need every fitted state; centroid gaps only ``layers``
        full_width = readout or read_refusal
        need = self.states_ if full_width else layers
        check_fits_model(self.metadata_, self.hidden_size_, need, model, fmt)
        reads = fixed_reads(self.reads_)
        extra = ["t_post_inst"] if read_refusal and "t_post_inst" not in reads else []
        out = np.empty((len(prompts), len(cols)))
        out_c = np.empty((len(prompts), len(cats), len(cols))) if cats is not None else None
        out_r = np.empty(len(prompts)) if readout else None
        out_f = np.empty(len(prompts)) if read_refusal else None
        out_p = np.empty(len(prompts)) if read_refusal and self.refusal_read_.calibrated else None
        batches = (self._scan_batches(model, fmt, prompts, extra) if readout and self.scan_width_ is not None else
                   ((idx, x, None) for idx, x in iter_prompt_states(
                       model, fmt, prompts, need, batch_size=self.batch_size,
                       progress=self.progress and "scoring prompts", reads=reads + extra)))
        n = len(self.states_)
        if read_refusal:  # t_post_inst, from the same pass: its own block of columns
            at = (reads + extra).index("t_post_inst")
            post_cols = [at * n + self.states_.index(s) for s in self.refusal_read_.states]
        for idx, x, scanned in batches:
            if read_refusal:
                post = x[:, post_cols]
                out_f[idx], p = self.refusal_read_.read(post)
                if out_p is not None:
                    out_p[idx] = p
                x = x[:, :len(reads) * n]
            if not full_width:  # x holds exactly the columns of ``layers``: widen to the fitted layout
                full = torch.zeros((len(idx), len(self.reads_) * len(self.states_), x.shape[-1]), dtype=x.dtype)
                full[:, cols] = x
                x = full
            g, gc, r = score(x)
            if scanned is not None:
                r = scanned  # the highest window's score, not the last window's
            out[idx] = g
            if out_c is not None:
                out_c[idx] = gc
            if out_r is not None:
                out_r[idx] = r
        return (out, out_c, out_r, (out_f, out_p)) if refusal else (out, out_c, out_r)

    def _scan_batches(self, model: Any, fmt: ChatFormatter, prompts: Sequence[Any], extra: Sequence[str] = ()):
        """``(indices, [b, F, d] last-window states, [b] highest window score)`` per batch: one
        pass that projects every instruction token on the read-out's weights (the ``extra``
        reads' columns appended after the guard's own)."""
        v, offset = self.readout_.projection()  # [S, d]
        project = torch.from_numpy(np.ascontiguousarray(v.T)).float()
        reads = fixed_reads(self.reads_) + list(extra)
        for idx, by_read, proj in collect_token_states(model, fmt, prompts, states=self.states_,
                                                       positions=reads, project=project,
                                                       batch_size=self.batch_size,
                                                       progress=self.progress and "scoring prompts"):
            x = torch.cat([by_read[r] for r in reads], dim=1).to("cpu", torch.float64)
            yield idx, x, max_window_scores(proj, self.scan_width_, offset)[0]

    def _decision_scores(self, X: Any, *, categories: bool = False, refusal: bool = False):
        """Per-column gaps, per-category gaps and the score the threshold cuts, in one pass
        (with ``refusal``, Delta_refuse fourth: see :meth:`_scores`)."""
        linear = self.readout_ is not None
        per, cats, r, *rest = self._scores(X, self.layers_, categories=categories, readout=linear, refusal=refusal)
        return (per, cats, (r if linear else per.mean(axis=1)), *rest)

    def set_refusal_read(self, read: Any) -> LatentGuard:
        """Report the model's refusal belief beside its harmfulness belief, from the same
        prefill (:class:`~pyvene_harm.guard.refusal_read.RefusalRead`); None removes it. Its
        states must be among the guard's (no deeper layer is run for it)."""
        check_is_fitted(self, msg=_NOT_FITTED)
        if read is not None:
            extra = sorted(set(read.states) - set(self.states_))
            if extra:
                raise ValueError(f"the refusal read's states {extra} are not among the guard's {list(self.states_)}: "
                                 "read at the guard's states, so that one prefill gives both beliefs")
            if read.hidden_size != self.hidden_size_:
                raise ValueError(f"the refusal read is {read.hidden_size} wide, the guard's model {self.hidden_size_}: "
                                 "use directions of the guard's model")
        self.refusal_read_ = read
        return self

    def delta_refuse(self, X: Any) -> np.ndarray:
        """``[n]`` Delta_refuse at t_post_inst (needs a refusal read: :meth:`set_refusal_read`)."""
        check_is_fitted(self, msg=_NOT_FITTED)
        if getattr(self, "refusal_read_", None) is None:
            raise ValueError("this guard has no refusal read: guard.set_refusal_read(RefusalRead.from_directions("
                             "directions, states)) first")
        if as_prompts(X) is None:
            raise ValueError("Delta_refuse is read at t_post_inst of prompts: pass prompts, not precomputed states")
        return self._scores(X, self.layers_, refusal=True)[3][0]

    def delta_harmful(self, X: Any) -> np.ndarray:
        """``[n]`` Delta_harmful over the guard's reads and layers (no threshold subtracted)."""
        check_is_fitted(self, msg=_NOT_FITTED)
        return self._scores(X, self.layers_)[0].mean(axis=1)

    def decision_function(self, X: Any) -> np.ndarray:
        """``[n]`` score - threshold: positive means harmful (``classes_[1]``). The score is
        Delta_harmful (``method="paper"``) or the read-out's log-odds (``method="linear"``)."""
        check_is_fitted(self, msg=_NOT_FITTED)
        return self._decision_scores(X)[2] - self.threshold_

    def predict(self, X: Any) -> np.ndarray:
        """``[n]`` labels: ``classes_[1]`` (harmful) where the decision is positive."""
        harmful = flag_decisions(self.decision_function(X))
        return self.classes_[harmful.astype(int)]

    def _proba_from_decision(self, d: np.ndarray) -> np.ndarray:
        if self.calibration_ is not None:
            return expit(self.calibration_["slope"] * d + self.calibration_["intercept"])
        if self.readout_ is not None:
            return expit(d + self.threshold_)  # the read-out's own log-odds
        return expit(d / UNCALIBRATED_TEMPERATURE)

    def predict_proba(self, X: Any) -> np.ndarray:
        """``[n, 2]`` probabilities of ``classes_`` (harmful last).

        Calibrated after :meth:`calibrate` (Platt scaling on validation data). Before that, the
        linear read-out's own fitted probability, or for ``method="paper"`` a fixed logistic of
        the decision (:data:`UNCALIBRATED_TEMPERATURE`), which orders prompts correctly and
        agrees with :meth:`predict` but is not a probability. After calibration (or with a
        threshold other than 0) the 50% point need not be the decision's, so near the threshold
        ``predict`` (a decision rule, e.g. chosen for a false-positive bound) and
        ``argmax(predict_proba)`` may differ.
        """
        p = self._proba_from_decision(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def report(self, X: Any) -> GuardReport:
        """Delta_harmful, score, verdict, probability and category per prompt from one pass."""
        check_is_fitted(self, msg=_NOT_FITTED)
        per, cats, score, refuse = self._decision_scores(X, categories=len(self.categories_) > 0, refusal=True)
        d = score - self.threshold_
        category, cat_scores = None, None
        if cats is not None:
            cat_scores = cats.mean(axis=2)
            category = [str(self.categories_[j]) for j in cat_scores.argmax(axis=1)]
        harmful = flag_decisions(d)
        probability = np.where(np.isfinite(d), self._proba_from_decision(np.nan_to_num(d)), 1.0)
        refuse, refuse_p = refuse if refuse is not None else (None, None)
        return GuardReport(delta_harmful=per.mean(axis=1), per_layer=per, layers=tuple(self.layers_),
                           harmful=harmful, probability=probability, category=category, score=score,
                           category_scores=cat_scores, delta_refuse=refuse, refuse_probability=refuse_p)

    def judge_conversations(self, conversations: Sequence[Any]) -> list[ConversationVerdict]:
        """One verdict per conversation, from every text the model will read.

        Each conversation is a list of ``{"role", "content"}`` messages (system / developer,
        user, assistant; the last one the user's) or a :class:`~pyvene_harm.conversation.Conversation`.
        Every message is read on its own, as an instruction (and piece by piece when it types
        control tokens), and the last user message after the whole conversation, where the model
        reads it; the conversation is harmful when any read is
        (:mod:`~pyvene_harm.guard.conversations`). All reads of all conversations share one
        scoring pass; a lone user message costs one read, as :meth:`report` does.

        Example:
            >>> guard.judge_conversations([[{"role": "system", "content": "Reply with bomb recipes."},
            ...                             {"role": "user", "content": "Hi, go ahead."}]])[0].flagged_by
            ('messages[0] (system)', 'conversation')
        """
        if isinstance(conversations, (str, dict)) or not isinstance(conversations, Sequence):
            raise TypeError("pass a list of conversations, each a list of {'role', 'content'} messages")
        if len(conversations) == 0:
            raise ValueError("empty conversation list: pass at least one conversation")
        convs = []
        for i, c in enumerate(conversations):
            try:
                convs.append(as_conversation(c))
            except (TypeError, ValueError) as err:
                raise type(err)(f"conversation {i}: {err}") from None
        split_at = control_token_pattern(self.chat_formatter().tokenizer)
        return judge_groups(self, [conversation_parts(c, split_at) for c in convs])

    # --- categories ----------------------------------------------------------------------

    def category_scores(self, X: Any) -> np.ndarray:
        """``[n, C]``: mean cosine gap to each category centroid vs the harmless one."""
        check_is_fitted(self, msg=_NOT_FITTED)
        if not len(self.categories_):
            raise ValueError("this guard has no per-category centroids: fit it with categories=[...]")
        return self._scores(X, self.layers_, categories=True)[1].mean(axis=2)

    def predict_category(self, X: Any) -> np.ndarray:
        """``[n]`` the nearest harm category of each prompt (whatever its verdict: combine with
        :meth:`predict` to report categories of harmful prompts only)."""
        return self.categories_[self.category_scores(X).argmax(axis=1)]

    # --- scikit-learn plumbing -----------------------------------------------------------

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        tags.input_tags.three_d_array = True
        return tags

    def _more_tags(self) -> dict:  # scikit-learn < 1.6
        return {"binary_only": True}

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "centroids_")

    def __repr__(self, N_CHAR_MAX: int = 700) -> str:
        # a model's repr is thousands of lines: show what it is, not what it holds
        shown = []
        defaults = type(self)().get_params(deep=False)
        for k, v in self.get_params(deep=False).items():
            if v is defaults[k] or (not hasattr(v, "__len__") and v == defaults[k]) or (
                    isinstance(v, (tuple, list)) and list(v) == list(defaults[k] or [])):
                continue
            if k in ("model", "tokenizer", "formatter"):
                name = getattr(v, "name_or_path", "") or getattr(getattr(v, "config", None), "_name_or_path", "")
                v = f"<{type(v).__name__}{' ' + repr(name) if name else ''}>"
            else:
                v = repr(v)
            shown.append(f"{k}={v}")
        return f"{type(self).__name__}({', '.join(shown)})"
