"""Row-block quantization: the codes of whole matrices computed a block of rows at a time, blocks in parallel.

Groups lie within a row, so the result equals the whole-matrix computation while the temporaries stay those
of one block. Both quantize paths (in memory, :func:`optimum_superweight.models.replace.quantize_model`, and
while loading, :mod:`optimum_superweight.models.loading`) call :func:`quantize_layers` (or
:func:`quantize_by_rows`, its one-matrix form), so they write the same codes.

Threads: choosing codes (HQQ's grid fit above all) is thousands of small elementwise operations per block. With
torch's intra-op threads each of them is a parallel region whose threads wait on each other, and on a machine
whose cores are busy with other work every such hand-off waits for a descheduled thread: measured 10x slower
on two threads than on one under load (``benchmarks/RESULTS.md``, "Quantize time under load"). So every block
runs on one intra-op thread and the cores are used by fitting several blocks (of one layer or of several) at
once in a thread pool: torch releases the GIL inside each operation. The pool has as many workers as torch
has threads (:func:`fitting_workers`), so ``torch.set_num_threads(1)`` or ``OMP_NUM_THREADS=1`` still mean one
core. The blocks are the same computation whichever thread runs them, so the codes are bit-identical to one
block after the other.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from ..config import SuperWeightConfig
from .methods import code_chooser, code_settings
from .quantize import GroupLayout, QuantizedWeight

__all__ = ["BLOCK_BYTES", "MIN_BLOCK_ROWS", "LayerWeight", "quantize_by_rows", "quantize_layers", "fitting_workers",
           "allowed_threads", "allowed_intra_op_threads", "single_intra_op_thread"]

#: Rows quantized together hold at most this many bytes of float32: the quantization temporaries (about ten
#: times the block: float32 copies, masks, int64 packing words) then stay a few MiB whatever the matrix size.
BLOCK_BYTES = 2 * 2**20
#: A layer is cut into smaller blocks so that every worker has one, but never below this many rows: below,
#: the per-operation overhead outweighs the second core.
MIN_BLOCK_ROWS = 64


@dataclass(frozen=True)
class LayerWeight:
    """One matrix to quantize: its ``[out, in]`` weight, the ``(row, col)`` coordinates kept exact, and the
    inputs' statistics (``E[x xᵀ]`` or its diagonal) for the methods that read them."""

    weight: torch.Tensor
    coordinates: list[tuple[int, int]]
    hessian: torch.Tensor | None = None


_allowed = threading.local()  # .threads: the caller's count while single_intra_op_thread() runs in this thread


def allowed_threads() -> int:
    """The cores the user allowed: torch's intra-op thread count, or, inside :func:`single_intra_op_thread`, the
    count its (outermost) caller had.

    >>> with single_intra_op_thread():
    ...     allowed_threads() == torch.get_num_threads() or torch.get_num_threads() == 1
    True
    """
    return getattr(_allowed, "threads", None) or torch.get_num_threads()


def fitting_workers(blocks: int) -> int:
    """Threads that fit blocks at once: the cores the user allowed (:func:`allowed_threads`: torch's intra-op
    thread count), at most one per block.

    >>> fitting_workers(1)
    1
    """
    return max(1, min(allowed_threads(), blocks))


@contextlib.contextmanager
def single_intra_op_thread() -> Iterator[None]:
    """Run the body with one torch intra-op thread; the caller's count is restored after, and meanwhile is what
    :func:`allowed_threads` (so the fitting pool's size) says.

    torch keeps the count per thread (OpenMP) and a process-wide default that threads started meanwhile adopt:
    both are set here, so a pool started inside inherits one thread.

    >>> with single_intra_op_thread():
    ...     torch.get_num_threads()
    1
    """
    before = torch.get_num_threads()
    outer = getattr(_allowed, "threads", None)
    _allowed.threads = outer or before
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        _allowed.threads = outer
        if before != 1:
            torch.set_num_threads(before)


@contextlib.contextmanager
def allowed_intra_op_threads() -> Iterator[None]:
    """Inside :func:`single_intra_op_thread`, run the body on the caller's intra-op threads again (large linear
    algebra, e.g. GPTQ's column sweep, whose few big operations gain from them); elsewhere a no-op.

    >>> with single_intra_op_thread(), allowed_intra_op_threads():
    ...     torch.get_num_threads() == allowed_threads()
    True
    """
    before, wanted = torch.get_num_threads(), allowed_threads()
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if wanted != before:
            torch.set_num_threads(before)


def _block_rows(layer: LayerWeight, workers: int) -> int:
    out_features, in_features = layer.weight.shape
    rows = max(1, BLOCK_BYTES // (4 * in_features))
    if workers > 1:  # one layer alone (quantize-on-load) still gives every worker a block
        rows = min(rows, max(MIN_BLOCK_ROWS, -(-out_features // workers)))
    return rows


def quantize_layers(
    layers: Mapping[str, LayerWeight],
    config: SuperWeightConfig,
    *,
    workers: int | None = None,
    on_layer: Callable[[str], None] | None = None,
) -> dict[str, QuantizedWeight]:
    """The codes of every layer of ``layers``, chosen as ``config`` asks (:func:`~.methods.code_chooser`), in row
    blocks fitted ``workers`` at a time (default :func:`fitting_workers`) on one intra-op thread each.

    ``on_layer(name)`` is called (from the calling thread) as each layer is finished, e.g. to advance a progress
    bar. ``workers=1`` runs the blocks one after the other on the caller's threads, as before the pool existed.

    >>> layers = {"a": LayerWeight(torch.randn(300, 64), [(5, 7)]), "b": LayerWeight(torch.randn(8, 64), [])}
    >>> codes = quantize_layers(layers, SuperWeightConfig(bits=4, group_size=32))
    >>> codes["a"].packed.shape, codes["b"].packed.shape
    (torch.Size([300, 2, 16]), torch.Size([8, 2, 16]))
    """
    choose, settings = code_chooser(config), code_settings(config)
    wanted = allowed_threads() if workers is None else workers
    blocks: list[tuple[str, int, int]] = []
    for name, layer in layers.items():
        rows = _block_rows(layer, wanted if len(layers) < wanted else 1)
        blocks += [(name, start, min(start + rows, layer.weight.shape[0])) for start in range(0, layer.weight.shape[0], rows)]
    workers = fitting_workers(len(blocks)) if workers is None else workers

    def fit(block: tuple[str, int, int]) -> QuantizedWeight:
        name, start, stop = block
        layer = layers[name]
        held = torch.tensor(layer.coordinates, dtype=torch.int32).reshape(-1, 2)
        inside = held[(held[:, 0] >= start) & (held[:, 0] < stop)] - torch.tensor([start, 0], dtype=torch.int32)
        with torch.no_grad():  # grad mode is per thread: a pool thread does not inherit the caller's
            return choose(layer.weight[start:stop], settings, inside.to(layer.weight.device), layer.hessian)

    parts: dict[str, dict[int, QuantizedWeight]] = {name: {} for name in layers}
    remaining = Counter(name for name, _, _ in blocks)
    results: dict[str, QuantizedWeight] = {}

    def finished(block: tuple[str, int, int], part: QuantizedWeight) -> None:
        name = block[0]
        parts[name][block[1]] = part
        remaining[name] -= 1
        if remaining[name] == 0:
            results[name] = _joined(layers[name], [parts[name][s] for s in sorted(parts[name])], config)
            del parts[name]
            if on_layer is not None:
                on_layer(name)

    if workers <= 1 or len(blocks) <= 1:
        for block in blocks:
            finished(block, fit(block))
    else:
        _run_pool(blocks, fit, finished, workers)
    return {name: results[name] for name in layers}


def _run_pool(blocks: list, fit: Callable, finished: Callable, workers: int) -> None:
    """``fit`` every block on ``workers`` threads of one intra-op thread each; ``finished`` in the calling thread."""
    with single_intra_op_thread():
        pool = ThreadPoolExecutor(workers, thread_name_prefix="superweight-fit", initializer=torch.set_num_threads,
                                  initargs=(1,))
        try:
            futures: dict[Future, tuple] = {pool.submit(fit, block): block for block in blocks}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    finished(futures[future], future.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _joined(layer: LayerWeight, parts: list[QuantizedWeight], config: SuperWeightConfig) -> QuantizedWeight:
    out_features, in_features = layer.weight.shape
    zero_points = [p.zero_point for p in parts]
    offsets = [p.offset for p in parts]
    return QuantizedWeight(
        packed=torch.cat([p.packed for p in parts]),
        scale=torch.cat([p.scale for p in parts]),
        zero_point=None if zero_points[0] is None else torch.cat(zero_points),
        layout=GroupLayout(out_features, in_features, config.bits, config.group_size),
        symmetric=config.symmetric,
        offset=None if offsets[0] is None else torch.cat(offsets),
    )


def quantize_by_rows(
    weight: torch.Tensor, coordinates: list[tuple[int, int]], config: SuperWeightConfig, hessian: torch.Tensor | None = None,
    *, workers: int | None = None,
) -> QuantizedWeight:
    """The codes of ``weight`` chosen as ``config`` asks (:func:`~.methods.code_chooser`), a block of rows at a time
    (:func:`quantize_layers` with one layer).

    ``hessian`` (the inputs' ``E[x xᵀ]``, or only its diagonal) is given to the chooser, which reads it when it
    needs it (the clip search with ``config.clip_objective == "output"``, HQQ grids weighted by activations);
    those objectives are per row too, so row blocks change nothing. GPTQ's codes do not come from here (:func:`~.methods.code_method` batches its layers instead).

    Groups lie within a row, so every scale, code and zero-point equals the whole-matrix computation's (the
    in-memory path's), but the temporaries are those of one block instead of ~10x the weight: for a 16384 x
    53248 down projection that is the difference between ~35 GB and ~20 MB of transient private memory.

    >>> q = quantize_by_rows(torch.randn(300, 64), [(5, 7)], SuperWeightConfig(bits=4, group_size=32))
    >>> q.packed.shape
    torch.Size([300, 2, 16])
    """
    return quantize_layers({"": LayerWeight(weight, list(coordinates), hessian)}, config, workers=workers)[""]
