"""Helpers shared by the ``pyvene-harm guard`` commands: reading a guard folder, checking that
the model fits it from its config alone, and loading the model last (lazily, for resumed runs).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .options import ModelOptions, check_model_spec, load_for_recipe, model_num_states

__all__ = [
    "Lazy",
    "bind_model",
    "check_fits_config",
    "guard_fingerprint",
    "guard_model_options",
    "guard_training_prompts",
    "labelled_prompt_sets",
    "labelled_sets_option",
    "load_guard",
    "exclude_option",
    "excluded_prompts",
    "parse_labelled_sets",
    "resolve_model_options",
    "run_prompts",
]

_LABELS = {"harmful": 1, "unsafe": 1, "1": 1, "harmless": 0, "safe": 0, "benign": 0, "0": 0}


def load_guard(path: str, revision: str | None = None):
    """The guard at a folder or Hub id; a Hub load says which commit it resolved to."""
    from ..guard import LatentGuard
    from ..guard.artifact import locate
    from ..hub import describe_location

    try:
        folder = locate(path, revision=revision)
        guard = LatentGuard.load(folder)
    except (ValueError, OSError) as err:
        raise click.BadParameter(str(err), param_hint="--guard") from None
    if not Path(path).is_dir():
        click.echo(f"guard: {describe_location(path, folder)}", err=True)
    return guard


def guard_fingerprint(path: str, revision: str | None = None) -> str:
    """Identifies the guard's content, so a resumed eval never mixes two guards' numbers."""
    from ..guard.artifact import CONFIG_FILE, TENSORS_FILE, locate

    folder = locate(path, revision=revision)
    h = hashlib.sha256()
    for name in (CONFIG_FILE, TENSORS_FILE):
        h.update((folder / name).read_bytes())
    return h.hexdigest()[:16]


def check_fits_config(spec: str, guard_obj, param: str = "--model") -> None:
    """Compare layer counts from the model's config alone (no weights) with the guard's."""
    check_model_spec(spec)
    n_states = model_num_states(spec)
    want = guard_obj.metadata_.get("num_layers")
    if n_states is not None and want is not None and n_states != want + 1:
        raise click.BadParameter(
            f"{spec} has {n_states - 1} decoder layers but the guard was fitted on a model with {want} "
            f"({guard_obj.metadata_.get('model_id')!r}): pass the model it was fitted on", param_hint=param)


def guard_model_options(fn: Callable) -> Callable:
    """--model (default: the model the guard was fitted with), --dtype, --device, --batch-size."""

    @click.option("--model", "-m", default=None,
                  help="Model the guard reads: Hub id, folder, .gguf or 'demo'. Default: the --model the guard "
                       "was fitted with.")
    @click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                  show_default=True, help="Weights dtype; auto = float32 on CPU, bfloat16 on GPU.")
    @click.option("--device", default=None, help="cpu, cuda, cuda:1 or auto.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
                  help="Prompts per forward pass.")
    @click.option("--revision", default=None,
                  help="Branch, tag or commit of --guard when it is a Hub repo id (default: main); the commit loaded "
                       "is printed.")
    @functools.wraps(fn)
    def wrapper(*args, model, dtype, device, batch_size, revision, **kwargs):
        kwargs["model_args"] = {"model": model, "dtype": dtype, "device": device, "batch_size": batch_size,
                                "revision": revision}
        return fn(*args, **kwargs)

    return wrapper


def resolve_model_options(model_args: dict[str, Any], guard_obj, guard_path: str) -> ModelOptions:
    """The model to load: ``--model``, else the one a *local* guard records. A guard from the Hub
    does not get to choose what this machine downloads and runs: its model must be confirmed."""
    spec = model_args["model"]
    if spec is None:
        spec = (guard_obj.metadata_.get("fitted_with") or {}).get("model")
        if spec is None:
            raise click.UsageError("this guard does not record the model it was fitted with: pass --model")
        if not Path(guard_path).is_dir():
            raise click.UsageError(f"the guard {guard_path} comes from the Hub and names the model {spec!r}; a "
                                   f"downloaded guard does not choose what is loaded here: pass -m {spec} to confirm")
    check_fits_config(spec, guard_obj)
    return ModelOptions(spec, model_args["dtype"], model_args["device"], model_args["batch_size"],
                        guard_obj.system_prompt, template=guard_obj.template)


def bind_model(guard_obj, mopts: ModelOptions, keep_layers: int | None = None):
    """Load the model (the slow step, last) and give it to the guard.

    ``keep_layers``: load only that many decoder layers (a copy that only scores).
    """
    from ..guard import GuardMismatch

    loaded, _ = load_for_recipe(mopts, keep_layers=keep_layers)
    guard_obj.set_params(model=loaded.model, tokenizer=loaded.tokenizer, batch_size=mopts.batch_size,
                         progress=True)
    try:
        from ..guard.features import check_fits_model

        check_fits_model(guard_obj.metadata_, guard_obj.hidden_size_, guard_obj.layers_, loaded.model,
                         guard_obj.chat_formatter())
    except GuardMismatch as err:
        raise click.UsageError(str(err)) from None
    return loaded


def parse_labelled_sets(values: tuple[str, ...]) -> list[tuple[str, str, int]]:
    """``NAME=FILE[:LABEL]`` -> (name, file, 1 harmful / 0 harmless); the label defaults to harmful."""
    out = []
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"{v!r} is not NAME=FILE[:LABEL], e.g. "
                                     "xstest=../shared/data/chats_xstest-harmless.json:harmless", param_hint="--set")
        name, rest = (x.strip() for x in v.split("=", 1))
        path, label = rest, 1
        head, sep, tail = rest.rpartition(":")
        if sep and tail.lower() in _LABELS:
            path, label = head, _LABELS[tail.lower()]
        if not name or not path:
            raise click.BadParameter(f"{v!r}: both NAME and FILE are needed", param_hint="--set")
        out.append((name, path, label))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise click.BadParameter(f"set names must be unique, got {names}", param_hint="--set")
    return out


class Lazy:
    """Load on first use, so a resumed run whose units are all stored loads no model."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load, self._value, self._done = load, None, False

    def __call__(self) -> Any:
        if not self._done:
            self._value, self._done = self._load(), True
        return self._value


def exclude_option(fn: Callable) -> Callable:
    """--exclude FILE (repeatable) -> ``exclude``: (the files, for config.json; their prompts)."""

    @click.option("--exclude", "exclude_files", multiple=True, type=click.Path(),
                  help="Drop prompts found in this file from every set before sampling, so the sets are "
                       "held out (repeatable). A guard folder drops the prompts it was fitted on, a run folder "
                       "made with --set (e.g. by `guard reply-set`) the prompts it drew (both drawn again from "
                       "the files, limit and seed they record). Example: --exclude "
                       "../shared/data/rd_splits_harmful_train.json --exclude artifacts/qwen2.5-coder-0.5b-instruct/guard")
    @functools.wraps(fn)
    def wrapper(*args, exclude_files, **kwargs):
        excluded: list[str] = []
        for path in exclude_files:
            try:
                excluded.extend(excluded_prompts(path))
            except (ValueError, OSError) as err:
                raise click.BadParameter(str(err), param_hint="--exclude") from None
        kwargs["exclude"] = (list(exclude_files), excluded)
        return fn(*args, **kwargs)

    return wrapper


def guard_training_prompts(folder: str | Path) -> list[str]:
    """The prompts a guard folder was fitted on, drawn again from the files, field, limit and
    seed that `guard fit` recorded (paths as given then, so relative to the directory it ran in)."""
    from ..data import load_prompts
    from ..io_utils import read_json

    meta = read_json(Path(folder) / "guard.json")
    used = meta.get("extra", {}).get("fitted_with")
    if not used or "harmful" not in used:
        raise ValueError(f"{folder}: the guard does not record its training files (not fitted by `guard fit`): "
                         "exclude those files instead")
    out: list[str] = []
    for key in ("harmful", "harmless", "margin_harmless"):  # margin prompts: its margin was fitted on them
        files = [used[key]] if isinstance(used.get(key), str) else used.get(key, [])
        for path in files:
            _require_recorded_file(folder, path, "was fitted on")
            out.extend(load_prompts(path, field=used.get(f"{key}_field"), limit=used.get("limit"),
                                    seed=used.get("seed", 0)))
    return out


def _require_recorded_file(folder: str | Path, path: str, what: str) -> None:
    """A file a guard or run folder records (as given then, relative to where it ran) must be here
    for its prompts to be drawn again."""
    if not str(path).startswith("hf://") and not Path(path).exists():
        raise ValueError(f"{folder} {what} {path}, which is not here: run from the directory it was made "
                         "in, or exclude the files themselves")


def excluded_prompts(path: str | Path, *, _within: tuple[Path, ...] = ()) -> list[str]:
    """What ``--exclude PATH`` drops: a guard folder's training prompts, a run folder's drawn
    prompts, or every prompt of a file."""
    from ..data import load_prompts

    if (Path(path) / "guard.json").is_file():
        return guard_training_prompts(path)
    if (Path(path) / "config.json").is_file():
        return run_prompts(path, _within=_within)
    return load_prompts(path)


def run_prompts(folder: str | Path, *, _within: tuple[Path, ...] = ()) -> list[str]:
    """The prompts a run folder made with ``--set`` drew, drawn again from the sets, limit, seed
    and exclusions its ``config.json`` records, so a later run can hold them out (a fresh sample
    of the same sources). Paths are as given then, so relative to the directory it ran in.
    ``_within`` holds the run folders whose exclusions led here: a folder met again would recurse
    for ever, so it is an error naming the loop."""
    from ..data import load_prompts
    from ..io_utils import read_json

    here = Path(folder).resolve()
    if here in _within:
        loop = " -> ".join(str(p) for p in (*_within[_within.index(here):], here))
        raise ValueError(f"{folder}: run folders exclude each other in a loop ({loop}): remove the folder "
                         "from the \"exclude\" list of its own config.json")
    options = read_json(Path(folder) / "config.json").get("options", {})
    if not options.get("sets"):
        raise ValueError(f"{folder}: its config.json records no --set prompt sets: exclude the prompt "
                         "files themselves")
    excluded = [p for path in options.get("exclude") or []
                for p in excluded_prompts(path, _within=(*_within, here))]
    out: list[str] = []
    try:
        sets = parse_labelled_sets(tuple(options["sets"]))
    except click.BadParameter as err:
        raise ValueError(f"{folder}: its config.json records sets this version cannot read ({err.message})") from None
    for name, path, _ in sets:
        _require_recorded_file(folder, path, f"drew set {name!r} from")
        out.extend(load_prompts(path, limit=options.get("limit"), seed=options.get("seed", 0), exclude=excluded))
    return out


def labelled_prompt_sets(sets: tuple[str, ...], exclude: tuple[list[str], list[str]], *, limit: int,
                         seed: int) -> list[tuple[Any, int]]:
    """``--set NAME=FILE[:LABEL]`` values loaded now (cheap), each with its 1/0 label, minus the
    ``--exclude`` prompts, so a bad file stops the command before any model is loaded."""
    from .options import prompt_set

    _, excluded = exclude
    return [(prompt_set(name, path, limit=limit, seed=seed, exclude=excluded), label)
            for name, path, label in parse_labelled_sets(sets)]


def labelled_sets_option(fn: Callable) -> Callable:
    """--set NAME=FILE[:LABEL] (repeatable, required) -> ``sets``; read by :func:`labelled_prompt_sets`."""
    return click.option("--set", "sets", multiple=True, required=True,
                        help="NAME=FILE[:LABEL], repeatable; LABEL harmful (default) or harmless. "
                             "Example: --set xstest=../shared/data/chats_xstest-harmless.json:harmless")(fn)
