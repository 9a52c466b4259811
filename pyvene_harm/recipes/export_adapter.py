"""``pyvene-harm export-adapter``: a direction's ablation as a PEFT LoRA folder for serving engines."""

from __future__ import annotations

import click

from .beliefs import resolve_directions
from .options import check_model_spec

__all__ = ["export_adapter"]


@click.command("export-adapter")
@click.option("--model", "-m", default="demo", show_default=True,
              help="The model the directions were made from: Hub id, local folder, or demo / demo-1.5b.")
@click.option("--directions", "directions_path", required=True,
              help="DirectionSet folder, `extract` run directory or Hub id. "
                   "Example: --directions artifacts/qwen2.5-coder-0.5b-instruct/directions")
@click.option("--layer", type=int, default=None,
              help="Remove this one layer's direction from everything written to the residual stream (rank 1). "
                   "Default: keep every layer's own direction out of what that layer reads (rank up to the "
                   "number of layers; on the demo model it undoes far more over-refusal, see "
                   "docs/serving-with-vllm.md).")
@click.option("--direction", type=click.Choice(["refusal", "harmfulness"]), default="refusal", show_default=True,
              help="Which direction to remove.")
@click.option("--embedding/--no-embedding", default=False, show_default=True,
              help="Also edit the token embedding (the full weight orthogonalisation). peft loads it; vLLM 0.32 "
                   "takes LoRA weights on attention and MLP layers only.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Adapter folder to write (replaced if it is an adapter already). Example: -o adapters/no-refusal")
def export_adapter(model, directions_path, layer, direction, embedding, out):
    """Write a rank-1 LoRA adapter that removes one direction from the residual stream.

    With --layer the edit is W -> W - v v^T W on every o_proj and down_proj (and the embedding
    with --embedding), which equals `ablate(model, directions, source_layer=LAYER,
    where="writes")`. Without it each layer's writes lose the directions of every later layer,
    so no layer reads its own direction (the weight form of `ablate(model, directions)`). It loads with
    `PeftModel.from_pretrained` and with `vllm serve MODEL --enable-lora --lora-modules
    NAME=FOLDER`, where requests with and without it share one batch. Serve it as a LoRA: merging
    it into a model with tied embeddings (the demo model) would also change the output layer.

    \b
    Example:
      pyvene-harm export-adapter -m demo --directions artifacts/qwen2.5-coder-0.5b-instruct/directions \\
        -o adapters/no-refusal
    """
    check_model_spec(model)
    directions = resolve_directions(directions_path)
    if layer is not None and not 0 <= layer < directions.n_states:
        raise click.BadParameter(f"layer {layer} is out of range: these directions cover layers "
                                 f"0-{directions.n_states - 1}", param_hint="--layer")
    from ..interventions.adapter import export_ablation_adapter
    from ..models import load_model

    loaded = load_model(model, dtype="float32", device="cpu")
    try:
        folder = export_ablation_adapter(loaded.model, directions, out, layer=layer, direction=direction, embedding=embedding,
                                         base_model_name_or_path=loaded.model_id)
    except (ValueError, FileExistsError) as err:
        raise click.ClickException(str(err)) from None
    import json

    rank = json.loads((folder / "pyvene_harm.json").read_text())["rank"]
    modules = "embed_tokens, o_proj, down_proj" if embedding else "o_proj, down_proj"
    what = f"the {direction} direction of layer {layer}" if layer is not None else \
        f"each layer's own {direction} direction from what it reads"
    click.echo(f"wrote {folder}: removes {what} (rank {rank} on {modules}; serve it with vLLM's "
               f"--max-lora-rank {_vllm_rank(rank)} or more)")


def _vllm_rank(rank: int) -> int:
    """The smallest of the ranks vLLM accepts for --max-lora-rank that holds ``rank``."""
    return next(r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)
