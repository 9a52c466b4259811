"""pyvene-harm: harmfulness and refusal directions of chat models, as pyvene interventions.

Chat models encode whether a request is harmful at the last token of the instruction (t_inst)
and whether they will refuse at the last token of the prompt (t_post_inst). This package finds
both directions, steers with them through pyvene, and guards with the model's own harmfulness
belief. Import what you need from here; submodules hold the details.
"""

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
