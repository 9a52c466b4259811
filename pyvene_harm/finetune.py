"""Fig. 7: the fine-tuning attack, and whether it moves the model's harmfulness belief.

The paper fine-tunes a chat model on N (harmful instruction, compliant answer) pairs and finds
that it then accepts held-out harmful instructions while Delta_harmful on them barely moves:
fine-tuning breaks refusal, not the model's notion of harm. Three steps, each usable alone:

1. :func:`make_compliant_pairs` (:mod:`~pyvene_harm.finetune_data`) writes the compliant answers with the model itself, steered
   against its refusal direction (the answers the attack teaches are then the model's own);
2. :func:`lora_finetune` trains LoRA adapters (peft) on a *copy* of the model, outside pyvene,
   because wrapping a model in an ``IntervenableModel`` freezes its parameters;
3. :func:`evaluate_attack` measures acceptance (keyword judge) and both beliefs on held-out
   prompts, always with the ORIGINAL model's directions, so that before and after are read
   on the same axes.

:func:`finetune_attack` runs the whole curve for several N.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .beliefs import compute_beliefs
from .directions import DirectionSet
from .finetune_data import (
    CompliantPairs,
    SteerMethod,
    TrainingPair,
    answer_eos_id,
    make_compliant_pairs,
    training_batch,
)
from .generation import generate_replies
from .judges import KeywordRefusalJudge
from .positions import ChatFormatter
from .progress import progress_bar, progress_label

__all__ = [
    "AttackEval",
    "CompliantPairs",
    "TrainingPair",
    "default_target_modules",
    "evaluate_attack",
    "finetune_attack",
    "last_epoch_loss",
    "lora_finetune",
    "make_compliant_pairs",
    "parse_sizes",
    "training_batch",
]

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def default_target_modules(model: nn.Module) -> list[str]:
    """The attention projections (q/k/v/o_proj) this model has, for LoRA to adapt."""
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    found = [n for n in ATTENTION_PROJECTIONS if n in names]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has none of {', '.join(ATTENTION_PROJECTIONS)}: pass target_modules= "
            f"naming some of its linear layers ({', '.join(sorted(names)[:8])})"
        )
    return found


def lora_finetune(
    model: nn.Module,
    formatter: ChatFormatter,
    pairs: Sequence[TrainingPair | tuple[str, str]],
    *,
    r: int = 8,
    alpha: int = 16,
    lr: float = 2e-4,
    epochs: int = 1,
    batch_size: int = 4,
    target_modules: Sequence[str] | None = None,
    dropout: float = 0.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool | str | None = None,
) -> nn.Module:
    """LoRA fine-tuning on (prompt, answer) pairs; returns a merged, fine-tuned COPY.

    ``model`` itself is never modified (its weights, requires_grad flags and mode stay as
    they were), so one base model can be attacked with several N in turn. The copy has the
    adapters merged into its weights and is a plain model of the same class, in eval mode
    with every parameter frozen: directions and pyvene interventions made for the base model
    apply to it unchanged. Training runs in plain PyTorch, not inside pyvene, which would
    freeze the parameters. The loss covers only answer tokens (see :func:`training_batch`).
    The copy costs a second set of weights on the model's device (fine for 7-8B models in
    bf16 on one 80 GB GPU); models spread with ``device_map="auto"`` are not supported.

    Args:
        r / alpha / dropout: LoRA rank, scaling numerator and dropout.
        lr / epochs / batch_size: AdamW learning rate, passes over ``pairs``, pairs per step.
        target_modules: module names to adapt; default the attention projections present.
        seed: fixes the adapters' initialisation and the order of examples (the caller's
            global RNG state is restored afterwards).
        on_step: called as ``on_step(step, loss)`` after every optimiser step.

    Example:
        >>> tuned = lora_finetune(model, fmt, [("How do I pick a lock?", "First, ...")], epochs=2)
        >>> generate_replies(tuned, fmt, ["How do I pick a lock?"])
    """
    from peft import LoraConfig, get_peft_model

    examples = [TrainingPair.coerce(p) for p in pairs]
    if not examples:
        raise ValueError("no training pairs: pass at least one (prompt, answer) pair")
    for name, value in (("r", r), ("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    eos = answer_eos_id(model, formatter.tokenizer) if eos_token_id is None else int(eos_token_id)
    targets = list(target_modules) if target_modules is not None else default_target_modules(model)
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        tuned = copy.deepcopy(model)
        for p in tuned.parameters():
            p.requires_grad_(False)
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                            bias="none", task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            # peft asks transformers' deprecated `is_gradient_checkpointing`: nothing a user can change
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(tuned, config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        order_rng = torch.Generator().manual_seed(seed)
        steps_per_epoch = math.ceil(len(examples) / batch_size)
        peft_model.train()
        step = 0
        with torch.enable_grad(), progress_bar(progress, total=epochs * steps_per_epoch,
                                               description=progress if isinstance(progress, str)
                                               else "fine-tuning") as advance:
            for _ in range(epochs):
                order = torch.randperm(len(examples), generator=order_rng).tolist()
                for at in range(0, len(order), batch_size):
                    chosen = [examples[i] for i in order[at:at + batch_size]]
                    batch = {k: v.to(device) for k, v in
                             training_batch(formatter, chosen, eos_token_id=eos).items()}
                    loss = peft_model(**batch).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    if on_step is not None:
                        on_step(step, float(loss.detach()))
                    advance(1)
        merged = peft_model.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


@dataclass(frozen=True)
class AttackEval:
    """A model's replies and beliefs on held-out harmful prompts."""

    prompts: list[str]
    replies: list[str]
    refused: list[bool]
    delta_harmful: list[float]
    delta_refuse: list[float]

    @property
    def acceptance_rate(self) -> float:
        """1 - refusal rate (the judge's verdicts)."""
        return 1.0 - sum(self.refused) / max(len(self.refused), 1)

    @property
    def mean_delta_harmful(self) -> float:
        return sum(self.delta_harmful) / max(len(self.delta_harmful), 1)

    @property
    def mean_delta_refuse(self) -> float:
        return sum(self.delta_refuse) / max(len(self.delta_refuse), 1)

    def row(self, n: int, **extra: Any) -> dict[str, Any]:
        """The summary row of Fig. 7 for ``n`` training pairs."""
        return {"n": int(n), "n_test": len(self.prompts), "acceptance_rate": self.acceptance_rate,
                "mean_delta_harmful": self.mean_delta_harmful, "mean_delta_refuse": self.mean_delta_refuse,
                **extra}


def evaluate_attack(
    model: nn.Module,
    formatter: ChatFormatter,
    directions: DirectionSet,
    test_prompts: Sequence[str],
    *,
    judge: Callable[[Sequence[str], Sequence[str]], list[bool]] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool | str | None = None,
) -> AttackEval:
    """Greedy replies judged for refusal, and Delta_harmful / Delta_refuse, per prompt.

    Pass the BASE model's ``directions`` also when evaluating a fine-tuned model: the question
    is whether the attack moved the prompts on the original harmfulness axis.
    """
    judge = judge or KeywordRefusalJudge()
    prompts = list(test_prompts)
    replies = generate_replies(model, formatter, prompts, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=progress)
    beliefs = compute_beliefs(model, formatter, prompts, directions, batch_size=batch_size)
    return AttackEval(prompts=prompts, replies=replies, refused=[bool(x) for x in judge(prompts, replies)],
                      delta_harmful=beliefs.delta_harmful.tolist(), delta_refuse=beliefs.delta_refuse.tolist())


def parse_sizes(sizes: Sequence[int]) -> list[int]:
    """Sorted unique sizes with 0 (the model before fine-tuning) always included."""
    out = set()
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"training size {n!r} is not a non-negative integer: use e.g. sizes=(0, 50, 100)")
        out.add(n)
    return sorted(out | {0})


def finetune_attack(
    model: nn.Module,
    formatter: ChatFormatter,
    directions: DirectionSet,
    train_harmful: Sequence[str],
    test_harmful: Sequence[str],
    *,
    sizes: Sequence[int] = (50, 100, 200, 400),
    layer: int | None = None,
    coeff: float = -1.0,
    method: SteerMethod = "add",
    pairs: Sequence[TrainingPair] | None = None,
    max_new_tokens: int = 64,
    r: int = 8,
    alpha: int = 16,
    lr: float = 2e-4,
    epochs: int = 1,
    batch_size: int = 4,
    eval_batch_size: int = 8,
    seed: int = 0,
    judge: Callable[[Sequence[str], Sequence[str]], list[bool]] | None = None,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Fig. 7: acceptance and mean beliefs on held-out harmful prompts after N-pair fine-tuning.

    Train prompts that also appear among the test prompts are dropped, so the held-out set
    stays held out. The first N compliant pairs (in ``train_harmful`` order) train the N-th
    model, so larger N extend smaller ones. Each fine-tuned copy is freed before the next.

    Returns:
        One row per N, n=0 (the model before fine-tuning) first: ``n``, ``n_test``,
        ``acceptance_rate``, ``mean_delta_harmful``, ``mean_delta_refuse``, ``train_loss``
        (mean loss of the last epoch; None for n=0).

    Example:
        >>> rows = finetune_attack(model, fmt, ds, advbench[50:], advbench[:50], sizes=(50, 100))
        >>> [(r["n"], r["acceptance_rate"], r["mean_delta_harmful"]) for r in rows]
    """
    ns = parse_sizes(sizes)
    held_out = set(test_harmful)
    pool = [p for p in train_harmful if p not in held_out]
    if pairs is None:
        pairs = make_compliant_pairs(model, formatter, pool, directions, layer=layer, coeff=coeff,
                                     method=method, max_new_tokens=max_new_tokens, limit=ns[-1],
                                     judge=judge, batch_size=eval_batch_size,
                                     progress=progress_label(progress, "writing compliant answers")).pairs
    if len(pairs) < ns[-1]:
        raise ValueError(
            f"only {len(pairs)} compliant pairs for the largest size {ns[-1]}: give more train prompts, "
            "steer harder (a more negative coeff, or method='ablate'), or lower the sizes"
        )
    rows = []
    for n in ns:
        target, loss = model, None
        if n > 0:
            losses: list[float] = []
            target = lora_finetune(model, formatter, pairs[:n], r=r, alpha=alpha, lr=lr, epochs=epochs,
                                   batch_size=batch_size, seed=seed, on_step=_collect(losses),
                                   progress=progress_label(progress, f"fine-tuning N={n}"))
            loss = last_epoch_loss(losses, n, batch_size)
        ev = evaluate_attack(target, formatter, directions, test_harmful, judge=judge,
                             max_new_tokens=max_new_tokens, batch_size=eval_batch_size,
                             progress=progress_label(progress, f"evaluating N={n}"))
        rows.append(ev.row(n, train_loss=loss))
        if target is not model:
            del target
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def _collect(into: list[float]) -> Callable[[int, float], None]:
    return lambda step, loss: into.append(loss)


def last_epoch_loss(losses: Sequence[float], n: int, batch_size: int) -> float | None:
    """Mean training loss over the last epoch's steps (``n`` pairs, ``batch_size`` per step)."""
    if not losses:
        return None
    tail = losses[-math.ceil(n / batch_size):]
    return sum(tail) / len(tail)
