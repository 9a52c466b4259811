"""pyvene-harm: harmfulness and refusal directions of chat models, as pyvene interventions.

Chat models encode whether a request is harmful at the last token of the instruction (t_inst)
and whether they will refuse at the last token of the prompt (t_post_inst). This package finds
both directions, steers with them through pyvene, and guards with the model's own harmfulness
belief. Import what you need from here; submodules hold the details.

Names are imported on first use, so that ``import pyvene_harm`` (and the CLI's ``--help``)
does not load torch, transformers or pyvene.
"""

from typing import TYPE_CHECKING

from .lazy_exports import lazy_exports

if TYPE_CHECKING:  # the names as static tools see them; at run time they load on first use
    from .analysis import (
        LabelledReplies,
        cluster_closeness,
        label_replies,
        post_instruction_ablation,
        steered_replies,
    )
    from .beliefs import Beliefs, compute_beliefs, delta_harmful, delta_refuse
    from .collect import ActivationStats, collect_states, collect_stats
    from .conversation import Conversation
    from .data import apply_template, fingerprint, load_prompts, load_records, load_templates
    from .directions import DirectionSet, DirectionSetMismatch
    from .extract import Extraction, extract_directions
    from .generation import generate_replies
    from .guard import GenerativeGuard, GuardMismatch, LatentGuard, guarded_generate
    from .interventions import Steering, ablate, load_intervention, readout, steer
    from .judges import KeywordRefusalJudge, is_refusal, judge_inversion, refusal_rate
    from .models import LoadedModel, ModelLoadError, load_model
    from .positions import ChatFormatter, PromptBatch

_EXPORTS = {
    "analysis": ("LabelledReplies", "cluster_closeness", "label_replies", "post_instruction_ablation",
                 "steered_replies"),
    "beliefs": ("Beliefs", "compute_beliefs", "delta_harmful", "delta_refuse"),
    "collect": ("ActivationStats", "collect_states", "collect_stats"),
    "conversation": ("Conversation",),
    "data": ("apply_template", "fingerprint", "load_prompts", "load_records", "load_templates"),
    "directions": ("DirectionSet", "DirectionSetMismatch"),
    "extract": ("Extraction", "extract_directions"),
    "generation": ("generate_replies",),
    "guard": ("GenerativeGuard", "GuardMismatch", "LatentGuard", "guarded_generate"),
    "interventions": ("Steering", "ablate", "load_intervention", "readout", "steer"),
    "judges": ("KeywordRefusalJudge", "is_refusal", "judge_inversion", "refusal_rate"),
    "models": ("LoadedModel", "ModelLoadError", "load_model"),
    "positions": ("ChatFormatter", "PromptBatch"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

__all__ = [
    "ActivationStats",
    "Beliefs",
    "ChatFormatter",
    "Conversation",
    "DirectionSet",
    "DirectionSetMismatch",
    "Extraction",
    "GenerativeGuard",
    "GuardMismatch",
    "LatentGuard",
    "Steering",
    "KeywordRefusalJudge",
    "LabelledReplies",
    "LoadedModel",
    "ModelLoadError",
    "PromptBatch",
    "ablate",
    "apply_template",
    "cluster_closeness",
    "collect_states",
    "collect_stats",
    "compute_beliefs",
    "delta_harmful",
    "delta_refuse",
    "extract_directions",
    "fingerprint",
    "generate_replies",
    "guarded_generate",
    "is_refusal",
    "judge_inversion",
    "label_replies",
    "load_intervention",
    "load_model",
    "load_prompts",
    "load_records",
    "load_templates",
    "post_instruction_ablation",
    "readout",
    "refusal_rate",
    "steer",
    "steered_replies",
]
