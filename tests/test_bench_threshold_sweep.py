"""bench/threshold_sweep.py renders its RESULTS.md section from the raw entries."""

from __future__ import annotations

from files import load_bench


def test_section_names_the_choice_and_the_test_gain(tmp_path, monkeypatch):
    bench = load_bench("bench/threshold_sweep.py", "bench_threshold_sweep")
    written = {}
    monkeypatch.setattr(bench, "render_section", lambda name, body: written.update({name: body}))
    entry = {"model": "qata-lvit", "reports": "true", "thresholds": [0.4, 0.5, 0.6], "val_dice": [0.70, 0.72, 0.73],
             "test_dice": [0.80, 0.82, 0.83], "chosen": 0.6, "test_dice_at_0_5": 0.82, "test_dice_at_chosen": 0.83,
             "minutes": 1.0, "machine": "test machine", "command": "python bench/threshold_sweep.py --data QATA"}
    body = bench.render([entry])
    assert "| qata-lvit | true | 0.6 | 0.7200 -> 0.7300 | 0.8200 -> 0.8300 | +0.0100 |" in body
    assert written == {"threshold-sweep": body}
