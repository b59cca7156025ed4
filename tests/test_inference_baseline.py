"""Inference answers exactly as recorded: ``lvit test``'s per-image Dice, the masks ``lvit predict`` writes with
and without reports (the report writer's path), and the app's answer, on two small committed runs
(bench/inference_baseline.py records them; re-record only for a change of behaviour on purpose, and say why)."""

from __future__ import annotations

import json

from files import load_bench


def test_inference_gives_the_recorded_answers(shared_dir):
    baseline = load_bench("bench/inference_baseline.py", "inference_baseline")
    expected = json.loads(baseline.BASELINE.read_text())
    found = baseline.measure(shared_dir / "datasets" / "QaTa-COV19-sample")
    assert baseline.differences({k: v for k, v in expected.items() if k not in ("about", "demo_data")}, found) == []
    assert expected["demo_data"] == baseline.DEMO  # the demo data are regenerated as recorded
    masks = set(expected["qata"]["predict_with_reports"]["masks"].values())
    assert len(masks) == baseline.N_PREDICT  # the recorded masks differ from image to image: a baseline that bites
