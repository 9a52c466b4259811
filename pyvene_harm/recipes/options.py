"""Options shared by every recipe, parsed and validated once, before any model is loaded."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

__all__ = [
    "ModelOptions",
    "PromptSet",
    "emit",
    "load_for_recipe",
    "model_options",
    "parse_layers",
    "prompt_set",
    "run_options",
]


@dataclass(frozen=True)
class ModelOptions:
    model: str
    dtype: str
    device: str | None
    batch_size: int
    system_prompt: str | None
    template: str | None = None
    prompt_format: str | None = None
    no_system_prompt: bool = False

    def __post_init__(self) -> None:
        from ..distributed import device_for

        try:  # refuse e.g. --device auto under torchrun now, before anything is loaded
            device_for(self.device)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--device") from None
        if self.prompt_format == "release" and (self.template is not None or self.system_prompt is not None):
            raise click.UsageError("--prompt-format release is the release's fixed strings without a system prompt: "
                                   "drop --template and --system-prompt")
        if self.no_system_prompt and self.system_prompt is not None:
            raise click.UsageError("--no-system-prompt and --system-prompt contradict each other: keep one")

    def as_dict(self) -> dict[str, Any]:
        out = {"model": self.model, "dtype": self.dtype, "device": self.device,
               "batch_size": self.batch_size, "system_prompt": self.system_prompt}
        # recorded only when set, so that runs made before these options resume as they were
        for key, default in (("template", None), ("prompt_format", None), ("no_system_prompt", False)):
            if getattr(self, key) != default:
                out[key] = getattr(self, key)
        return out


def model_options(fn: Callable) -> Callable:
    """--model, --dtype, --device, --batch-size, --system-prompt -> ``mopts: ModelOptions``."""

    @click.option("--model", "-m", default="demo", show_default=True,
                  help="Hub id, local folder, .gguf file, or 'demo' (built-in Qwen2.5-Coder-0.5B-Instruct). "
                       "Example: --model meta-llama/Meta-Llama-3-8B-Instruct")
    @click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                  show_default=True, help="Weights dtype; auto = float32 on CPU, bfloat16 on GPU.")
    @click.option("--device", default=None, help="cpu, cuda, cuda:1 or auto (device_map='auto' for large models).")
    @click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
                  help="Prompts per forward pass. Example: --batch-size 64 on a GPU.")
    @click.option("--system-prompt", default=None,
                  help="System message for every prompt (default: the chat template's own).")
    @click.option("--no-system-prompt", is_flag=True,
                  help="No system turn at all, where the chat template would write a default one (Qwen's).")
    @click.option("--template", default=None,
                  help="Render prompts with this instead of the tokenizer's chat template: a Jinja chat template, "
                       "or a string with {instruction}. Example: --template 'User: {instruction}\nAssistant:'")
    @click.option("--prompt-format", type=click.Choice(["template", "release"]), default="template",
                  show_default=True,
                  help="template: the tokenizer's chat template (or --template); release: the paper's release "
                       "strings for Llama-2, Llama-3 and Qwen (no system prompt; see pyvene_harm.prompt_formats).")
    @functools.wraps(fn)
    def wrapper(*args, model, dtype, device, batch_size, system_prompt, no_system_prompt, template, prompt_format,
                **kwargs):
        kwargs["mopts"] = ModelOptions(model, dtype, device, batch_size, system_prompt, template=template,
                                       prompt_format=None if prompt_format == "template" else prompt_format,
                                       no_system_prompt=no_system_prompt)
        return fn(*args, **kwargs)

    return wrapper


def run_options(fn: Callable) -> Callable:
    """--out, --seed, --json."""

    @click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
                  help="Run directory (config.json, results.json, CSV, PNG). Re-running with the same "
                       "options resumes. Example: -o runs/extract-demo")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed for prompt sampling.")
    @click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class PromptSet:
    name: str
    path: str
    field: str | None
    prompts: list[str]


def prompt_set(name: str, value: str | None, *, field: str | None = None, limit: int | None = None,
               seed: int = 0, template: str | None = None, exclude: Sequence[str] = ()) -> PromptSet | None:
    """Load a prompt file now (cheap), turning any problem into a click usage error."""
    if value is None:
        return None
    from ..data import load_prompts

    try:
        prompts = load_prompts(value, field=field, limit=limit, seed=seed, exclude=exclude)
        if template is not None:
            from ..data import apply_template

            prompts = apply_template(template, prompts)
    except (ValueError, OSError) as err:
        raise click.BadParameter(str(err), param_hint=f"--{name}") from None
    return PromptSet(name=name, path=str(value), field=field, prompts=prompts)


def parse_layers(text: str | None, n_states: int | None = None) -> list[int] | None:
    """``"all"`` -> None; ``"0-12"``, ``"3,5,7"``, ``"2-4,9"`` -> sorted ints (checked if n_states)."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                if int(b) < int(a):
                    raise click.BadParameter(f"layer range {part!r} runs backwards: write it low-high, e.g. "
                                             f"{b.strip()}-{a.strip()}", param_hint="--layers")
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
    except click.BadParameter:
        raise
    except ValueError:
        raise click.BadParameter(f"cannot read layers {text!r}: use e.g. all, 0-12, 3,5,7",
                                 param_hint="--layers") from None
    if not out:
        raise click.BadParameter(f"no layers in {text!r}: use e.g. all, 0-12, 3,5,7", param_hint="--layers")
    if n_states is not None:
        bad = [x for x in sorted(out) if not 0 <= x < n_states]
        if bad:
            raise click.BadParameter(
                f"layer {bad[0]} is out of range: this model has {n_states - 1} decoder layers "
                f"(states 0-{n_states - 1})", param_hint="--layers")
    return sorted(out)


def model_num_states(spec: str) -> int | None:
    """Number of hidden states (layers + 1) read from the model's config only, no weights.

    Lets recipes reject a bad --layers before loading a model; None when it cannot be told
    cheaply (e.g. a Hub id not cached while offline).
    """
    if spec in ("demo", "demo-1.5b"):
        return {"demo": 25, "demo-1.5b": 29}[spec]  # 24 and 28 decoder layers
    path = Path(spec)
    try:
        if path.is_dir() and (path / "config.json").is_file():
            cfg = json.loads((path / "config.json").read_text())
        elif path.suffix == ".gguf":
            return None
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(spec).to_dict()
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    n = cfg.get("num_hidden_layers")
    return int(n) + 1 if n else None


def check_model_spec(spec: str) -> None:
    """Reject specs that cannot name a model, before loading anything."""
    if spec in ("demo", "demo-1.5b"):
        return
    path = Path(spec)
    if path.exists():
        return
    if os.sep in spec.strip("/") and spec.count("/") > 1 or spec.endswith((".gguf", ".json", ".bin")):
        raise click.BadParameter(f"{spec} does not exist", param_hint="--model")


def load_for_recipe(mopts: ModelOptions, keep_layers: int | None = None):
    """Load the model and its chat formatter (the slow step, after every check has passed)."""
    from ..distributed import device_for
    from ..models import load_model
    from ..prompt_formats import make_formatter

    # under torchrun each rank loads its own copy on cuda:LOCAL_RANK (or the CPU)
    device, device_map = (None, "auto") if mopts.device == "auto" else (device_for(mopts.device), None)
    loaded = load_model(mopts.model, dtype=mopts.dtype, device=device, device_map=device_map,
                        keep_layers=keep_layers)
    try:
        fmt = make_formatter(loaded.tokenizer, system_prompt=mopts.system_prompt, template=mopts.template,
                             prompt_format=mopts.prompt_format, no_system_prompt=mopts.no_system_prompt)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    return loaded, fmt


def emit(results: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(results, indent=2, sort_keys=True, default=str))


def require(sets: Sequence[PromptSet | None], names: Sequence[str]) -> None:
    for s, n in zip(sets, names):
        if s is None:
            raise click.UsageError(f"--{n} is required")
