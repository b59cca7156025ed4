"""bench/report_sides.py: the report's sides and zones applied to a mask as a hard rule."""

from __future__ import annotations

import numpy as np
from files import load_bench


def test_rule_removes_what_the_report_rules_out_and_nothing_else():
    sides = load_bench("bench/report_sides.py", "bench_report_sides")
    pred = np.ones((100, 10), dtype=bool)  # side edge at column 5, upper band rows 0-31 (32 % of 100)
    left_lower = frozenset({("lower", "left")})
    only_left = sides.apply_rule(pred, left_lower, "sides")
    assert only_left[:, :5].all() and not only_left[:, 5:].any()
    no_upper = sides.apply_rule(pred, left_lower, "sides+upper")
    assert not no_upper[:32].any() and no_upper[32:, :5].all() and not no_upper[:, 5:].any()
    both = frozenset({("upper", "left"), ("middle", "right")})
    kept = sides.apply_rule(pred, both, "sides+upper")
    assert kept[:, :5].all() and not kept[:32, 5:].any() and kept[32:, 5:].all()
    assert sides.apply_rule(pred, frozenset(), "sides+upper").all()  # no zone named: nothing ruled out
    assert pred.all()  # the input is never changed


def test_section_is_rendered_from_the_raw_entries(tmp_path):
    sides = load_bench("bench/report_sides.py", "bench_report_sides")
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n")
    entry = {"run": "r-s0", "split": "test", "n_images": 3, "dice_original": 0.8,
             "after": {"sides": 0.81, "sides+upper": 0.79}, "masks_changed": {"sides": 1, "sides+upper": 2},
             "command": "python bench/report_sides.py --data QATA --work W --runs r-s0"}
    body = sides.render([entry], md)
    assert "| r-s0 | test | 3 | 0.8000 | 0.8100 (+0.0100; 1) | 0.7900 (-0.0100; 2) |" in body
    assert "<!-- report-sides:start -->" in md.read_text()
