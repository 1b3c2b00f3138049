"""Find a model's super weights, confirm each by ablation, and track the super activation it creates.

The search is the paper's loop (Yu et al. 2024, "The Super Weight in Large Language Models"): hooks
on every decoder layer's MLP output projection record, per layer, the largest ``|output|`` (its
channel is the row) and the input channel that contributes most to it (the column); a layer whose
input and output both spike, in absolute terms and relative to the layer's median, holds a candidate
``W[row, col]``. The candidate is zeroed and the layer looked at again until no spike is left. Spikes alone
are not proof (SmolLM2-135M spikes in channel 507 at several layers; only layer 11's weight matters), so
every candidate is then confirmed: it is zeroed alone and the model's own next-token predictions on a short
built-in text are compared with the original ones.

Stages, one module each, around the :class:`~.search.Candidate` type:

- :mod:`.inputs`: checked settings (:class:`DetectionSettings`) and the prompts as a padded batch;
- :mod:`.search`: spike statistics and the zero-and-look-again loop (forward hooks), shared with streaming;
- :mod:`.run`: one in-memory run (prompt batch, zeroed weights restored bit-exactly) and its search pass;
- :mod:`.confirm`: ablation of each candidate and of groups; :mod:`.classify`: classes and records;
- :mod:`.trace`: the super activation across layers; :mod:`.report`: :class:`DetectionReport`;
- :mod:`.in_memory`: :func:`detect_super_weights`; :mod:`.streaming`: the same search shard by shard;
- :mod:`.entry`: :func:`run_detection`, what the quantizer and the CLI call.

Example:
    >>> from optimum_superweight.testing import build_tiny_model
    >>> report = detect_super_weights(build_tiny_model("llama", super_weights=[(1, 5, 7)]))
    >>> [(sw.module, sw.row, sw.col, sw.classification) for sw in report.super_weights]
    [('model.layers.1.mlp.down_proj', 5, 7, 'super')]
"""

from ..prompts import DEFAULT_PROMPTS
from .classify import SUPER_KL, SUPER_PPL_RATIO, WEAK_KL, WEAK_PPL_RATIO
from .confirm import confirmation_ids
from .entry import records_to_keep, run_detection
from .in_memory import detect_super_weights
from .inputs import (
    DEFAULT_CONFIRM_TOKENS,
    DetectionSettings,
    check_count,
    check_number,
    encode_prompts,
    layer_output,
    model_device,
    pad_batch,
)
from .report import DetectionReport, LayerSpikes, SuperActivation
from .search import FOLLOW_UP_FRACTION, Candidate, SpikeSearch, candidate_record, collect_candidates, token_position
from .streaming import ShardReader, checkpoint_files, detect_super_weights_streaming, meta_model

# The names benchmarks/detection_speed.py imported before the split (private then).
_DEFAULT_CONFIRM_TOKENS = DEFAULT_CONFIRM_TOKENS
_confirmation_ids = confirmation_ids

__all__ = [
    "detect_super_weights",
    "detect_super_weights_streaming",
    "run_detection",
    "records_to_keep",
    "DetectionSettings",
    "DetectionReport",
    "LayerSpikes",
    "SuperActivation",
    "Candidate",
    "DEFAULT_PROMPTS",
    "SUPER_KL",
    "SUPER_PPL_RATIO",
    "WEAK_KL",
    "WEAK_PPL_RATIO",
    "FOLLOW_UP_FRACTION",
]
