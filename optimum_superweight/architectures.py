"""Where the MLP output projection (the matrix that holds super weights) lives, per architecture.

A super weight is a scalar ``W[row, col]`` of the projection that maps the MLP's intermediate
activations back to the residual stream (``down_proj`` in Llama). This module holds one small table
that names that projection, its storage layout, and the MLP's input side for every supported
``config.model_type``, and a function that lists the projection of every decoder layer of a model.

Coordinates are always in the paper's convention: ``row`` = hidden (output) channel, ``col`` =
intermediate (input) channel. GPT-2's ``Conv1D`` stores ``weight`` as ``[in, out]``, so its element
is ``weight[col, row]``; :class:`ProjectionSite` says which layout a module has.

Example:
    >>> from optimum_superweight.testing import build_tiny_model
    >>> model = build_tiny_model("gpt2", super_weights=None)
    >>> [(site.layer, site.name, site.transposed) for site in projection_sites(model)][:1]
    [(0, 'transformer.h.0.mlp.c_proj', True)]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = [
    "ArchitectureSpec",
    "ARCHITECTURES",
    "ProjectionSite",
    "supported_model_types",
    "architecture_spec",
    "projection_sites",
    "weight_index",
]


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one architecture lays out its MLP.

    Attributes:
        projection: The MLP output projection, relative to a decoder layer (``"mlp.down_proj"``).
        layers: Where the decoder layers live, relative to the ``*ForCausalLM`` model.
        mlp_inputs: The MLP's input projections, relative to a decoder layer (gate first when gated).
        mlp_kind: ``"gated"`` (act(gate) * up), ``"fused_gated"`` (one matrix, gate rows then up rows)
            or ``"plain"`` (act(fc_in)).
        layout: ``"linear"`` (``weight`` is ``[out, in]``) or ``"conv1d"`` (``weight`` is ``[in, out]``).
        post_mlp_norm: A norm applied to the MLP output before the residual add, relative to a decoder
            layer, or ``None``. Its gain decides how large the residual-stream super activation gets, so
            the weight that starts it need not be large itself.
        notes: Anything else worth knowing when reading a detection report.
    """

    projection: str
    layers: str
    mlp_inputs: tuple[str, ...]
    mlp_kind: str
    layout: str = "linear"
    post_mlp_norm: str | None = None
    notes: str = ""


_LLAMA_LIKE = dict(projection="mlp.down_proj", layers="model.layers", mlp_inputs=("mlp.gate_proj", "mlp.up_proj"), mlp_kind="gated")

#: model_type -> spec. Keep it small: one line of knowledge per architecture.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec(**_LLAMA_LIKE, notes="The paper's reference layout."),
    "mistral": ArchitectureSpec(**_LLAMA_LIKE),
    "qwen2": ArchitectureSpec(**_LLAMA_LIKE),
    "qwen3": ArchitectureSpec(**_LLAMA_LIKE),
    "olmo": ArchitectureSpec(**_LLAMA_LIKE, notes="Non-parametric LayerNorm."),
    "olmo2": ArchitectureSpec(
        **_LLAMA_LIKE,
        post_mlp_norm="post_feedforward_layernorm",
        notes="Post-norm: the MLP output is RMS-normalised before the residual add.",
    ),
    "phi3": ArchitectureSpec(
        projection="mlp.down_proj",
        layers="model.layers",
        mlp_inputs=("mlp.gate_up_proj",),
        mlp_kind="fused_gated",
        notes="gate_up_proj fuses gate (first half of the rows) and up (second half); down_proj is the output.",
    ),
    "gemma": ArchitectureSpec(**_LLAMA_LIKE, notes="RMSNorm gain is (1 + weight); embeddings scaled by sqrt(hidden)."),
    "gemma2": ArchitectureSpec(
        **_LLAMA_LIKE,
        post_mlp_norm="post_feedforward_layernorm",
        notes="A large-gain RMSNorm follows the MLP: the super activation's size comes from that gain.",
    ),
    "gemma3_text": ArchitectureSpec(
        **_LLAMA_LIKE,
        post_mlp_norm="post_feedforward_layernorm",
        notes="As Gemma2 (post-MLP norm with a large gain).",
    ),
    "gemma3": ArchitectureSpec(
        projection="mlp.down_proj",
        layers="model.language_model.layers",
        mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
        mlp_kind="gated",
        post_mlp_norm="post_feedforward_layernorm",
        notes="Multimodal wrapper: the text decoder lives under model.language_model.",
    ),
    "gpt2": ArchitectureSpec(
        projection="mlp.c_proj",
        layers="transformer.h",
        mlp_inputs=("mlp.c_fc",),
        mlp_kind="plain",
        layout="conv1d",
        notes="Conv1D stores weight as [in, out]: paper W[row, col] is weight[col, row].",
    ),
    "gpt_neox": ArchitectureSpec(
        projection="mlp.dense_4h_to_h",
        layers="gpt_neox.layers",
        mlp_inputs=("mlp.dense_h_to_4h",),
        mlp_kind="plain",
        notes="Pythia; parallel residual (attention and MLP read the same input).",
    ),
    "falcon": ArchitectureSpec(
        projection="mlp.dense_4h_to_h",
        layers="transformer.h",
        mlp_inputs=("mlp.dense_h_to_4h",),
        mlp_kind="plain",
        notes="Parallel attention/MLP; FalconLinear keeps the [out, in] layout.",
    ),
    "opt": ArchitectureSpec(
        projection="fc2",
        layers="model.decoder.layers",
        mlp_inputs=("fc1",),
        mlp_kind="plain",
        notes="The MLP is inlined in the decoder layer (fc1 -> ReLU -> fc2).",
    ),
}


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values with a built-in entry, sorted."""
    return sorted(ARCHITECTURES)


def _model_type(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def architecture_spec(model_or_type: torch.nn.Module | str) -> ArchitectureSpec:
    """The table entry for a model (or a ``model_type`` string).

    Example:
        >>> architecture_spec("gpt2").layout
        'conv1d'

    Raises:
        ValueError: for a model type without an entry; the message lists the supported ones and how
            to name the projection explicitly.
    """
    model_type = model_or_type if isinstance(model_or_type, str) else _model_type(model_or_type)
    spec = ARCHITECTURES.get(model_type or "")
    if spec is None:
        raise ValueError(
            f"Unsupported architecture: model_type={model_type!r} has no entry in the super-weight "
            f"architecture table. Supported model types: {', '.join(supported_model_types())}. For any "
            "other model, name the MLP output projection relative to a decoder layer, e.g. "
            "detect_super_weights(model, tokenizer, projection='mlp.down_proj') or "
            "`optimum-superweight detect MODEL --projection mlp.down_proj`."
        )
    return spec


@dataclass(frozen=True)
class ProjectionSite:
    """One decoder layer's MLP output projection.

    Attributes:
        layer: Decoder-layer index.
        name: Full module name (``model.named_modules()`` key), e.g. ``model.layers.11.mlp.down_proj``.
        module: The module itself.
        transposed: ``True`` when ``module.weight`` is stored ``[in, out]`` (GPT-2 ``Conv1D``).
        layer_name: Full name of the decoder layer that holds it (``model.layers.11``).
    """

    layer: int
    name: str
    module: torch.nn.Module
    transposed: bool
    layer_name: str

    @property
    def out_features(self) -> int:
        """Hidden size (number of rows in the paper's convention)."""
        weight = self.module.weight
        return int(weight.shape[1] if self.transposed else weight.shape[0])

    @property
    def in_features(self) -> int:
        """Intermediate size (number of columns in the paper's convention)."""
        weight = self.module.weight
        return int(weight.shape[0] if self.transposed else weight.shape[1])


def _is_transposed(module: torch.nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family) computes x @ weight + bias with weight [in, out].
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return False
    return isinstance(module, Conv1D)


def weight_index(site: ProjectionSite, row: int, col: int) -> tuple[int, int]:
    """Index into ``site.module.weight`` of the paper's ``W[row, col]`` (swapped for Conv1D)."""
    return (col, row) if site.transposed else (row, col)


def _validate_projection(projection: str) -> str:
    if not isinstance(projection, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", projection):
        raise ValueError(
            f"projection={projection!r} is invalid: expected a dotted module name relative to a decoder "
            "layer, such as 'mlp.down_proj', 'mlp.c_proj' or 'fc2'."
        )
    return projection


def projection_sites(model: torch.nn.Module, projection: str | None = None) -> list[ProjectionSite]:
    """List the MLP output projection of every decoder layer, in layer order.

    ``projection`` names the module relative to a decoder layer (``"mlp.down_proj"``); it defaults to
    the architecture table's entry for ``model.config.model_type`` and makes any model usable. A site
    is every module named ``<...>.<index>.<projection>`` with a 2-D ``weight``.

    Example:
        >>> from optimum_superweight.testing import build_tiny_model
        >>> sites = projection_sites(build_tiny_model("llama", super_weights=None))
        >>> sites[1].name, sites[1].transposed
        ('model.layers.1.mlp.down_proj', False)

    Raises:
        ValueError: unknown architecture without ``projection``, or no module matches.
    """
    if projection is None:
        projection = architecture_spec(model).projection
    _validate_projection(projection)
    pattern = re.compile(r"^(?P<layer_name>(?:.*\.)?(?P<index>\d+))\." + re.escape(projection) + r"$")
    sites: list[ProjectionSite] = []
    for name, module in model.named_modules():
        match = pattern.match(name)
        weight = getattr(module, "weight", None)
        if match is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        sites.append(
            ProjectionSite(
                layer=int(match.group("index")),
                name=name,
                module=module,
                transposed=_is_transposed(module),
                layer_name=match.group("layer_name"),
            )
        )
    if not sites:
        raise ValueError(
            f"No module of {type(model).__name__} matches projection={projection!r} (expected names like "
            f"'model.layers.0.{projection}' with a 2-D weight). Pass the MLP output projection's name "
            "relative to a decoder layer, e.g. projection='mlp.down_proj'."
        )
    layers = [site.layer for site in sites]
    if len(set(layers)) != len(layers):
        raise ValueError(
            f"projection={projection!r} matches several modules per layer index "
            f"({[site.name for site in sites][:6]}...): make it specific to the decoder layers' MLP output."
        )
    return sorted(sites, key=lambda site: site.layer)
