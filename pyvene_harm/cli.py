"""The ``pyvene-harm`` command: a thin click layer over the library.

Each recipe lives in ``pyvene_harm/recipes/<name>.py`` and is imported only when its command
runs, so ``pyvene-harm --help`` stays fast and needs no model.
"""

from __future__ import annotations

import importlib
import sys

import click

# command name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {}


def register(name: str, module: str, attr: str, help: str) -> None:
    if name in COMMANDS:
        raise ValueError(f"command {name!r} is already registered")
    COMMANDS[name] = (module, attr, help)


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context):
        from .distributed import launched

        if not launched():
            return self._invoke(ctx)
        # torchrun / accelerate launch: the whole command is one data-parallel session
        from .recipes.launch import rank_session

        with rank_session(ctx.params["dist_timeout"]):
            return self._invoke(ctx)

    def _invoke(self, ctx: click.Context):
        # a model that cannot be loaded is the user's to fix: its one-line message, not a traceback
        try:
            return super().invoke(ctx)
        except Exception as err:
            # looked up, not imported: pyvene_harm.models loads torch, and `COMMAND --help` passes
            # here; a ModelLoadError can only exist once that module has been imported
            models = sys.modules.get("pyvene_harm.models")
            if models is not None and isinstance(err, models.ModelLoadError):
                raise click.ClickException(str(err)) from None
            raise

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        if name is not None:
            from .recipes.launch import check_data_parallel

            check_data_parallel(name, rest)
        return name, cmd, rest

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyvene-harm")
@click.option("--dist-timeout", type=click.FloatRange(min=1), default=1800, show_default=True,
              envvar="PYVENE_HARM_DIST_TIMEOUT",
              help="Under torchrun: seconds a rank waits for a silent peer before the job stops.")
def main(dist_timeout: float) -> None:
    """Harmfulness and refusal directions of chat models, as pyvene interventions.

    \b
    Quick start (offline, built-in demo model; run from the repository root):
      pyvene-harm demo
      pyvene-harm extract --model demo --harmful ../shared/data/chats_advbench.json \\
        --harmless ../shared/data/rd_splits_harmless_train.json --limit 8 --max-new-tokens 32 -o runs/extract
    \b
    Data-parallel over 4 GPUs (or CPU processes), same results as one process:
      torchrun --nproc-per-node 4 -m pyvene_harm extract -m demo --harmful ... -o runs/extract
    """


register("demo", "pyvene_harm.recipes.demo", "demo", "Guard a handful of example prompts with the shipped artifacts.")
register("guard", "pyvene_harm.recipes.guard", "guard", "Fit, score and evaluate a Latent Guard.")
register("extract", "pyvene_harm.recipes.extract", "extract", "Split prompts by the model's refusals and extract both directions.")
register("post-inst", "pyvene_harm.recipes.post_inst", "post_inst", "Table 1: refusal with and without post-instruction tokens.")
register("cluster", "pyvene_harm.recipes.cluster", "cluster", "Fig. 2: which centroid each group sits closer to, per layer.")
register("beliefs", "pyvene_harm.recipes.beliefs", "beliefs", "Figs. 3/6: Delta_harmful vs Delta_refuse per prompt set.")
register("elicit", "pyvene_harm.recipes.elicit", "elicit", "Fig. 4: refusal rate when steering harmless prompts, per layer.")
register("invert", "pyvene_harm.recipes.invert", "invert", "Fig. 5: the reply-inversion task under steering, per layer.")
register("finetune", "pyvene_harm.recipes.finetune", "finetune", "Fig. 7: LoRA fine-tuning attack vs Delta_harmful.")
register("export-adapter", "pyvene_harm.recipes.export_adapter", "export_adapter",
         "Write a direction's ablation as a rank-1 LoRA adapter (peft, vLLM).")
register("report", "pyvene_harm.recipes.report", "report", "Turn a run directory into a Markdown summary.")
register("serve", "pyvene_harm.recipes.serve", "serve", "Serve the guard: OpenAI-compatible moderation and guarded chat.")


if __name__ == "__main__":  # pragma: no cover
    main()
