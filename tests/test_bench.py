"""The speed harness: ``lvit bench --quick`` runs end to end and writes its report; the pieces it builds on
(FLOP counting with SDPA, correctness checks, RESULTS.md section replacement) do what they claim. No timing
is asserted: this machine's load makes timings meaningless in tests."""

from __future__ import annotations

import json

import pytest
import torch

from lvit import benchmark
from lvit.benchmark import Case, Task


def _cli(argv: list[str]) -> int:
    """Parse and run ``lvit bench`` alone (the command module, as lvit.cli wires it)."""
    import argparse

    from lvit.commands import bench as bench_command

    parser = argparse.ArgumentParser(prog="lvit")
    bench_command.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_quick_bench_writes_report(tmp_path):
    out = tmp_path / "bench.md"
    assert _cli(["bench", "--quick", "--repeats", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "images/s" in text and "| inference | eager |" in text and "| training | eager |" in text
    assert "this is a CPU run" in text
    report = json.loads(out.with_suffix(".json").read_text())
    entry = next(iter(report["cases"].values()))
    eager = entry["inference"]["eager"]
    assert eager["images_per_s"] > 0 and eager["n"] == 2
    assert entry["flops_per_image"] > 0 and 0 < eager["mfu"] < 1.5
    check = entry["inference"]["channels_last"]["check"]
    assert check["ok"] and check["rel_err"] <= benchmark.FP32_BOUND
    assert report["matmul"]["fp32"]["flops"] > 0
    # Refuses to overwrite without --force.
    from lvit.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        _cli(["bench", "--quick", "--out", str(out)])


def test_flop_count_includes_attention():
    from lvit.export import example_inputs
    from lvit.models import LViTConfig, build_model

    cfg = LViTConfig(image_size=32, base_channels=8, text_dim=16, vit_heads=2, dropout=0.0)
    model = build_model("lvit", cfg).eval()
    flops = benchmark.count_forward_flops(model, example_inputs(1, 32, 3, 10, 16))
    # 8 transformer blocks (4 down, 4 up), grid 2x2 = 4 tokens: QK^T and AV are 2 * 2 * N^2 * width each.
    expected_attention = sum(2 * 2 * 2 * 4 * 4 * width for width in (8, 16, 32, 64))
    assert flops["attention"] == expected_attention
    assert flops["total"] > 10 * flops["attention"]


def test_training_check_flags_a_wrong_variant(monkeypatch):
    case = Case("tiny", "lvit", {"image_size": 32, "base_channels": 8, "text_dim": 16, "vit_heads": 2}, batch=2)
    good = benchmark._check_training(Task(case, "training", "fused-adam"))
    assert good["ok"] and good["rel_err"] < 1e-6  # same gradients; only the optimizer kernel differs
    # bf16 autocast: gradients differ, within its looser bound, and the report says so.
    bf16 = benchmark._check_inference(Task(case, "inference", "bf16"),
                                      _logits(case, torch.bfloat16))
    assert bf16["rel_err"] > 0 and bf16["bound"] == benchmark.BF16_BOUND
    wrong = benchmark._check_inference(Task(case, "inference", "channels_last"), _logits(case) * 1.01 + 0.1)
    assert not wrong["ok"]


def _logits(case: Case, dtype=None) -> torch.Tensor:
    model, inputs = benchmark._build(case, "cpu")
    model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        return model(*inputs[:3]).float()


def test_speed_section_is_replaced_in_place(tmp_path):
    results = tmp_path / "RESULTS.md"
    benchmark.write_speed_section(results, "first")
    assert results.read_text().startswith("# lvit benchmark results")
    results.write_text(results.read_text() + "\n## Accuracy\n\nkept\n")
    benchmark.write_speed_section(results, "second")
    text = results.read_text()
    assert "second" in text and "first" not in text and "## Accuracy\n\nkept" in text
    assert text.count(benchmark.SPEED_START) == 1


def test_gpu_report_gets_its_own_section_and_mfu_against_the_bf16_peak(tmp_path):
    """A GPU run never replaces the CPU Speed section, and its MFU is taken against the measured bf16 matmul
    rate for every variant (cuDNN's fp32 convolutions run in TF32: a strict-fp32 peak gave MFU > 100%)."""
    results = tmp_path / "RESULTS.md"
    benchmark.write_speed_section(results, "cpu figures")
    benchmark.write_speed_section(results, "gpu figures", gpu=True)
    benchmark.write_speed_section(results, "gpu figures, again", gpu=True)
    text = results.read_text()
    assert "cpu figures" in text and "gpu figures, again" in text and "gpu figures\n" not in text
    assert text.count("## Speed on GPU") == 1 and text.count(benchmark.SPEED_START) == 1

    def report(device):
        res = {"median_s": 0.02, "images_per_s": 1000.0, "n": 20, "q1_s": 0.02, "q3_s": 0.02}
        return {"options": {"device": device}, "matmul": {"fp32": {"flops": 50e12}, "bf16": {"flops": 800e12}},
                "cases": {"c": {"inference": {"eager": {**res, "flops_per_image": {"total": 50e9}}},
                                "training": {}}}, "scaling": []}

    gpu, cpu = report("cuda"), report("cpu")
    benchmark._derive(gpu)
    benchmark._derive(cpu)
    assert gpu["cases"]["c"]["inference"]["eager"]["mfu"] == pytest.approx(50e9 * 1000 / 800e12)
    assert cpu["cases"]["c"]["inference"]["eager"]["mfu"] == pytest.approx(50e9 * 1000 / 50e12)
