"""Input embeddings and output head in 8 bits (``embedding_bits=8``), the super-activation channels exact.

Both matrices are ``[vocab, hidden]``: one row per token. Each row is stored as 8-bit symmetric codes with one
float32 scale (its absmax / 127: a token's row is one distribution, and a per-row scale is what GGUF's Q8_0 and
an 8-bit per-row linear layer hold), except the hidden channels of the super activation
(``super_activation_channels``). Those columns are held out of every row's absmax, hold the zero code, and are
stored exactly in the model's own dtype (``held_out_values``, ``[vocab, c]``): the embedding writes them back
into every gathered row, the head adds their exact product. No other rows or values get special treatment: with
the channel that carries the super activation held out, every other value is within half a step
(``absmax / 254``) of its row's range, and the measured effect is in ``benchmarks/RESULTS.md``. Tensor names,
dtypes and shapes come from :mod:`optimum_superweight.format` (``EMBEDDING_FORMAT``).

:class:`SuperWeightEmbedding` gathers the codes of the requested rows and dequantizes only those;
:class:`SuperWeightHead` is an 8-bit per-row :class:`~optimum_superweight.nn.linear.SuperWeightLinear` (its
kernels run it) plus the exact held-out columns. A tied head shares the embedding's tensors
(:meth:`SuperWeightHead.tie_to`).

>>> emb = nn.Embedding(10, 8)
>>> packed = SuperWeightEmbedding.from_embedding(emb, held_out_columns=[3])
>>> ids = torch.tensor([[1, 4]])
>>> bool((packed(ids)[..., 3] == emb(ids)[..., 3]).all()), bool(torch.allclose(packed(ids), emb(ids), atol=0.02))
(True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..format import (
    EMBEDDING_FORMAT,
    HELD_OUT_COLUMNS,
    HELD_OUT_VALUES,
    TENSORS,
    LayerFormat,
    check_quantizable,
)
from ..tensor.quantize import GroupLayout
from .linear import SuperWeightLinear

__all__ = ["SuperWeightEmbedding", "SuperWeightHead", "pack_rows", "PACKED_TENSORS"]

_ZERO_CODE = 128
_QMAX = 127
#: Rows quantized at once: bounds the float32 temporaries on a 262k-token vocabulary.
_ROW_BLOCK = 8192
#: The tensors a packed embedding or head stores (and a tied head shares), in the format table's order.
PACKED_TENSORS = ("weight", "weight_scale", HELD_OUT_COLUMNS, HELD_OUT_VALUES)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


@torch.no_grad()
def pack_rows(
    weight: torch.Tensor, held_out_columns: Sequence[int] = (), name: str = "embedding"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes uint8 ``[rows, 1, cols]``, float32 scales ``[rows, 1]`` and the exact held-out values ``[rows, c]`` of a
    ``[rows, cols]`` matrix: symmetric absmax per row over the columns not held out; held-out columns hold code 128.

    >>> codes, scale, values = pack_rows(torch.tensor([[1.0, -0.5, 9.0]]), [2])
    >>> codes.tolist(), values.tolist()
    ([[[255, 64, 128]]], [[9.0]])
    """
    check_quantizable(name, weight)  # finite values only: float32 scales hold any row
    columns = torch.tensor(list(held_out_columns), dtype=torch.long, device=weight.device)
    rows = weight.shape[0]
    codes = torch.empty(rows, 1, weight.shape[1], dtype=torch.uint8, device=weight.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=weight.device)
    for start in range(0, rows, _ROW_BLOCK):
        block = weight[start : start + _ROW_BLOCK].detach().to(torch.float32).clone()
        block[:, columns] = 0.0
        absmax = block.abs().amax(dim=1, keepdim=True)
        # An all-zero row (a padding token) gets scale 1: codes 128, exactly 0, and a scale the format accepts.
        step = torch.where(absmax > 0, absmax / _QMAX, torch.ones_like(absmax))
        codes[start : start + _ROW_BLOCK, 0] = (torch.round(block / step).clamp(-_QMAX, _QMAX) + _ZERO_CODE).to(torch.uint8)
        scale[start : start + _ROW_BLOCK] = step
    return codes, scale, weight[:, columns].detach().clone()


def _dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, columns: torch.Tensor, values: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """``(codes - 128) * scale`` in float32 with the held-out columns written back exactly, cast to ``dtype``."""
    rows = (codes.to(torch.float32) - _ZERO_CODE) * scale
    if columns.numel():
        rows[..., columns.long()] = values.to(torch.float32)
    return rows.to(dtype)


class _PackedRows:
    """What the packed embedding and head share: the held-out columns, their format, their dtype rule."""

    def _register_held_out(self, rows: int, count: int, dtype: torch.dtype | None, device) -> None:
        self.num_held_out_columns = count
        self.held_out_columns = _frozen(torch.zeros(count, dtype=torch.int32, device=device))
        self.held_out_values = _frozen(torch.zeros(rows, count, dtype=dtype or torch.float32, device=device))

    def _set_packed(self, codes: torch.Tensor, scale: torch.Tensor, columns: Sequence[int], values: torch.Tensor) -> None:
        self.weight.data = codes
        self.weight_scale.data = scale
        self.held_out_columns.data = torch.tensor(list(columns), dtype=torch.int32, device=codes.device)
        self.held_out_values.data = values

    @property
    def format(self) -> LayerFormat:
        """This module's settings as the checkpoint format sees them."""
        return LayerFormat.of_module(self)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this module writes to a checkpoint, by format name, in the format table's order."""
        return {spec.name: getattr(self, spec.name) for spec in TENSORS if getattr(self, spec.name, None) is not None}

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        """Casts move codes and scales without re-rounding them; the held-out values (and a bias) follow the
        model's dtype, as a dense embedding would (see ``SuperWeightLinear._apply``)."""
        exact = {id(t) for name, t in self.stored_tensors().items() if name not in (HELD_OUT_VALUES, "bias")}

        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in exact:
                return fn(tensor)
            probe = fn(tensor.new_empty(0))
            return fn(tensor) if probe.dtype == tensor.dtype else tensor.to(device=probe.device)

        return nn.Module._apply(self, keep_dtype, recurse)


class SuperWeightEmbedding(_PackedRows, nn.Module):
    """An ``nn.Embedding`` (or a scaled word embedding: ``embed_scale``, as Gemma's) stored in 8 bits per row.

    ``forward`` gathers the requested rows' codes and scales and dequantizes only those; the output has the
    dtype of ``held_out_values`` (the model's), and equals ``to_dense()``'s lookup exactly.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        num_held_out_columns: int = 0,
        padding_idx: int | None = None,
        embed_scale: float | None = None,
        dense_class: type = nn.Embedding,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.out_features, self.in_features = num_embeddings, embedding_dim  # the format's names for [rows, cols]
        self.bits, self.group_size, self.symmetric = EMBEDDING_FORMAT["bits"], EMBEDDING_FORMAT["group_size"], True
        self.scale_dtype, self.zero_point = EMBEDDING_FORMAT["scale_dtype"], "uint8"
        self.layout = GroupLayout(num_embeddings, embedding_dim, self.bits, self.group_size)
        self.padding_idx, self.embed_scale, self.dense_class = padding_idx, embed_scale, dense_class
        # held_out_values first: transformers' model.dtype is the first floating parameter, which must stay the model's.
        self._register_held_out(num_embeddings, num_held_out_columns, dtype, device)
        self.weight = _frozen(torch.full(self.layout.packed_shape, _ZERO_CODE, dtype=torch.uint8, device=device))
        self.weight_scale = _frozen(torch.ones(self.layout.scale_shape, dtype=torch.float32, device=device))
        for row in TENSORS:  # the format's other tensors: none here
            if not hasattr(self, row.name):
                setattr(self, row.name, None)

    @classmethod
    def supports(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot be packed (``None`` when it can): an ``nn.Embedding`` or a scaled word embedding
        (``scalar_embed_scale``) without ``max_norm`` or sparse gradients."""
        if not isinstance(module, nn.Embedding):
            return f"a {type(module).__name__}, not an nn.Embedding"
        if type(module) is not nn.Embedding and not hasattr(module, "scalar_embed_scale"):
            return f"a {type(module).__name__}, whose forward this package does not know (nn.Embedding or a scaled word embedding)"
        if module.max_norm is not None or module.sparse:
            return "an nn.Embedding with max_norm or sparse gradients"
        return None

    @classmethod
    def skeleton_of(cls, module: nn.Module, num_held_out_columns: int) -> "SuperWeightEmbedding":
        """An empty packed embedding shaped like ``module`` (for reload; the checkpoint fills it)."""
        return cls(
            module.num_embeddings, module.embedding_dim, num_held_out_columns=num_held_out_columns,
            padding_idx=module.padding_idx, embed_scale=getattr(module, "scalar_embed_scale", None),
            dense_class=type(module), dtype=module.weight.dtype, device=module.weight.device,
        )

    @classmethod
    def from_embedding(cls, module: nn.Embedding, held_out_columns: Sequence[int] = (), name: str = "embedding") -> "SuperWeightEmbedding":
        """Pack ``module``'s weight, the ``held_out_columns`` kept exact."""
        problem = cls.supports(module)
        if problem:
            raise ValueError(f"{name} is {problem}: embedding_bits=8 cannot pack it. Leave embedding_bits=None.")
        packed = cls.skeleton_of(module, len(held_out_columns))
        codes, scale, values = pack_rows(module.weight, held_out_columns, name)
        packed._set_packed(codes, scale, held_out_columns, values)
        return packed

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[vocab, hidden]`` weight (held-out columns exact)."""
        return _dequantize_rows(self.weight[:, 0], self.weight_scale, self.held_out_columns, self.held_out_values,
                                dtype or self.held_out_values.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        dtype = self.held_out_values.dtype
        out = _dequantize_rows(self.weight[input_ids, 0], self.weight_scale[input_ids], self.held_out_columns,
                               self.held_out_values[input_ids], dtype)
        if self.embed_scale is not None:  # as the scaled word embeddings do: a float32 scalar cast to the weight's dtype
            out = out * torch.tensor(self.embed_scale, dtype=torch.float32).to(dtype)
        return out

    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Embedding:
        """The dense embedding of the class it was packed from (held-out columns exact)."""
        weight = self.dequantize_weight(dtype)
        kwargs = {} if self.embed_scale is None else {"embed_scale": self.embed_scale}
        dense = self.dense_class(self.num_embeddings, self.embedding_dim, self.padding_idx, **kwargs)
        dense.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
        return dense

    @property
    def num_super_weights(self) -> int:
        return 0

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits=8 per row, held_out_columns="
                f"{self.held_out_columns.tolist()}, embed_scale={self.embed_scale}")


class SuperWeightHead(_PackedRows, SuperWeightLinear):
    """The output head ``[vocab, hidden]`` as an 8-bit per-row :class:`SuperWeightLinear` plus exact held-out columns.

    ``forward`` runs the layer's kernel on the input with the held-out channels zeroed, and adds their exact
    contribution, so it is right whether a kernel reads the codes (0 there) or the dense weight (exact there).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, num_held_out_columns: int = 0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, device=device, **EMBEDDING_FORMAT)
        self._register_held_out(out_features, num_held_out_columns, dtype, device)

    @classmethod
    def skeleton_of(cls, linear: nn.Linear, num_held_out_columns: int) -> "SuperWeightHead":
        """An empty packed head shaped like ``linear`` (for reload; the checkpoint fills it)."""
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   num_held_out_columns=num_held_out_columns, dtype=linear.weight.dtype, device=linear.weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, held_out_columns: Sequence[int] = (), name: str = "lm_head") -> "SuperWeightHead":  # type: ignore[override]
        """Pack ``linear``'s weight, the ``held_out_columns`` kept exact."""
        if type(linear) is not nn.Linear:
            raise ValueError(f"{name} is a {type(linear).__name__}, not an nn.Linear: embedding_bits=8 cannot pack it.")
        head = cls.skeleton_of(linear, len(held_out_columns))
        codes, scale, values = pack_rows(linear.weight, held_out_columns, name)
        head._set_packed(codes, scale, held_out_columns, values)
        if linear.bias is not None:
            head.bias.data = linear.bias.detach().clone()
        return head

    def tie_to(self, embedding: SuperWeightEmbedding) -> "SuperWeightHead":
        """Share ``embedding``'s tensors (a tied head); saving stores them once (``_tied_weights_keys``)."""
        for name in PACKED_TENSORS:
            setattr(self, name, getattr(embedding, name))
        # transformers drops a shared tensor at save only when a module declares it tied (modeling_utils'
        # _get_tied_weight_keys reads every submodule's _tied_weights_keys).
        self._tied_weights_keys = {name: name for name in PACKED_TENSORS}
        return self

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight, held-out columns exact."""
        weight = super().dequantize_weight(dtype)
        if self.num_held_out_columns:
            weight[:, self.held_out_columns.long()] = self.held_out_values.to(weight.dtype)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.num_held_out_columns:
            return super().forward(x)
        columns = self.held_out_columns.long()
        masked = x.clone()
        masked[..., columns] = 0
        exact = nn.functional.linear(x[..., columns], self.held_out_values.to(x.dtype))
        return super().forward(masked) + exact

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, held_out_columns={self.held_out_columns.tolist()}"
