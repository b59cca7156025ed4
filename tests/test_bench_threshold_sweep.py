"""bench/threshold_sweep.py renders its RESULTS.md section from the raw entries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from files import load_bench, train_tiny_lvit


def test_section_names_the_choice_and_the_test_gain(tmp_path, monkeypatch):
    bench = load_bench("bench/threshold_sweep.py", "bench_threshold_sweep")
    written = {}
    monkeypatch.setattr(bench, "render_section", lambda name, body: written.update({name: body}))
    entry = {"model": "qata-lvit", "reports": "true", "thresholds": [0.4, 0.5, 0.6], "val_dice": [0.70, 0.72, 0.73],
             "test_dice": [0.80, 0.82, 0.83], "chosen": 0.6, "test_dice_at_0_5": 0.82, "test_dice_at_chosen": 0.83,
             "minutes": 1.0, "machine": "test machine", "command": "python bench/threshold_sweep.py --data QATA"}
    body = bench.render([entry])
    assert "| qata-lvit | not recorded | true | 0.6 | 0.7200 -> 0.7300 | 0.8200 -> 0.8300 | +0.0100 |" in body
    assert written == {"threshold-sweep": body}
    body = bench.render([{**entry, "weights_sha256": "5f9013aa" + "0" * 56}])
    assert "| qata-lvit | 5f9013aa | true |" in body


def test_a_sweep_records_the_weights_it_measured(tmp_path, monkeypatch):
    """A shipped name stands for other weights after the next ship: every entry names the sha256 of its weights."""
    bench = load_bench("bench/threshold_sweep.py", "bench_threshold_sweep")
    data, run = train_tiny_lvit(tmp_path, seed=3, n_val=2, n_test=2)
    monkeypatch.setattr(bench, "RESULTS_JSON", tmp_path / "sweep.json")
    monkeypatch.setattr(bench, "render_section", lambda name, body: None)
    assert bench.main(["--data", str(data), "--models", str(run)]) == 0
    (entry,) = json.loads((tmp_path / "sweep.json").read_text())
    weights = Path(run) / "checkpoints" / "best.safetensors"
    assert entry["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert entry["chosen"] in entry["thresholds"] and len(entry["test_dice"]) == len(entry["thresholds"])
    # the same name again: the same weights replace their entry, other weights keep theirs
    earlier = {**entry, "weights_sha256": "0" * 64}
    (tmp_path / "sweep.json").write_text(json.dumps([earlier, entry]))
    assert bench.main(["--data", str(data), "--models", str(run)]) == 0
    assert [e["weights_sha256"] for e in json.loads((tmp_path / "sweep.json").read_text())] == [
        "0" * 64, entry["weights_sha256"]]
