"""bench/semi_supervised.py: side-by-side processes share one results file; --render-only writes the section."""

from __future__ import annotations

import json

import pytest
from files import load_bench

pytestmark = pytest.mark.slow


def test_two_processes_share_results_and_render_only_writes_the_section(tmp_path, capsys):
    from lvit.data.synthetic import generate_synthetic

    bench = load_bench("bench/semi_supervised.py", "bench_semi")
    data = generate_synthetic(tmp_path / "data", n_train=8, n_val=2, n_test=2, size=32, seed=1, progress=False)
    common = ["--work", str(tmp_path / "work"), "--data", str(data), "--results", str(tmp_path / "r.json"),
              "--models", "lvit-t", "--n-train", "8", "--size", "32", "--base-channels", "8", "--epochs", "2",
              "--warmup", "1", "--batch-size", "4", "--no-write", "--minutes", "10"]
    # Two "processes" (one setting each) write into the same results file: both rows survive.
    assert bench.main(common + ["--settings", "sup-25,sup-25-steps"]) == 0
    assert bench.main(common + ["--settings", "epi+lv-25"]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert sorted(results) == ["lvit-t/epi+lv-25/e2/w1/b0.99/s32/n8", "lvit-t/sup-25-steps/e2/w1/b0.99/s32/n8",
                               "lvit-t/sup-25/e2/w1/b0.99/s32/n8"]
    assert results["lvit-t/sup-25-steps/e2/w1/b0.99/s32/n8"]["pseudo_dice"] is None  # never pseudo labels
    row = results["lvit-t/epi+lv-25/e2/w1/b0.99/s32/n8"]
    assert row["epochs"] == 2 and not row["stopped_by_budget"] and 0.0 <= row["pseudo_dice"] <= 1.0

    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n")
    render = [a for a in common if a != "--no-write"] + ["--settings", "sup-25,epi+lv-25,sup-100", "--render-only",
                                                         "--section", "semi-gpu", "--results-md", str(md)]
    assert bench.main(render) == 0
    text = md.read_text()
    assert "<!-- semi-gpu:start -->" in text and "| lvit-t | sup-25 |" in text and "| lvit-t | epi+lv-25 |" in text
    assert "sup-100: no result" in capsys.readouterr().err  # a missing run is named, nothing is trained

    (tmp_path / "r.json").write_text("{broken")
    assert bench.main(render) == 2
    assert "r.json: unreadable results file" in capsys.readouterr().err
