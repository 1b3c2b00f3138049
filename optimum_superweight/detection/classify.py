"""Classify stage: each candidate's measured effect becomes a class (``super``, ``weak``, ``no_effect``) and
a :class:`~optimum_superweight.records.SuperWeight` record, strongest first.
"""

from __future__ import annotations

from typing import Any

from ..records import SuperWeight
from .confirm import Confirmation
from .search import Candidate, candidate_record

__all__ = [
    "SUPER_KL",
    "SUPER_PPL_RATIO",
    "WEAK_KL",
    "WEAK_PPL_RATIO",
    "CLASS_RANK",
    "classify",
    "classify_records",
    "confirmation_summary",
]

# Classification thresholds, on the confirmation text (KL in nats per token, original || ablated;
# perplexity ratio = exp(ablated mean NLL - original mean NLL)). Calibrated on SmolLM2-135M-Instruct, whose
# layer-11 super weight is catastrophic when zeroed while its decoys (layers 2, 9, 28, 29) barely matter; the
# measured ratios are in benchmarks/RESULTS.md (ablation rows).
#: ``super`` (catastrophic): KL at least this ...
SUPER_KL = 0.5
#: ... or the perplexity at least this many times the original.
SUPER_PPL_RATIO = 2.0
#: ``weak`` (measurable): KL at least this ...
WEAK_KL = 0.01
#: ... or the perplexity changed by at least this factor (either way).
WEAK_PPL_RATIO = 1.02

#: Order of the classes in a report: super first, unconfirmed last.
CLASS_RANK = {"super": 0, "weak": 1, "no_effect": 2, None: 3}


def classify(kl: float, ppl_ratio: float) -> str:
    """The class of an ablation's effect: KL (nats per token) and perplexity ratio against the thresholds above.

    >>> classify(1.2, 4.8), classify(0.02, 1.0), classify(0.0, 1.0)
    ('super', 'weak', 'no_effect')
    """
    if kl >= SUPER_KL or ppl_ratio >= SUPER_PPL_RATIO:
        return "super"
    if kl >= WEAK_KL or ppl_ratio >= WEAK_PPL_RATIO or ppl_ratio <= 1.0 / WEAK_PPL_RATIO:
        return "weak"
    return "no_effect"


def classify_records(found: list[Candidate], confirmation: Confirmation | None) -> list[SuperWeight]:
    """Records stage: one :class:`SuperWeight` per candidate with its class, super first then by effect
    (unconfirmed: largest output spike first)."""
    records = []
    for i, c in enumerate(found):
        extra: dict[str, Any] = c.search_extra()
        classification = impact = None
        if confirmation is not None and i in confirmation.alone:
            nll, kl, ppl_ratio = confirmation.alone[i]
            classification, impact = classify(kl, ppl_ratio), ppl_ratio
            extra["kl"] = kl
            base_loss = confirmation.base_loss
            extra["loss_ratio"] = nll / base_loss if base_loss else None
            group = confirmation.groups.get((c.site.layer, c.row))
            if group is not None:
                _, group_kl, group_ppl_ratio = group
                extra["group_kl"], extra["group_ppl_ratio"] = group_kl, group_ppl_ratio
                group_class = classify(group_kl, group_ppl_ratio)
                members = [
                    classify(*confirmation.alone[j][1:]) for j in confirmation.group_members[(c.site.layer, c.row)]
                ]
                # Upgrade only weights that matter jointly: when no member alone reaches the
                # group's class (two halves of one activation), each is as important as the
                # group. A group that is catastrophic because of one member upgrades nobody.
                if all(CLASS_RANK[group_class] < CLASS_RANK[m] for m in members):
                    classification = group_class
        records.append(
            candidate_record(
                c, classification=classification, impact=impact, extra={k: v for k, v in extra.items() if v is not None}
            )
        )
    if confirmation is not None:
        records.sort(key=lambda r: (CLASS_RANK[r.classification], -r.extra.get("kl", 0.0), -(r.impact or 0.0)))
    else:
        records.sort(key=lambda r: -(r.output_spike or 0.0))
    return records


def confirmation_summary(confirmation: Confirmation) -> dict[str, Any]:
    """``DetectionReport.confirmation``: the text and its original loss, the thresholds, the groups ablated."""
    return {
        "text": confirmation.text,
        "tokens": confirmation.tokens,
        "loss": confirmation.base_loss,
        "super_kl": SUPER_KL,
        "super_ppl_ratio": SUPER_PPL_RATIO,
        "weak_kl": WEAK_KL,
        "weak_ppl_ratio": WEAK_PPL_RATIO,
        "groups_ablated": len(confirmation.groups),
    }
