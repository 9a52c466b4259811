"""``python -m pyvene_harm``: the CLI, as ``torchrun -m pyvene_harm`` and ``accelerate launch -m`` need it."""

from .cli import main

main(prog_name="pyvene-harm")
