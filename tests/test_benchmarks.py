"""The benchmark suite: its simulated quantizers, and an end-to-end ``--quick`` run (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from suite.quality import bnb_4bit, bnb_int8, flat_blocks, replaced_weights, rtn  # noqa: E402


def test_flat_blocks_hold_out_and_restore_the_super_weight():
    torch.manual_seed(0)
    weight = torch.randn(16, 64) * 0.02
    weight[3, 5] = 4.0  # a super weight that would stretch its block's range
    plain, plain_bytes = flat_blocks(weight, 4, 256, holdout=[])
    held, held_bytes = flat_blocks(weight, 4, 256, holdout=[(3, 5)])
    assert held[3, 5] == weight[3, 5]
    # The block holding the super weight (elements 0..255 = rows 0..3) is far better without it in its range.
    block = slice(0, 4)
    err_plain = (plain[block] - weight[block]).abs().mean()
    err_held = (held[block] - weight[block]).abs().mean()
    assert err_held < err_plain / 5
    # Other blocks are untouched by the hold-out.
    assert torch.equal(plain[4:], held[4:])
    # 4 bits per weight + fp16 scale and offset per 256-weight block (+ 12 bytes per held-out weight).
    assert plain_bytes == 16 * 64 // 2 + 4 * 4
    assert held_bytes == plain_bytes + 12


def test_rtn_matches_a_direct_symmetric_absmax_quantization():
    torch.manual_seed(1)
    weight = torch.randn(8, 128)
    dense, nbytes = rtn(weight, 4, 64)
    groups = weight.reshape(8, 2, 64)
    scale = (groups.abs().amax(-1, keepdim=True) / 7).half().float()
    expected = (torch.round(groups / scale).clamp(-8, 7) * scale).reshape(8, 128)
    assert torch.allclose(dense, expected, atol=1e-6)
    assert nbytes == 8 * 128 // 2 + 8 * 2 * 2  # codes + fp16 scales


def test_bitsandbytes_simulations_are_close_and_counted():
    torch.manual_seed(2)
    weight = torch.randn(64, 128) * 0.05
    for quant_type in ("nf4", "fp4"):
        dense, nbytes = bnb_4bit(weight, quant_type)
        assert dense.shape == weight.shape
        assert (dense - weight).abs().mean() < 0.01
        assert nbytes * 8 / weight.numel() == pytest.approx(4.5)  # 4-bit codes + fp32 absmax per 64
    dense, nbytes = bnb_int8(weight)
    assert (dense - weight).abs().max() < weight.abs().max() / 100
    assert nbytes == weight.numel() + 64 * 4


def test_replaced_weights_restores_the_original_tensors():
    layer = torch.nn.Linear(4, 4)
    original = layer.weight.detach().clone()
    pointer = layer.weight.data_ptr()
    with replaced_weights({"layer": layer}, lambda name, w: torch.zeros_like(w)):
        assert float(layer.weight.abs().sum()) == 0.0
    assert layer.weight.data_ptr() == pointer and torch.equal(layer.weight.detach(), original)


def test_quick_benchmark_runs_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert set(results) >= {"meta", "quality", "speed", "memory"}
    rows = results["quality"]["rows"]
    methods = {row["method"] for row in rows}
    assert methods >= {"float32", "bfloat16", "ablation", "superweight", "rtn", "flat", "bnb"}
    for row in rows:
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1
        if row["method"] in ("superweight", "rtn"):
            # Codes plus at least one fp16 scale per group.
            assert row["bits"] < row["bits_per_weight"] < row["bits"] + 1
    variants = [r for r in rows if r["method"] == "superweight" and "(" in r["setting"]]
    assert sorted(r["setting"] for r in variants) == [
        "int4 sym g32 (gptq+clip)", "int4 sym g32 (rtn+clip)", "int4 sym g32 (rtn+output clip)",
        "int4 sym per-channel (rtn+output clip)",
    ]
    superweight = {r["setting"]: r for r in rows if r["method"] == "superweight" and r not in variants}
    plain = {r["setting"]: r for r in rows if r["method"] == "rtn"}
    assert set(superweight) == set(plain)
    # The package stores the exact super weight on top of the same codes and scales.
    assert all(superweight[s]["bits_per_weight"] > plain[s]["bits_per_weight"] for s in superweight)
    # The planted super weight of the tiny model is found, and zeroing it hurts.
    detected = results["speed"]["detection"]["super_weights"]
    assert [(d["module"], d["row"], d["col"]) for d in detected] == [("model.layers.1.mlp.down_proj", 5, 7)]
    assert next(r for r in rows if r["method"] == "ablation")["ratio"] > 1.05
    speed_models = [row["model"] for row in results["speed"]["rows"]]
    assert speed_models[:2] == ["float32", "bfloat16"] and any("superweight" in m for m in speed_models)
    assert any("NF4" in m for m in speed_models)
    for row in results["speed"]["rows"]:
        assert row["generation"]["new_tokens"] == results["meta"]["settings"]["new_tokens"]
        assert row["generation"]["tokens_per_s"] > 0 and row["prefill"]["tokens_per_s"] > 0
    loads = results["memory"]["loads"]
    assert loads["quantize_on_load"]["detected"] is True
    assert [sw["row"] for sw in loads["quantize_on_load"]["super_weights"]] == [5]
    assert all(loads[k]["finite_logits"] and loads[k]["peak_rss_mb"] > 0 for k in loads)
    sizes = results["memory"]["checkpoint_bytes"]
    assert sizes["superweight int4 g64"] < sizes["bfloat16"] < sizes["float32"]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Quality" in text and "## Speed" in text and "## Loading and memory" in text
    assert (tmp_path / "results" / "quality.png").is_file()


def test_flat_block_clipping_never_increases_the_block_error():
    torch.manual_seed(3)
    weight = torch.randn(32, 64) * 0.02
    weight[0, :4] = torch.tensor([0.5, -0.4, 0.45, -0.5])  # outliers that stretch the first block's range
    weight[3, 5] = 4.0
    held, _ = flat_blocks(weight, 4, 256, holdout=[(3, 5)])
    clipped, _ = flat_blocks(weight, 4, 256, holdout=[(3, 5)], clip=True)
    assert clipped[3, 5] == weight[3, 5]
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[3, 5] = False
    for rows in (slice(0, 4), slice(4, 8)):
        err_held = ((held[rows] - weight[rows])[mask[rows]] ** 2).sum()
        err_clip = ((clipped[rows] - weight[rows])[mask[rows]] ** 2).sum()
        assert err_clip <= err_held + 1e-9


def test_w8a8_speed_rows_run_and_render(tmp_path):
    """benchmarks/w8a8.py on a tiny planted model: every row runs, the registry and quantizer setting come back,
    and the RESULTS.md section states the rows and the verdict (no timing assertions)."""
    import w8a8 as w8a8_benchmark

    from optimum_superweight import SuperWeightConfig
    from optimum_superweight.kernels import w8a8 as w8a8_kernels
    from optimum_superweight.kernels.fused import fused_quantization_enabled
    from optimum_superweight.testing import build_tiny_model

    build_tiny_model("llama", super_weights=[(1, 5, 7)]).save_pretrained(tmp_path)
    config = SuperWeightConfig(bits=8, group_size=-1, activation_bits=8, activation_scale="per_tensor",
                               massive_activation_ratio=None,
                               super_weights=[{"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7}])
    rows = {"bf16 dense": w8a8_benchmark.SpeedRow(None),
            "W8A8 per_tensor, held out": w8a8_benchmark.SpeedRow(config),
            "eager": w8a8_benchmark.SpeedRow(config, fused=False),
            "portable": w8a8_benchmark.SpeedRow(config, portable_kernel_only=True)}
    registered = w8a8_kernels.registered_w8a8_kernels()
    result = w8a8_benchmark.speed(str(tmp_path), rows, batch=1, length=64, decode_tokens=2, repeats=1)
    assert w8a8_kernels.registered_w8a8_kernels() == registered and fused_quantization_enabled()
    assert list(result["rows"]) == list(rows) and result["rows"]["bf16 dense"]["prefill_vs_bf16"] == 1.0
    assert result["rows"]["W8A8 per_tensor, held out"]["kernels"] == {"cpu-onednn-w8a8": 28}
    assert result["rows"]["portable"]["kernels"] == {"cpu-w8a8": 28}
    prefill_only = w8a8_benchmark.speed(str(tmp_path), rows, batch=1, length=64, decode_tokens=0, repeats=1)
    assert "decode_tokens_per_s" not in prefill_only["rows"]["eager"]
    prefill_only["shape"] = w8a8_benchmark.SCALED_SHAPE
    text = w8a8_benchmark.w8a8_markdown({
        "model": "tiny", "tokens": 64, "threads": 2, "torch": torch.__version__,
        "quality": {"full precision": {"ppl": 10.0, "ratio": 1.0}}, "speed": result, "scaled_speed": prefill_only,
    })
    assert "| W8A8 per_tensor, held out |" in text and "1B-shaped layers" in text
    assert "prefills faster than bfloat16" in text or "prefills slower than bfloat16" in text


def test_recorded_standalone_results_render():
    """RESULTS.md's standalone sections render from the committed result files (the scripts load as modules)."""
    from suite.report import standalone_sections

    text = standalone_sections(BENCHMARKS / "results")
    assert "## W8A8" in text and "1B-shaped layers" in text and "reference kernel" in text
    assert "torch.compile-fused ms" in text and "CPU seconds" in text
    assert "## llama.cpp: our GGUF export" in text and "llama.cpp Q4_K_M" in text
    assert "## Kernels by CPU" in text and "dispatcher's pick" in text
    assert "## Checkpoint integrity" in text and "every check (default)" in text


def _r_int(value: int) -> bytes:
    return value.to_bytes(4, "big", signed=True)


def _r_strings(values: list[str], flags: int = 16) -> bytes:
    out = _r_int(flags) + _r_int(len(values))
    for value in values:
        raw = value.encode("utf-8")
        out += _r_int(9 | (1 << 15)) + _r_int(len(raw)) + raw  # CHARSXP, UTF-8 flag
    return out


def _r_names_attribute(names: list[str]) -> bytes:
    # pairlist node with a tag: the symbol `names` and a character vector; then the end of the pairlist
    return _r_int(2 | (1 << 10)) + _r_int(1) + _r_strings(["names"])[8:] + _r_strings(names) + _r_int(254)


def test_r_lazyload_reader_reads_character_vectors(tmp_path):
    """The reader of R lazy-load databases (the Jane Austen text) on a hand-built two-object database."""
    import gzip
    import zlib

    from suite.texts import read_r_lazyload

    header = b"X\n" + _r_int(2) + _r_int(0x040201) + _r_int(0x020300)
    objects = {"first": ["It is a truth", "", "universally acknowledged"], "second": ["ünïcode"]}
    blob, spans = b"", []
    for values in objects.values():
        payload = header + _r_strings(values)
        record = len(payload).to_bytes(4, "big") + zlib.compress(payload)
        spans.append((len(blob), len(record)))
        blob += record
    variables = _r_int(19 | (1 << 9)) + _r_int(len(spans))
    for offset, length in spans:
        variables += _r_int(13) + _r_int(2) + _r_int(offset) + _r_int(length)
    variables += _r_names_attribute(list(objects))
    index = header + _r_int(19 | (1 << 9)) + _r_int(3) + variables + _r_int(254) + _r_int(254)
    index += _r_names_attribute(["variables", "references", "compressed"])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    assert read_r_lazyload(tmp_path / "Rdata") == objects


def test_multitext_names_a_killed_model_job():
    """A model job killed by the OOM killer prints nothing itself: the driver must say it was killed."""
    import quality_multitext

    killed = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert "SIGKILL" in quality_multitext._exit_reason(killed.returncode)
    assert quality_multitext._exit_reason(1) == "exit 1"


def test_multitext_quality_runs_end_to_end(tmp_path):
    """benchmarks/quality_multitext.py --quick: every row on the tiny model and every available text; no timing
    assertions. Peers whose library is missing are reported as failed rows, never crash the run."""
    import quality_multitext

    from suite.texts import TEXT_LOADERS

    texts = []
    for key, loader in TEXT_LOADERS.items():
        try:
            assert len(loader().text) > 50_000
            texts.append(key)
        except FileNotFoundError:
            pass
    assert "python" in texts
    out = tmp_path / "q.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "quality_multitext.py"), "--quick", "--output", str(out), "--no-render",
         "--texts", ",".join(texts)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    model = result["models"]["tiny"]
    rows = {row["key"]: row for row in model["rows"]}
    assert set(rows) == {spec.key for spec in quality_multitext.ROWS if "tiny" in spec.models}
    assert rows["fp"]["ratio"] == {key: 1.0 for key in texts}
    for key in ("default", "low_bpw", "default_3bit", "per_channel", "rtn_per_channel", "rtn_g64", "nf4", "nf4_sw"):
        row = rows[key]
        assert "error" not in row, row
        assert set(row["ratio"]) == set(texts) and all(math.isfinite(v) and v > 0 for v in row["ratio"].values())
        assert row["ratio_min"] <= row["ratio_geomean"] <= row["ratio_max"]
    assert rows["default_3bit"]["bits_per_weight"] < rows["default"]["bits_per_weight"]
    assert rows["nf4"]["bits_per_weight"] == pytest.approx(4.5)
    assert rows["nf4_sw"]["bits_per_weight"] == pytest.approx(4.5, abs=0.01)  # bnb's layout + the exact super weight
    # The package stores the exact super weight on top of the plain codes and scales.
    assert rows["per_channel"]["bits_per_weight"] > rows["rtn_per_channel"]["bits_per_weight"]
    assert [sw["row"] for sw in model["super_weights"]] == [5]
    assert all(model["tokens"][key]["evaluated"] == 256 for key in texts)
    assert [p["weights"] for p in result["scaling"]["points"]] == sorted(p["weights"] for p in result["scaling"]["points"])
    text = quality_multitext.quality_multitext_markdown(result)
    assert "| method | bits/weight |" in text and "Goals (issues 14, 24)" in text


def _write_gguf(path: Path, tensors: dict[str, torch.Tensor], heads: int, kv_heads: int, blocks: int) -> None:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(blocks)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout written out: in each head, GGUF row 2i + j is transformers row i + j * head_dim / 2."""
    dim = weight.shape[0] // heads
    rows = [h * dim + j * dim // 2 + i for h in range(heads) for i in range(dim // 2) for j in range(2)]
    return weight[rows]


def test_llama_cpp_mapping_undoes_the_rotary_row_order_and_refuses_a_wrong_tensor(tmp_path):
    """The llama.cpp peer maps GGUF tensors back to modules only when they reproduce the weights exactly."""
    pytest.importorskip("gguf")
    from suite.llama_cpp_peer import tensor_mapping

    torch.manual_seed(0)
    heads, kv_heads, hidden = 4, 2, 32
    weights = {"model.layers.0.self_attn.q_proj": torch.randn(hidden, hidden),
               "model.layers.0.self_attn.k_proj": torch.randn(hidden // heads * kv_heads, hidden),
               "model.layers.0.self_attn.v_proj": torch.randn(hidden // heads * kv_heads, hidden),
               "model.layers.0.mlp.down_proj": torch.randn(hidden, 48)}
    stored = {"blk.0.attn_q.weight": _interleaved(weights["model.layers.0.self_attn.q_proj"], heads),
              "blk.0.attn_k.weight": _interleaved(weights["model.layers.0.self_attn.k_proj"], kv_heads),
              "blk.0.attn_v.weight": weights["model.layers.0.self_attn.v_proj"],
              "blk.0.ffn_down.weight": weights["model.layers.0.mlp.down_proj"]}
    _write_gguf(tmp_path / "good.gguf", stored, heads, kv_heads, 1)
    mapping = tensor_mapping(tmp_path / "good.gguf", weights)
    assert {m: e.gguf_name for m, e in mapping.items()} == {
        "model.layers.0.self_attn.q_proj": "blk.0.attn_q.weight", "model.layers.0.self_attn.k_proj": "blk.0.attn_k.weight",
        "model.layers.0.self_attn.v_proj": "blk.0.attn_v.weight", "model.layers.0.mlp.down_proj": "blk.0.ffn_down.weight"}
    assert [m for m, e in mapping.items() if e.order is not None] == ["model.layers.0.self_attn.q_proj",
                                                                      "model.layers.0.self_attn.k_proj"]
    for module, entry in mapping.items():
        assert torch.equal(entry.to_module(stored[entry.gguf_name]), weights[module])
    # A tensor in an order the mapping does not know (here: v with its rows reversed) is refused, not guessed.
    stored["blk.0.attn_v.weight"] = weights["model.layers.0.self_attn.v_proj"].flip(0)
    _write_gguf(tmp_path / "bad.gguf", stored, heads, kv_heads, 1)
    with pytest.raises(ValueError, match="v_proj"):
        tensor_mapping(tmp_path / "bad.gguf", weights)


def test_weighting_study_refinements_bracket_the_default_and_the_data_free_grid():
    """benchmarks/suite/refine_lp.py (issue 24's study): a margin of 0 keeps the default's refined grids, a margin
    of 1 the data-free ones; the lp refinement gives finite grids; the package's function is restored afterwards."""
    from optimum_superweight.tensor import hqq
    from suite import refine_lp

    torch.manual_seed(0)
    w, importance = torch.randn(16, 128), torch.rand(128) ** 4 * 100
    default = hqq.hqq_quantize_weight(w, bits=4, group_size=64, importance=importance).dequantize(torch.float32)
    data_free = hqq.hqq_quantize_weight(w, bits=4, group_size=64).dequantize(torch.float32)
    for margin, expected in ((0.0, default), (1.0, data_free)):
        with refine_lp.patched_margin(margin):
            got = hqq.hqq_quantize_weight(w, bits=4, group_size=64, importance=importance).dequantize(torch.float32)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with refine_lp.patched(0.7):
        lp = hqq.hqq_quantize_weight(w, bits=4, group_size=64, importance=importance).dequantize(torch.float32)
    assert torch.isfinite(lp).all() and not torch.equal(lp, default)
    assert hqq.refine_group_grids is refine_lp._ORIGINAL and hqq.fit_group_grids is refine_lp._ORIGINAL_FIT


def test_grid_levels_tell_a_4bit_block_grid_from_a_trained_weight():
    from suite.lattice import grid_levels

    torch.manual_seed(0)
    scales = torch.rand(64, 1) + 0.5
    on_grid = (torch.randint(0, 16, (64, 32)) * scales - scales * 8).reshape(16, 128)  # Q4_1-like blocks of 32
    assert grid_levels(on_grid) <= 16 < grid_levels(torch.randn(16, 128)) == 32


def test_weighting_study_transforms_of_the_calibration_energy():
    """quality_multitext's study rows (issue 24) map the default's statistic: pow:1 is the statistic itself, 'only'
    keeps the named modules, a cap bounds every channel by its group's median."""
    import quality_multitext
    from optimum_superweight import SuperWeightConfig

    run = quality_multitext.ModelRun("tiny", tokens=64, window=64, batch_size=4, eval_dtype="float32",
                                     texts=("python",), log=lambda line: None)
    config = SuperWeightConfig(group_size=32)
    base = run._calibration_energies(config)
    assert run._calibration_energies(config) is base  # collected once
    identity = run._transformed_energies(config, "pow:1")
    assert set(identity) == set(base) and all(torch.equal(identity[n], base[n].float()) for n in base)
    only = run._transformed_energies(config, "only:mlp")
    assert only and set(only) == {n for n in base if "mlp" in n}
    for name, capped in run._transformed_energies(config, "cap:4").items():
        groups = base[name].float().reshape(-1, 32)
        assert (capped.reshape(-1, 32) <= 4 * groups.median(-1, keepdim=True).values + 1e-6).all()
    with pytest.raises(ValueError, match="expected pow, blend"):
        run._transformed_energies(config, "nope:1")


def test_error_feedback_study_keeps_the_grid_and_feeds_rounding_errors_forward():
    """benchmarks/suite/calibration_mix.py (issue 24 item 4): with an identity second moment nothing is fed forward and
    the sweep gives the layer's own round-to-nearest codes; with correlated inputs it lowers the output error on the
    same grids; the super weight stays exact either way."""
    from optimum_superweight.nn.linear import SuperWeightLinear
    from suite.calibration_mix import feedback_on_grids

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 16, bias=False)
    layer = SuperWeightLinear.from_linear(linear, bits=4, group_size=64, symmetric=False, zero_point="float",
                                          super_weights=[(1, 2)])
    own = layer.dequantize_weight(torch.float32)
    torch.testing.assert_close(feedback_on_grids(linear, layer, torch.eye(128)), own, rtol=0, atol=1e-6)
    x = torch.randn(4096, 8) @ torch.randn(8, 128) + 0.1 * torch.randn(4096, 128)  # strongly correlated inputs
    hessian = x.T @ x / x.shape[0]
    fed = feedback_on_grids(linear, layer, hessian)
    w = linear.weight.detach()

    def output_error(q):
        return float(((w - q) @ hessian @ (w - q).T).trace())

    assert output_error(fed) < 0.8 * output_error(own)
    assert fed[1, 2] == w[1, 2]


def test_mixed_calibration_fills_whole_windows_from_each_register():
    from optimum_superweight.testing import tiny_tokenizer
    from suite.calibration_mix import REGISTERS, mixed_calibration_ids

    tokenizer = tiny_tokenizer()
    ids = mixed_calibration_ids(tokenizer, 1024, ["docs", "code"], window=512)
    assert len(ids) == 1024
    assert tokenizer.decode(ids[:512]) in REGISTERS["docs"]() and tokenizer.decode(ids[512:]) in REGISTERS["code"]()


def test_multitext_model_job_stops_when_its_parent_is_killed(tmp_path):
    """A killed benchmarks/quality_multitext.py run must not leave its model jobs (--child, up to 12 GB each) behind."""
    import signal
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    pid_file = tmp_path / "child.pid"
    child = (f"import sys, os, time; sys.path.insert(0, {str(BENCHMARKS)!r}); import quality_multitext; "
             f"quality_multitext.die_with_parent(); open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(120)"])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        try:
            with open(f"/proc/{child_pid}/stat") as stat:  # a zombie waiting for init counts as gone
                if stat.read().split(") ")[1].startswith("Z"):
                    break
        except FileNotFoundError:  # reaped between the two checks
            break
        time.sleep(0.1)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the model job outlived its killed parent")
