"""The benchmark's profile summary (bench/bench_engine.py --profile): kernel names from a real H100 profile
land in the right kind, and the report renders the committed results' profile table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_engine_under_test", BENCH / "bench_engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, kind", [
    ("_lora_expand", "lora expand (ours)"),
    ("_short_attention", "attention"),
    ("_dwconv_snake", "AudioVAE residual units (ours)"),
    ("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_35_16x128x64_1x4x1_cga1x1x1_kernel0_0",
     "attention"),
    ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "GEMM"),
    ("sm90_xmma_dgrad_implicit_gemm_indexed_f32f32_tf32f32_f32_nhwckrsc_nhwc_tilesize256x64x32", "convolution"),
    ("triton_poi_fused__unsafe_view_mul_silu_1", "inductor fused (triton)"),
    ("void at::native::index_elementwise_kernel<128, 4, at::native::gpu_index_kernel<>>", "copy / index / cat"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "element-wise (aten)"),
    ("Memcpy DtoH (Device -> Pageable)", "other"),
])
def test_kernel_kinds(bench, name: str, kind: str) -> None:
    assert bench._kernel_kind(name) == kind


def test_committed_results_render_their_profile_table(bench) -> None:
    path = BENCH / "results" / "engine-voxcpm1.5-nvidia-h100-80gb-hbm3.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    profile = data["ours"]["configs"]["c64-lora8"]["profile"]
    assert (BENCH / "results" / profile["file"]).is_file()  # the top-kernels file is committed beside it
    assert abs(sum(profile["by_kind_ms"].values()) - profile["gpu_kernel_ms"]) < 1.0
    markdown = bench.render_markdown(data)
    table = markdown[markdown.index("| kernel kind |"):]
    assert "| lora expand (ours) |" in table and "| all kernels |" in table
    row = next(line for line in table.splitlines() if line.startswith("| all kernels |"))
    columns = table.splitlines()[0].strip("|").split("|")  # one column per profiled configuration
    cells = row.strip("|").split("|")
    assert cells[[c.strip() for c in columns].index("c64-lora8")].strip() == bench._fmt(profile["gpu_kernel_ms"])
