"""transformers glue: the ``"superweight"`` quantizer, registered when the package is imported.

The quantizer only wires hooks. Detection lives in :mod:`..detection`, module replacement and checks in
:mod:`.replace`, quantization math in :mod:`..tensor`.

- Full-precision checkpoint + ``SuperWeightConfig``: weights load as usual; the after-load hook detects
  the super weights (unless given), then swaps every targeted linear layer for a low-bit one.
- Compressed checkpoint (``config.json`` carries the method): the before-load hook builds the low-bit
  modules with the checkpoint's names and shapes, so loading is plain assignment (and the reloaded
  model can be saved again), and checks the safetensors headers against them; the after-load hook
  verifies completeness, values, super weights and digests against ``config.json`` (:mod:`.verify`).
- Save: ``get_state_dict_and_metadata`` records each quantized module's content digest in config.json.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from ..config import QUANT_METHOD, SuperWeightConfig
from ..format import DIGEST_ALGORITHM, DIGESTS_METADATA_KEY, read_safetensors_metadata
from ..kernels import prepare_kernels
from ..prompts import model_tokenizer
from ..tensor.rows import single_intra_op_thread
from .loading import SuperWeightQuantize, plan_low_memory
from .plan import fit_to_model, plan_targets
from .saving import attach_save_hook
from .replace import (
    build_quantized_skeleton,
    dequantize_model,
    pack_embeddings_step,
    quantize_model,
    record_results,
    resolve_dtype,
)
from .verify import check_checkpoint_layout, layer_digests, read_checkpoint_index, verify_quantized_model

__all__ = ["SuperWeightQuantizer", "register"]

logger = logging.getLogger(__name__)


class SuperWeightQuantizer(HfQuantizer):
    """Quantizer behind ``SuperWeightConfig``; created by transformers, not by users."""

    requires_calibration = False

    def __init__(self, quantization_config: SuperWeightConfig, **kwargs: Any) -> None:
        # The caller's config is a request that may load several models: work on a copy, never write to it.
        quantization_config = copy.deepcopy(quantization_config)
        super().__init__(quantization_config, **kwargs)
        self.quantization_config: SuperWeightConfig = quantization_config
        quantization_config.post_init()  # again: fields may have been assigned after construction
        self._low_memory = None  # LowMemoryPlan while quantizing on load (see .loading)
        self._index = None  # the compressed checkpoint's safetensors header index (see .verify)
        self._metadata = None  # and the header metadata of its files

    # -- environment --------------------------------------------------------------------------------------
    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict):
            devices = {str(d) for d in device_map.values()}
            accelerators = devices - {"cpu", "disk"}
            if "disk" in devices or ("cpu" in devices and accelerators):
                raise ValueError(
                    f"device_map={device_map!r} offloads modules to {'disk' if 'disk' in devices else 'CPU'}: "
                    "offloaded modules are empty (meta) when optimum-superweight builds its low-bit layers, which "
                    "would give a model that silently outputs NaN. Use a map that places every module on a real "
                    "device (e.g. device_map='cpu', or 'auto' with enough max_memory), or quantize first and load "
                    "the smaller compressed checkpoint."
                )

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    # -- hooks ----------------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        if self.pre_quantized:
            build_quantized_skeleton(model, self.quantization_config, embeddings=True)
            self._index = read_checkpoint_index(kwargs.get("checkpoint_files"))
            if self._index is not None:  # before transformers casts, drops or re-initialises a tensor
                check_checkpoint_layout(model, self._index)
                self._metadata = read_safetensors_metadata(sorted({e.file for e in self._index.values()}))
        else:
            self.quantization_config = fit_to_model(model, self.quantization_config)
        if not self.pre_quantized and self.quantization_config.low_memory:
            self._low_memory = plan_low_memory(model, self.quantization_config, kwargs.get("checkpoint_files"))
        return model

    # -- quantize while loading (low_memory=True): each full-precision weight is quantized as it arrives -----
    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        return self._low_memory is not None and param_name in self._low_memory.weights

    def get_quantize_ops(self):
        return SuperWeightQuantize(self._low_memory)

    def _finish_low_memory(self, model):
        from ..hub.push import attach_card_hook

        plan, self._low_memory = self._low_memory, None
        missing = sorted(set(plan.weights) - plan.done)
        if plan.errors or missing:
            raise ValueError(
                "Quantizing while loading failed: " + "; ".join(plan.errors or [f"never received {missing[:3]}"])
            )
        with torch.no_grad():
            result = pack_embeddings_step(model, plan.config, plan.result())
        record_results(model, plan.config, result)
        self.quantization_config = model.config.quantization_config
        verify_quantized_model(model, self.quantization_config, loaded_by_transformers=True)
        # No prepare_kernels here: kernel states (float32 copies of scales and offsets) would raise the load's
        # peak, which is what low_memory bounds; they are built at the first forward instead.
        return attach_save_hook(attach_card_hook(model))

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        from ..hub.push import attach_card_hook

        config = self.quantization_config
        if self._low_memory is not None:
            return self._finish_low_memory(model)
        if self.pre_quantized:
            index, metadata, self._index, self._metadata = self._index, self._metadata, None, None
            verify_quantized_model(
                model, config, loaded_by_transformers=True, pre_quantized=True, index=index, metadata=metadata
            )
            prepare_kernels(model)  # build kernel layouts now and log which kernel each layer uses
            # model.push_to_hub() must publish the coordinates, not transformers' default card.
            return attach_save_hook(attach_card_hook(model))
        # One intra-op thread for detection, calibration and building (thousands of small operations whose
        # parallel regions collapse on a busy machine: benchmarks/RESULTS.md, "Quantize time on a busy machine");
        # the fitting pool still uses the cores the caller allowed (tensor/rows.py).
        with torch.no_grad(), single_intra_op_thread():
            # NaN/inf would make detection and calibration fail obscurely: refuse them first, by module and coordinate.
            plan_targets(model, config)
            records = config.get_super_weights()
            tokenizer = model_tokenizer(model) if (config.needs_calibration or (not records and config.detect)) else None
            if not records and config.detect:
                from ..detection import records_to_keep, run_detection

                report = run_detection(config.detection, model=model, tokenizer=tokenizer)
                records = records_to_keep(report)
                logger.info("optimum-superweight detected %d super weight(s).", len(records))
            # GPTQ calibrates on built-in text; without a tokenizer it falls back to fixed token ids.
            quantize_model(model, config, records, tokenizer=tokenizer)  # records the results on model.config
        self.quantization_config = model.config.quantization_config
        prepare_kernels(model)
        return attach_save_hook(attach_card_hook(model))

    # -- save ------------------------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model):
        """Called by ``save_pretrained`` before config.json is written: record each quantized module's digest."""
        config = getattr(model.config, "quantization_config", None)
        if not isinstance(config, SuperWeightConfig):
            return None, {}
        config.digests = layer_digests(model)
        # The weight files say that config.json carries digests: removing them from config.json alone is caught.
        return None, {DIGESTS_METADATA_KEY: DIGEST_ALGORITHM}

    # -- capabilities ---------------------------------------------------------------------------------------
    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Adapters (PEFT LoRA, optimum_superweight.peft) train on weight-only layers: their backward gives the
        # input's gradient from the packed weight (nn/autograd.py). W8A8 layers quantize their input: no gradient.
        return not self.quantization_config.activations.enabled

    @property
    def is_compileable(self) -> bool:
        # Weight-only and W8A8 layers run as one torch.library op each (kernels/ops.py): no graph break in a
        # decode step, so generate() may compile with a static cache. The bitsandbytes NF4 layers are not ours to vouch for.
        return self.quantization_config.weight_format != "bnb-nf4"

    def _dequantize(self, model, dtype: torch.dtype | str | None = None):
        # transformers passes model.config.dtype: a string ("float32") once the config was saved or reloaded.
        return dequantize_model(model, resolve_dtype(dtype))


def register() -> None:
    """Register the method with transformers; a second call (or a second import) is a no-op."""
    for mapping, cls in ((AUTO_QUANTIZATION_CONFIG_MAPPING, SuperWeightConfig), (AUTO_QUANTIZER_MAPPING, SuperWeightQuantizer)):
        existing = mapping.get(QUANT_METHOD)
        if existing is None or existing.__qualname__ == cls.__qualname__:
            mapping[QUANT_METHOD] = cls
        else:
            raise ValueError(
                f"The quantization method '{QUANT_METHOD}' is already registered by {existing.__module__}."
                f"{existing.__qualname__}; uninstall the conflicting package."
            )

