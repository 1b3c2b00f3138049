"""Peak memory of quantize-on-load (``SuperWeightConfig(low_memory=True)``) against model size, under a cap.

Synthetic Llamas (random weights, a super weight planted by ``optimum_superweight.testing``) are saved as
float32 safetensors shards; each load runs in a fresh subprocess that samples its own ``RssAnon`` (private
memory: what has to fit in RAM) and ``RssFile`` (pages of the memory-mapped shards: reclaimable page cache):

- ``import``: python + torch + transformers + optimum_superweight imported (the fixed overhead);
- ``low_memory``: ``from_pretrained(..., SuperWeightConfig(low_memory=True))`` with streaming detection;
- ``stream_detect``: ``detect_super_weights_streaming(folder)`` alone;
- ``in_memory``: the default path (full-precision load, detection, then quantization), for comparison;
- ``*_bf16``: the same loads with ``dtype=torch.bfloat16`` (the README's advice for the fast CPU kernels): the
  in-memory path then holds a converted private copy of the whole model, quantize-on-load one tensor.

**The cap.** Where this machine lets us create a cgroup (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``)
below our own, every load also runs inside one limited to ``--cap-mib``: the kernel charges the child's private
memory *and* the page cache it reads, reclaims clean file pages under pressure and OOM-kills the child when
private memory alone exceeds the limit. The shards' cache is dropped before each run so their pages are charged
to it. ``RLIMIT_DATA`` cannot serve as the cap: safetensors maps shards with
``torch.UntypedStorage.from_file(shared=False)``, a private *writable* (copy-on-write) mapping, which
``RLIMIT_DATA`` counts in full although its pages are clean file pages.

**The bound** (issue 7's goal): peak private memory <= import overhead + compressed model + two decoder layers in
float32 + ``FIXED_SLACK`` (activations of the detection prompts, allocator slack), flat in the number of layers.

    python3 benchmarks/low_memory.py                  # 8/24/56 layers (0.27/0.81/1.9 GiB fp32), cap 640 MiB: ~15 min
    python3 benchmarks/low_memory.py --sizes 2 4      # number of decoder layers per model (~34 MiB fp32 each)
    python3 benchmarks/low_memory.py --cap-mib 0      # no cap, measurement only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIB = 2**20

#: Hidden 1024, intermediate 2816, 8 heads (2 KV heads): ~34 MiB of float32 per decoder layer.
MODEL_SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 2}
PLANTED = ((1, 5, 7),)  # (layer, row, col): a super weight in layer 1
PLANTED_MODULE = ["model.layers.1.mlp.down_proj", 5, 7]
#: Activations of the detection prompts + allocator slack, the "fixed overhead" of the bound (beyond the import).
FIXED_SLACK = 48 * MIB
MODES = ("low_memory", "stream_detect", "in_memory", "low_memory_bf16", "in_memory_bf16")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def drop_page_cache(folder: str) -> None:
    """Evict the folder's files from the page cache, so the next reader's cgroup is charged for them."""
    for path in Path(folder).iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def make_checkpoint(folder: str, num_layers: int, shard_mb: int = 100, shape: dict | None = None) -> dict:
    """Save a synthetic float32 Llama with ``num_layers`` layers and a planted super weight as shards.

    Returns ``{"layers", "fp32_bytes", "layer_fp32_bytes"}`` (whole model, one decoder layer).
    """
    import torch

    from optimum_superweight.testing import build_tiny_model

    model = build_tiny_model("llama", super_weights=PLANTED, num_hidden_layers=num_layers, **(shape or MODEL_SHAPE))
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    model.save_pretrained(folder, max_shard_size=f"{shard_mb}MB")
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    drop_page_cache(folder)
    return {"layers": num_layers, "fp32_bytes": fp32_bytes, "layer_fp32_bytes": layer_bytes}


# ---------------------------------------------------------------------------------------------------------------
# The cap: a cgroup below our own
# ---------------------------------------------------------------------------------------------------------------
class CapUnavailable(RuntimeError):
    """No memory cgroup can be created here; the message says why."""


class MemoryCap:
    """A memory cgroup (v1 or v2) below this process's own, limited to ``limit_bytes``, for one child process.

    >>> cap = MemoryCap.create(512 * 2**20)  # doctest: +SKIP
    >>> subprocess.run(cmd, preexec_fn=cap.join); cap.oom_kills(); cap.close()  # doctest: +SKIP
    """

    def __init__(self, path: Path, version: int, limit_bytes: int) -> None:
        self.path, self.version, self.limit_bytes = path, version, limit_bytes

    @staticmethod
    def _own_cgroup() -> tuple[Path, int]:
        """The directory of this process's memory cgroup and the hierarchy version; CapUnavailable if none."""
        if not sys.platform.startswith("linux"):
            raise CapUnavailable(f"memory cgroups are Linux-only (this is {sys.platform})")
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
            mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        except OSError as error:
            raise CapUnavailable(f"cannot read /proc/self/cgroup or mountinfo: {error}") from error
        v1 = {}
        v2_path = None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                v2_path = path
            elif "memory" in controllers.split(","):
                v1["memory"] = path
        for mount in mounts:
            left, _, right = mount.partition(" - ")
            fields, rfields = left.split(), right.split()
            root, point, fstype = fields[3], fields[4], rfields[0]
            if fstype == "cgroup" and "memory" in v1 and "memory" in rfields[-1].split(","):
                own = v1["memory"]
                relative = own[len(root):] if own.startswith(root) else own
                return Path(point + "/" + relative.lstrip("/")), 1
            if fstype == "cgroup2" and v2_path is not None and "memory" not in v1:
                relative = v2_path[len(root):] if v2_path.startswith(root) else v2_path
                return Path(point + "/" + relative.lstrip("/")), 2
        raise CapUnavailable("no memory cgroup controller is mounted (neither cgroup v1 'memory' nor cgroup2)")

    @classmethod
    def create(cls, limit_bytes: int) -> "MemoryCap":
        """Create the limited cgroup; raises :class:`CapUnavailable` with the reason when this is not allowed."""
        own, version = cls._own_cgroup()
        path = own / f"superweight_cap_{os.getpid()}_{time.monotonic_ns()}"
        try:
            path.mkdir()
        except OSError as error:
            raise CapUnavailable(f"cannot create a cgroup under {own} ({error.strerror})") from error
        limit_file = path / ("memory.limit_in_bytes" if version == 1 else "memory.max")
        try:
            if not limit_file.exists():
                raise CapUnavailable(f"{own} does not delegate the memory controller to child cgroups (cgroup v{version})")
            limit_file.write_text(str(int(limit_bytes)))
            if version == 1:
                (path / "memory.memsw.limit_in_bytes").exists() and (path / "memory.memsw.limit_in_bytes").write_text(str(int(limit_bytes)))
            else:
                (path / "memory.swap.max").exists() and (path / "memory.swap.max").write_text("0")
            granted = int(limit_file.read_text().strip())
            if abs(granted - limit_bytes) > 2 * 4096 * 64:
                raise CapUnavailable(f"the kernel set the limit to {granted} bytes instead of {limit_bytes}")
        except (OSError, CapUnavailable) as error:
            path.rmdir()
            if isinstance(error, CapUnavailable):
                raise
            raise CapUnavailable(f"cannot set a memory limit on {path} ({error})") from error
        return cls(path, version, int(limit_bytes))

    def join(self) -> None:
        """Move the calling process into the cgroup (``preexec_fn`` of the capped child)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int | None:
        """Peak memory charged to the cgroup (private + page cache), if the kernel reports it."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text().strip())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        """How many processes the cgroup's OOM killer killed."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def close(self) -> None:
        for _ in range(50):  # the child may take a moment to leave after it exits
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def cap_support(limit_bytes: int = 256 * MIB) -> str | None:
    """``None`` if a memory cap can be enforced here, else the reason it cannot."""
    try:
        MemoryCap.create(limit_bytes).close()
    except CapUnavailable as error:
        return str(error)
    return None


# ---------------------------------------------------------------------------------------------------------------
# One load in a fresh process
# ---------------------------------------------------------------------------------------------------------------
CHILD = r"""
import json, re, resource, sys, threading, time
mode, folder = sys.argv[1], sys.argv[2]
# Peak RSS counts file pages of the memory-mapped shards (reclaimable page cache) as well as private
# memory; a sampler splits the peak into RssAnon (what must fit) and RssFile (mapped checkpoint pages).
peaks = {"RssAnon": 0, "RssFile": 0}
def sample():
    while True:
        status = open("/proc/self/status").read()
        for key in peaks:
            peaks[key] = max(peaks[key], int(re.search(key + r":\s+(\d+)", status).group(1)) * 1024)
        time.sleep(0.003)
threading.Thread(target=sample, daemon=True).start()
import torch
torch.set_num_threads(1)
import optimum_superweight
from optimum_superweight import SuperWeightConfig
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging
hf_logging.disable_progress_bar()
result = {"mode": mode}
kwargs = {"dtype": torch.bfloat16} if mode.endswith("_bf16") else {}
base = mode.removesuffix("_bf16")
start = time.perf_counter()
if base in ("low_memory", "in_memory"):
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=SuperWeightConfig(low_memory=base == "low_memory"), **kwargs
    )
    from optimum_superweight.models.replace import compressed_size_bytes
    result["compressed_bytes"] = compressed_size_bytes(model)
    result["super_weights"] = [[s["module"], s["row"], s["col"]] for s in model.config.quantization_config.super_weights]
elif base == "fp32_copy":  # control: the float32 model in private memory, what the cap must forbid
    import glob
    from safetensors.torch import load_file
    tensors = [t.clone() for f in sorted(glob.glob(folder + "/*.safetensors")) for t in load_file(f).values()]
    result["copied_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
elif base == "stream_detect":
    from optimum_superweight.streaming import detect_super_weights_streaming
    report = detect_super_weights_streaming(folder)
    result["super_weights"] = [[s.module, s.row, s.col] for s in report.candidates]
result["seconds"] = time.perf_counter() - start
time.sleep(0.02)
# VmHWM, not ru_maxrss: a child forked (to join the cgroup) from a parent holding a big model inherits the
# parent's RSS in ru_maxrss across exec; VmHWM belongs to this process's own address space.
result["peak_rss_bytes"] = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
result["peak_anon_bytes"], result["peak_file_bytes"] = peaks["RssAnon"], peaks["RssFile"]
print("RESULT " + json.dumps(result))
"""


def measure(mode: str, folder: str, cap_bytes: int | None = None, timeout: float = 1800) -> dict:
    """Run one load in a fresh process (inside a cgroup limited to ``cap_bytes`` if given).

    Returns the child's result (peak RSS/anon/file bytes, seconds, super weights found) plus ``passed`` and, under
    a cap, ``cap_bytes``, ``cgroup_peak_bytes`` and ``oom_kills``. A capped child killed by the OOM killer gives
    ``passed=False``; any other failure raises.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    # Measure what a user gets: no allocator tuning through the environment.
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    cap = MemoryCap.create(cap_bytes) if cap_bytes else None
    if os.path.isdir(folder) and any(Path(folder).iterdir()):
        drop_page_cache(folder)
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, mode, folder], capture_output=True, text=True, env=env, timeout=timeout,
            preexec_fn=cap.join if cap else None,
        )
        extra = {"cap_bytes": cap_bytes, "cgroup_peak_bytes": cap.peak_bytes(), "oom_kills": cap.oom_kills()} if cap else {}
    finally:
        if cap:
            cap.close()
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        if cap and (extra["oom_kills"] or done.returncode == -9):
            return {"mode": mode, "passed": False, "returncode": done.returncode, **extra}
        raise RuntimeError(f"{mode} on {folder} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "passed": True, **extra}


def bound_bytes(import_anon: int, compressed: int, layer_fp32: int) -> int:
    """Issue 7's bound on peak private memory: import + compressed model + two fp32 decoder layers + FIXED_SLACK."""
    return import_anon + compressed + 2 * layer_fp32 + FIXED_SLACK


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def _mib(value) -> str:
    return "–" if value is None else f"{value / MIB:.0f}"


def _cell(result: dict | None, key: str = "peak_anon_bytes") -> str:
    if result is None:
        return "–"
    if not result.get("passed", True):
        return "**OOM-killed**"
    return _mib(result.get(key))


def low_memory_markdown(results: dict) -> str:
    """The benchmark's Markdown section (table + method) from ``benchmarks/results/low_memory.json``.

    >>> print(low_memory_markdown(json.loads(Path("benchmarks/results/low_memory.json").read_text())))  # doctest: +SKIP
    """
    rows = results["rows"]
    cap = results.get("cap_bytes")
    lines = ["## Big models: memory while quantizing on load", ""]
    cap_text = (
        f"inside a cgroup limited to **{_mib(cap)} MiB** (private memory + page cache)" if cap
        else f"without an enforced cap ({results.get('cap_unavailable') or 'no cap requested'})"
    )
    lines += [
        f"Synthetic Llamas ({MODEL_SHAPE['hidden_size']} hidden, {MODEL_SHAPE['intermediate_size']} intermediate, "
        "planted super weight), float32 safetensors shards; each load in a fresh process " + cap_text + ". "
        "MiB of peak private memory (RssAnon) unless noted; *total* adds the mapped checkpoint pages (RssFile), "
        "which are reclaimable page cache.",
        "",
        "| layers | fp32 checkpoint | × cap | compressed | quantize-on-load peak private (total) | bound | within | "
        "stream detect peak private | in-memory peak private | in-memory bf16 peak private | quantize-on-load bf16 | s/GB |",
        "|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lm = row["low_memory"]
        ratio = f"{row['fp32_bytes'] / cap:.1f}" if cap else "–"
        within = "yes" if lm.get("passed", True) and lm["peak_anon_bytes"] <= row["bound_bytes"] else "**no**"
        total = f"{_mib(lm.get('peak_anon_bytes'))} ({_mib(lm.get('peak_rss_bytes'))})" if lm.get("passed", True) else "**OOM-killed**"
        lines.append(
            f"| {row['layers']} | {_mib(row['fp32_bytes'])} MiB | {ratio} | {_mib(lm.get('compressed_bytes'))} | {total} | "
            f"{_mib(row['bound_bytes'])} | {within} | {_cell(row.get('stream_detect'))} | {_cell(row.get('in_memory'))} | "
            f"{_cell(row.get('in_memory_bf16'))} | {_cell(row.get('low_memory_bf16'))} | "
            f"{row['low_memory_seconds_per_gb']:.0f} |"
        )
    overhead = results["import_overhead"]

    def killed(mode: str) -> str:
        sizes = [str(r["layers"]) for r in rows if mode in r and not r[mode].get("passed", True)]
        return ", ".join(sizes) + " layers" if sizes else "no size"

    largest = rows[-1]
    flat = [r["low_memory"]["peak_anon_bytes"] - r["low_memory"]["compressed_bytes"] for r in rows if r["low_memory"].get("passed")]
    lines += [
        "",
        f"Bound = import overhead ({_mib(overhead['peak_anon_bytes'])} MiB private) + compressed model + two decoder "
        f"layers in float32 ({_mib(rows[0]['layer_fp32_bytes'] * 2)} MiB) + {_mib(FIXED_SLACK)} MiB for activations "
        "and allocator slack. Quantize-on-load (`SuperWeightConfig(low_memory=True)`, streaming detection included) "
        + (f"passed under the cap at every size, the largest checkpoint being {largest['fp32_bytes'] / cap:.1f}x the cap, "
           if cap and all(r["low_memory"].get("passed") for r in rows) else "")
        + "and stayed within the bound"
        + (f": peak private memory minus the compressed model was {_mib(min(flat))}–{_mib(max(flat))} MiB from "
           f"{rows[0]['layers']} to {largest['layers']} layers, flat." if flat else ".")
        + " The default path (`low_memory=False`) maps the float32 shards copy-on-write, so its weights are page "
        "cache rather than private memory, but nothing bounds its private memory (detection with ablation passes; "
        "in the recorded run also whole-matrix quantization temporaries, which it no longer makes: it now quantizes "
        f"in row blocks too): OOM-killed at {killed('in_memory')}, run-to-run variable. "
        f"Loaded with `dtype=torch.bfloat16` the in-memory path holds a private copy of the model (killed at "
        f"{killed('in_memory_bf16')}); quantize-on-load in bfloat16 converts one tensor at a time but the CPU kernel "
        "layouts built at the end of loading (`prepare_kernels`, about the compressed size again, plus temporaries) "
        f"cost more (killed at {killed('low_memory_bf16')}): quantize big models in float32 (the default). Other "
        "trade-offs of `low_memory=True`: no GPTQ, detection without ablation confirmation. *total* is peak RSS "
        "(VmHWM) and includes library pages charged elsewhere, so it can exceed the cap. s/GB: seconds of "
        "quantize-on-load (detection included) per GB of float32 checkpoint, one thread on a shared 2-core machine "
        "(noisy; the smallest size is dominated by fixed costs). RLIMIT_DATA cannot serve as the cap: safetensors maps "
        "shards private-writable, which it counts in full. `python3 benchmarks/low_memory.py`.",
    ]
    if results.get("plot"):
        lines += ["", f"![memory while quantizing on load]({results['plot']})"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> bool:
    """Peak private memory against fp32 checkpoint size (PNG); False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = results["rows"]
    size = [r["fp32_bytes"] / MIB for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series = [
        ("low_memory", "quantize-on-load, private", "-o"),
        ("stream_detect", "streaming detection, private", "-s"),
        ("in_memory", "in-memory (fp32), private", "--^"),
        ("in_memory_bf16", "in-memory, dtype=bf16, private", "--v"),
    ]
    for key, label, style in series:
        points = [(s, r[key]["peak_anon_bytes"] / MIB) for s, r in zip(size, rows) if r.get(key, {}).get("passed")]
        if points:
            ax.plot(*zip(*points), style, label=label)
        killed = [s for s, r in zip(size, rows) if key in r and not r[key].get("passed", True)]
        if killed:
            ax.plot(killed, [results["cap_bytes"] / MIB] * len(killed), "x", color="red", markersize=10,
                    label=f"{label.split(',')[0]}{', bf16' if 'bf16' in key else ''}: OOM-killed")
    ax.plot(size, [r["low_memory"]["peak_rss_bytes"] / MIB if r["low_memory"].get("passed") else float("nan") for r in rows],
            ":o", label="quantize-on-load, total RSS (incl. page cache)")
    ax.plot(size, [r["bound_bytes"] / MIB for r in rows], "-", color="gray", alpha=0.6, label="bound")
    ax.plot(size, size, ":", color="black", alpha=0.4, label="fp32 checkpoint size")
    if results.get("cap_bytes"):
        ax.axhline(results["cap_bytes"] / MIB, color="red", alpha=0.5, label="cgroup cap")
    ax.set_xlabel("float32 checkpoint (MiB)")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title("Quantize on load: memory vs model size")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 24, 56], help="decoder layers per model")
    parser.add_argument("--cap-mib", type=int, default=640, help="cgroup memory limit for every load (0: none)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--in-memory-max", type=int, default=10**6, help="largest model (layers) also loaded in memory")
    parser.add_argument("--out", default=str(HERE / "results" / "low_memory.json"))
    parser.add_argument("--report-only", action="store_true", help="print the Markdown from --out and exit")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:  # run as a script from anywhere
        sys.path.insert(0, str(ROOT))
    out = Path(args.out)
    if args.report_only:
        print(low_memory_markdown(json.loads(out.read_text())))
        return 0
    cap_bytes = args.cap_mib * MIB or None
    unavailable = cap_support() if cap_bytes else "no cap requested (--cap-mib 0)"
    if unavailable and cap_bytes:
        print(f"memory cap not enforced: {unavailable}", flush=True)
        cap_bytes = None
    rows = []
    with tempfile.TemporaryDirectory() as empty:
        overhead = measure("import", empty, cap_bytes)
    print(f"import overhead: {_mib(overhead['peak_rss_bytes'])} MiB (private {_mib(overhead['peak_anon_bytes'])})"
          + (f"; cap {_mib(cap_bytes)} MiB" if cap_bytes else ""), flush=True)
    for layers in args.sizes:
        folder = tempfile.mkdtemp(prefix=f"lowmem{layers}_")
        try:
            started = time.perf_counter()
            row = dict(make_checkpoint(folder, layers))
            print(f"{layers} layers: checkpoint {_mib(row['fp32_bytes'])} MiB in {time.perf_counter() - started:.0f} s", flush=True)
            for mode in args.modes:
                if mode.startswith("in_memory") and layers > args.in_memory_max:
                    continue
                row[mode] = result = measure(mode, folder, cap_bytes)
                found = result.get("super_weights")
                if result["passed"] and found != [PLANTED_MODULE]:
                    raise RuntimeError(f"{mode} on {layers} layers found {found}, expected {[PLANTED_MODULE]}")
                print(f"  {mode:16s} " + (
                    f"peak private {_mib(result['peak_anon_bytes'])} MiB, total {_mib(result['peak_rss_bytes'])} MiB, "
                    f"{result['seconds']:.1f} s" if result["passed"] else f"OOM-killed under the {_mib(cap_bytes)} MiB cap"
                ), flush=True)
            lm = row["low_memory"]
            row["low_memory_seconds_per_gb"] = lm["seconds"] / (row["fp32_bytes"] / 1e9) if lm["passed"] else None
            row["bound_bytes"] = bound_bytes(overhead["peak_anon_bytes"], lm.get("compressed_bytes", 0), row["layer_fp32_bytes"])
            row["within_bound"] = bool(lm["passed"] and lm["peak_anon_bytes"] <= row["bound_bytes"])
            print(f"  bound {_mib(row['bound_bytes'])} MiB: {'within' if row['within_bound'] else 'EXCEEDED'}", flush=True)
            rows.append(row)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    results = {
        "import_overhead": overhead, "model_shape": MODEL_SHAPE, "planted": PLANTED, "cap_bytes": cap_bytes,
        "cap_unavailable": unavailable, "fixed_slack_bytes": FIXED_SLACK, "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    if plot(results, png):
        results["plot"] = os.path.relpath(png, HERE)
    out.write_text(json.dumps(results, indent=2))
    print(low_memory_markdown(results))
    print(f"written {out}" + (f" and {png}" if results.get("plot") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
