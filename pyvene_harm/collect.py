"""Streaming activation statistics at chat positions, collected through pyvene.

For every layer l the residual stream entering decoder layer l (pyvene ``block_input``) is read,
plus the last layer's output before the final norm (``block_output``): L+1 states, as in the
paper. Per group, state index and position we keep float64 sums and a count, so memory does not
grow with the number of prompts, and two results over disjoint prompt sets add up exactly to one
result over their union (``stats_a + stats_b``): extraction can be split across processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import fingerprint
from .decoder_depth import (
    decoder_of,
    drop_unread_layers,
    layers_to_run,
    mark_full_depth,
    truncated_decoder,
)
from .distributed import active, exchange_batches
from .positions import ChatFormatter, EncodedPrompt
from .progress import progress_bar
from .pyvene_support import (
    HarmIntervenableModel,
    PoolCollector,
    ScanCollector,
    decoder_layers,
)
from .reads import READS, check_reads, fixed_reads, read_span, scan_width
from .shared_prefix import MIN_SHARED_PREFIX, SharedPrefix

# decoder_depth's, reads' and shared_prefix's names stay importable from here, where they were first defined
__all__ = [
    "MIN_SHARED_PREFIX",
    "SharedPrefix",
    "ActivationStats",
    "collect_stats",
    "drop_unread_layers",
    "mark_full_depth",
    "collect_states",
    "collect_token_states",
    "fixed_reads",
    "decoder_of",
    "READS",
    "check_reads",
    "layers_to_run",
    "read_span",
    "scan_width",
    "truncated_decoder",
]

BASE_POSITIONS = ("t_inst", "t_post_inst")


@dataclass
class ActivationStats:
    """Float64 sums and counts of hidden states per group, position and state index.

    ``sums[group][position]`` has shape ``[n_states, hidden]`` where state ``l < L`` is the
    input of decoder layer ``l`` and state ``L`` the last layer's output.
    ``states[group][position]``, when kept, has shape ``[n_prompts, len(kept_layers), hidden]``
    in float32, in the order the prompts were given.
    """

    sums: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    kept_layers: tuple[int, ...] = ()
    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        return sorted(self.counts)

    @property
    def positions(self) -> list[str]:
        first = next(iter(self.sums.values()), {})
        return list(first)

    @property
    def n_states(self) -> int:
        for by_pos in self.sums.values():
            for t in by_pos.values():
                return int(t.shape[0])
        return 0

    def mean(self, group: str, position: str) -> torch.Tensor:
        """Centroid ``[n_states, hidden]`` (float64) of one group at one position."""
        if group not in self.counts:
            raise KeyError(f"no prompts in group {group!r}; groups collected: {self.groups}")
        if self.counts[group] == 0:
            raise ValueError(f"group {group!r} is empty")
        return self.sums[group][position] / self.counts[group]

    def __add__(self, other: ActivationStats) -> ActivationStats:
        if not isinstance(other, ActivationStats):
            return NotImplemented
        if self.sums and other.sums and (
            self.n_states != other.n_states or set(self.positions) != set(other.positions)
        ):
            raise ValueError(
                "cannot merge statistics collected with different layers or positions: "
                f"{self.n_states} states {self.positions} vs {other.n_states} states {other.positions}"
            )
        if self.states and other.states and self.kept_layers != other.kept_layers:
            raise ValueError("cannot merge per-prompt states kept at different layers")
        out = ActivationStats(kept_layers=self.kept_layers or other.kept_layers)
        for src in (self, other):
            for g, by_pos in src.sums.items():
                dst = out.sums.setdefault(g, {})
                for p, t in by_pos.items():
                    dst[p] = dst[p] + t if p in dst else t.clone()
                out.counts[g] = out.counts.get(g, 0) + src.counts[g]
            for g, by_pos in src.states.items():
                dst = out.states.setdefault(g, {})
                for p, t in by_pos.items():
                    dst[p] = torch.cat([dst[p], t]) if p in dst else t.clone()
        return out

    def __radd__(self, other: object) -> ActivationStats:
        # sum([a, b, c]) starts from 0
        if other == 0:
            return self
        return NotImplemented

    @classmethod
    def merge(cls, parts: Sequence[ActivationStats]) -> ActivationStats:
        """One result from many (e.g. one per process or GPU)."""
        out = cls()
        for part in parts:
            out = out + part
        return out

    def _accumulate(self, group: str, position: str, x: torch.Tensor) -> None:
        """Add a batch ``[n, n_states, hidden]`` of states to the running sums."""
        by_pos = self.sums.setdefault(group, {})
        s = x.to(torch.float64).sum(0).cpu()
        by_pos[position] = by_pos[position] + s if position in by_pos else s


def _pool_weights(starts: torch.Tensor, ends: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``[b, reads, hi - lo]``: each read's span as an average over columns ``lo .. hi - 1``."""
    cols = torch.arange(lo, hi, device=starts.device)[None, None]
    w = ((cols >= starts[..., None]) & (cols <= ends[..., None])).float()
    return w / w.sum(-1, keepdim=True)


def _representations(n_layers: int, states: Sequence[int], collector: type = PoolCollector) -> list[dict]:
    """State s < n_layers is the input of layer s; state n_layers the output of the last layer run."""
    reps = []
    for s in states:
        if s < n_layers:
            reps.append({"layer": s, "component": "block_input", "intervention_type": collector})
        else:
            reps.append({"layer": n_layers - 1, "component": "block_output",
                         "intervention_type": collector})
    return reps


def _length_sorted(n: int, lengths: Sequence[int]) -> list[int]:
    # similar lengths in a batch waste less compute on padding; stable for determinism
    return sorted(range(n), key=lambda i: lengths[i])


def _plan(model: nn.Module, formatter: ChatFormatter, prompts: Sequence[str], states: Sequence[int] | None,
          positions: Sequence[str], batch_size: int, post_instruction: bool, wrapper: str | None):
    """Checked arguments, the prompts tokenised once and their length-sorted batches."""
    if len(prompts) == 0:
        raise ValueError("no prompts to collect from: pass at least one prompt")
    positions = check_reads(positions)
    decoder = decoder_of(model)
    n_layers = len(decoder_layers(decoder))
    state_ids = list(range(n_layers + 1)) if states is None else sorted(set(int(s) for s in states))
    bad = [s for s in state_ids if not 0 <= s <= n_layers]
    if bad:
        raise ValueError(
            f"state {bad[0]} is out of range: this model has {n_layers} decoder layers, "
            f"so states 0-{n_layers} (0-{n_layers - 1} layer inputs, {n_layers} last output)"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    run_layers = layers_to_run(n_layers, state_ids)
    device = next(decoder.parameters()).device
    # tokenise everything once, in one call, so batches can be formed from similar lengths
    encoded = formatter.tokenize(prompts, post_instruction=post_instruction, wrapper=wrapper)
    order = _length_sorted(len(prompts), [len(e.ids) for e in encoded])
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return decoder, state_ids, run_layers, device, encoded, batches, positions


def collect_token_states(
    model: nn.Module,
    formatter: ChatFormatter,
    prompts: Sequence[str],
    *,
    states: Sequence[int] | None = None,
    positions: Sequence[str] = ("t_inst",),
    project: torch.Tensor | None = None,
    batch_size: int = 16,
    share_prefix: bool = True,
    progress: bool | str = False,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], list[torch.Tensor]]]:
    """:func:`collect_states`, plus every instruction token of every prompt, from the same pass.

    Yields ``(prompt indices, {read: [b, len(states), hidden]}, tokens)`` where ``tokens[j]`` is
    ``[T_j, len(states), hidden]`` (float32): the states at each of prompt ``idx[j]``'s T_j
    instruction tokens (for a conversation, its last user message's). With ``project``
    (``[hidden, len(states)]``) ``tokens[j]`` is ``[T_j]`` float64 instead: at each token, the sum
    over states s of its state s projected on ``project[:, s]``, which is all a linear read-out
    needs to score every window along the instruction (:mod:`~pyvene_harm.windows`), at a cost
    and memory that grow with the prompt's length, not with its length times the width.

    Runs in this process whatever :func:`~pyvene_harm.distributed.data_parallel` says (every
    rank that calls it computes all prompts).
    """
    decoder, state_ids, run_layers, device, encoded, batches, positions = _plan(
        model, formatter, prompts, states, positions, batch_size, True, None)
    if project is not None and tuple(project.shape[1:]) != (len(state_ids),):
        raise ValueError(f"project must be [hidden, {len(state_ids)}] (one vector per state), "
                         f"got {tuple(project.shape)}")
    yield from _run_batches(decoder, formatter, encoded, batches, state_ids=state_ids, run_layers=run_layers,
                            positions=positions, share_prefix=share_prefix, device=device, progress=progress,
                            scan=("project" if project is not None else "tokens", project))


def collect_states(
    model: nn.Module,
    formatter: ChatFormatter,
    prompts: Sequence[str],
    *,
    states: Sequence[int] | None = None,
    positions: Sequence[str] = BASE_POSITIONS,
    batch_size: int = 16,
    post_instruction: bool = True,
    wrapper: str | None = None,
    share_prefix: bool = True,
    progress: bool | str | None = None,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield ``(prompt indices, {read: [b, len(states), hidden]})`` batch by batch.

    ``positions`` names the reads (:data:`READS`): single tokens such as ``t_inst``, or means
    over spans such as ``mean_inst``; all come from one forward pass.

    The low-level generator under :func:`collect_stats` and the guard: one pyvene forward per
    batch on the bare decoder, stopping after the deepest state asked for, running no token
    after the last position read and, with ``share_prefix``, the template prefix that all
    prompts share (system prompt, user header) only once (:class:`SharedPrefix`).

    Inside :func:`~pyvene_harm.distributed.data_parallel` each rank runs every
    ``world_size``-th batch of the same batches and receives the others': every rank yields
    the same states, in the same order, as one process.
    """
    plan = _plan(model, formatter, prompts, states, positions, batch_size, post_instruction, wrapper)
    decoder, state_ids, run_layers, device, encoded, batches, positions = plan
    dp = active()
    if dp is None:
        for idx, by_pos, _ in _run_batches(decoder, formatter, encoded, batches, state_ids=state_ids,
                                           run_layers=run_layers, positions=positions, share_prefix=share_prefix,
                                           device=device, progress=progress):
            yield idx, by_pos
        return
    # this rank's batches, then everyone's in order; the shared prefix still comes from all prompts
    own = ((idx, by_pos) for idx, by_pos, _ in _run_batches(
        decoder, formatter, encoded, dp.own(batches), state_ids=state_ids, run_layers=run_layers,
        positions=positions, share_prefix=share_prefix, device=device, progress=False))
    key = fingerprint([*prompts, repr((state_ids, list(positions), post_instruction, wrapper, batch_size))])
    with progress_bar(progress, total=len(prompts),
                      description=progress if isinstance(progress, str) else "collecting") as advance:
        for idx, by_pos in exchange_batches(own, batches, device=device, key=key):
            yield idx, by_pos
            advance(len(idx))


def _run_batches(decoder: nn.Module, formatter: ChatFormatter, encoded: Sequence[EncodedPrompt],
                 batches: Sequence[list[int]], *,
                 state_ids: list[int], run_layers: int, positions: Sequence[str], share_prefix: bool,
                 device: torch.device, progress: bool | str, scan: tuple[str, torch.Tensor | None] | None = None,
                 ) -> Iterator[tuple[list[int], dict[str, torch.Tensor], list[torch.Tensor] | None]]:
    """The forward passes of :func:`collect_states`, for the given batches of prompt indices.

    Yields ``(prompt indices, {read: [b, S, d]}, tokens)``. ``tokens`` is None unless ``scan``
    asks for the instruction's tokens too: ``("tokens", None)`` gives each prompt's
    ``[T_i, S, d]`` states at its T_i instruction tokens, ``("project", V)`` with ``V``
    ``[d, S]`` only ``[T_i]``: the sum over states s of each token's state s projected on
    ``V[:, s]`` (a linear read-out's score at every token, without keeping the states).
    """
    collector = PoolCollector if scan is None else ScanCollector
    with truncated_decoder(decoder, run_layers) as short:
        shared = SharedPrefix.build(short, [e.ids for e in encoded], device) if share_prefix else None
        intervenable = HarmIntervenableModel(_representations(run_layers, state_ids, collector), short)
        try:
            with progress_bar(progress, total=sum(map(len, batches)),
                              description=progress if isinstance(progress, str) else "collecting") as advance:
                for idx in batches:
                    batch = formatter.collate([encoded[i] for i in idx], padding_side="left")
                    spans = [read_span(batch, p) for p in positions]
                    if scan is not None:  # the instruction's tokens are read too: its first one bounds the window
                        spans.append((batch.inst_start, batch.t_inst))
                    locs = torch.stack([s for s, _ in spans] + [e for _, e in spans], dim=1)  # [b, 2P]
                    # causal attention: nothing after the last position read changes the states
                    # read, so the rest (e.g. the post-instruction tokens, for t_inst) is not run
                    cut = int(locs.max()) + 1
                    inputs = {k: v[:, :cut].to(device) for k, v in batch.model_inputs().items()}
                    with torch.inference_mode():
                        split = shared.split(inputs, locs.to(device)) if shared is not None else None
                        if split is not None:
                            inputs, locs = split
                        locs = locs.to(device)
                        # one window covers every read of every example; each read is a row of weights
                        lo, hi = int(locs.min()), int(inputs["input_ids"].shape[1])
                        window = [list(range(lo, hi))] * len(idx)
                        n = len(positions)
                        kwargs = {"pool_weights": _pool_weights(locs[:, :n], locs[:, len(spans):len(spans) + n],
                                                                lo, hi)}
                        if scan is not None:
                            first, last = locs[:, n] - lo, locs[:, len(spans) + n] - lo
                            cols = torch.arange(hi - lo, device=device)[None]
                            kwargs["token_mask"] = (cols >= first[:, None]) & (cols <= last[:, None])
                            if scan[1] is not None:
                                kwargs["project"] = scan[1]
                        (_, acts), _ = intervenable(
                            inputs,
                            unit_locations={"base": [window] * len(state_ids)},
                            intervention_additional_kwargs=kwargs,
                            use_cache=split is not None,
                        )
                    tokens = None
                    if scan is not None:
                        acts, tokens = unpack_scan(acts, n, hi - lo, first, last, scan[1] is not None)
                    stacked = torch.stack(list(acts), dim=2)  # [b, P, S, d], float32
                    yield idx, {p: stacked[:, j] for j, p in enumerate(positions)}, tokens
                    advance(len(idx))
        finally:
            del intervenable


def unpack_scan(acts: Sequence[torch.Tensor], n_reads: int, width: int, first: torch.Tensor, last: torch.Tensor,
                projected: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split :class:`~pyvene_harm.pyvene_support.ScanCollector` outputs (one per state) into the
    pooled reads ``[b, R, d]`` per state and, per prompt, its kept tokens: ``[T_i, S, d]`` states,
    or (``projected``) ``[T_i]`` float64, state s's projection on vector s summed over states."""
    b, total = acts[0].shape
    n_states = len(acts)
    # total = R * d + width * k, with k = d (states) or n_states (projections); R >= 1 reads
    if projected:
        k = n_states
        d = (total - width * k) // n_reads
    else:
        d = k = total // (n_reads + width)
    pooled = [a[:, :n_reads * d].reshape(b, n_reads, d) for a in acts]
    rest = [a[:, n_reads * d:].reshape(b, width, k) for a in acts]
    out: list[torch.Tensor] = []
    for i in range(b):
        sl = slice(int(first[i]), int(last[i]) + 1)
        if projected:
            out.append(sum(rest[s][i, sl, s].double() for s in range(n_states)).cpu())
        else:
            out.append(torch.stack([r[i, sl] for r in rest], dim=1).cpu())  # [T_i, S, d]
    return pooled, out


def collect_stats(
    model: nn.Module,
    formatter: ChatFormatter,
    prompts: Sequence[str],
    groups: Sequence[str] | str,
    *,
    positions: Sequence[str] = BASE_POSITIONS,
    post_inst_span: int = 0,
    keep_layers: Sequence[int] | None = None,
    batch_size: int = 16,
    post_instruction: bool = True,
    wrapper: str | None = None,
    progress: bool | str | None = None,
) -> ActivationStats:
    """Sums and counts of hidden states per group at chat positions.

    Args:
        model: a Hugging Face causal LM (or bare decoder).
        formatter: the model's :class:`ChatFormatter`.
        prompts: instructions.
        groups: one label per prompt (e.g. ``"harmful"``), or one label for all.
        positions: ``t_inst``, ``t_post_inst`` and/or ``post:K`` (K tokens after t_inst).
        post_inst_span: also collect ``post:0`` ... ``post:K`` for K < this number.
        keep_layers: also keep each prompt's states at these state indices (float32), e.g.
            for clustering plots or fitting a guard.
        batch_size: prompts per forward pass.

    Example:
        >>> stats = collect_stats(model, ChatFormatter(tok), harmful, "harmful")
        >>> stats = stats + collect_stats(model, ChatFormatter(tok), harmless, "harmless")
    """
    labels = [groups] * len(prompts) if isinstance(groups, str) else list(groups)
    if len(labels) != len(prompts):
        raise ValueError(f"{len(labels)} group labels for {len(prompts)} prompts: give one per prompt")
    positions = list(dict.fromkeys([*positions, *(f"post:{k}" for k in range(post_inst_span))]))
    kept = tuple(sorted(set(keep_layers))) if keep_layers else ()
    stats = ActivationStats(kept_layers=kept)
    for g in set(labels):
        stats.counts[g] = 0
    kept_rows: dict[int, dict[str, torch.Tensor]] = {}
    for idx, by_pos in collect_states(model, formatter, prompts, positions=positions,
                                      batch_size=batch_size, post_instruction=post_instruction,
                                      wrapper=wrapper, progress=progress):
        batch_labels = [labels[i] for i in idx]
        for g in set(batch_labels):
            rows = torch.tensor([j for j, lab in enumerate(batch_labels) if lab == g])
            for p, x in by_pos.items():
                stats._accumulate(g, p, x[rows])
            stats.counts[g] += len(rows)
        if kept:
            for j, i in enumerate(idx):
                kept_rows[i] = {p: x[j, list(kept)].cpu() for p, x in by_pos.items()}
    if kept:
        for g in set(labels):
            members = [i for i in range(len(prompts)) if labels[i] == g]
            stats.states[g] = {p: torch.stack([kept_rows[i][p] for i in members]) for p in positions}
    return stats
