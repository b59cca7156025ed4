"""bench/semi_recipes.py: the raw list and the RESULTS.md section from finished, tested run folders."""

from __future__ import annotations

import json

import torch
import yaml
from files import load_bench


def _run(work, name, fraction, dice, pseudo=None, steps=7150, tested=True):
    run = work / "runs" / name
    (run / "checkpoints").mkdir(parents=True)
    semi = {"mode": "none", "labeled_fraction": fraction} if fraction is not None else {"mode": "none",
                                                                                        "labeled_fraction": None}
    (run / "config.yaml").write_text(yaml.safe_dump({"model_name": "lvit", "semi": semi,
                                                    "trainer": {"max_epochs": 3}}))
    pseudo = pseudo or ["nan"] * 3
    (run / "metrics.csv").write_text("epoch,val_dice,pseudo_dice\n"
                                     + "".join(f"{i + 1},0.7,{p}\n" for i, p in enumerate(pseudo)))
    torch.save({"global_step": steps, "epoch": 2}, run / "checkpoints" / "last.ckpt")
    if tested:
        (run / "test-test").mkdir()
        (run / "test-test" / "metrics.json").write_text(json.dumps(
            {"original_resolution": {"mean_over_images": {"dice": dice, "iou": dice - 0.1}},
             "model_resolution": {"mean_over_images": {"dice": dice + 0.01}}}))
    return run


def test_raw_list_and_section_from_fake_run_folders(tmp_path, capsys):
    bench = load_bench("bench/semi_recipes.py", "bench_semi_recipes")
    work = tmp_path / "work"
    _run(work, "lvit-s0", None, 0.83)
    _run(work, "lvit-25-steps-s0", 0.25, 0.81)
    _run(work, "lvit-25-steps-s1", 0.25, 0.79)
    _run(work, "lvit-25-mt-s0", 0.25, 0.825, pseudo=["nan", "0.79", "0.8049"], steps=9999)
    _run(work, "lvit-10-mt-s1", 0.1, 0.78, pseudo=["nan", "0.7", "nan"])
    _run(work, "lvit-25-epi-s0", 0.25, 0.80, tested=False)  # not evaluated yet: left out
    _run(work, "lvit-t-s0", None, 0.81)  # not a row of this table
    out, md = tmp_path / "semi_recipes.json", tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n<!-- qata:start -->\nkept\n<!-- qata:end -->\n")
    # bench/qata.py's raw results of runs whose folders are gone; a folder that is here wins over its old entry
    earlier = tmp_path / "qata_results.json"
    earlier.write_text(json.dumps({
        "lvit-25-epi-s1": {"row": "lvit-25-epi", "seed": 1, "dice_original": 0.80312, "epochs": 3,
                           "pseudo_dice_per_epoch": [None, 0.78, 0.79],
                           "machine": "CPU AMD EPYC, 2 cores, torch 2.13.0+cpu, 1 thread(s)"},
        "lvit-25-steps-s0": {"row": "lvit-25-steps", "seed": 0, "dice_original": 0.5, "epochs": 3, "steps": 1},
        "lvit-t-s1": {"row": "lvit-t", "seed": 1, "dice_original": 0.77, "epochs": 3}}))
    assert bench.main(["--work", str(work), "--json", str(out), "--results-md", str(md), "--earlier",
                       str(earlier)]) == 0

    raw = json.loads(out.read_text())
    assert all(sorted(e) == sorted(bench.KEYS) for e in raw)
    by = {(e["method"], e["labelled_fraction"], e["seed"]): e for e in raw}
    assert sorted(by) == [("epi", 0.25, 1), ("mean-teacher", 0.1, 1), ("mean-teacher", 0.25, 0),
                          ("supervised-100%", 1.0, 0), ("supervised-steps", 0.25, 0), ("supervised-steps", 0.25, 1)]
    assert by[("epi", 0.25, 1)] == {"method": "epi", "labelled_fraction": 0.25, "seed": 1, "dice_original": 0.8031,
                                    "pseudo_label_dice_per_epoch": [None, 0.78, 0.79], "steps": None}
    assert by[("supervised-steps", 0.25, 0)]["dice_original"] == 0.81
    mt = by[("mean-teacher", 0.25, 0)]
    assert mt["dice_original"] == 0.825 and mt["steps"] == 9999
    assert mt["pseudo_label_dice_per_epoch"] == [None, 0.79, 0.8049]
    assert by[("supervised-steps", 0.25, 1)]["pseudo_label_dice_per_epoch"] == [None, None, None]

    text = md.read_text()
    assert "<!-- qata:start -->\nkept\n<!-- qata:end -->" in text and "<!-- semi-recipes:start -->" in text
    # Against the baseline of the same seed: (0.825 - 0.81) / (0.83 - 0.81) for seed 0 at 25% (not the two-seed
    # baseline mean 0.80, which would give 83%); none at 10% (no baseline yet).
    row = next(line for line in text.splitlines() if line.startswith("| 25% | mean teacher"))
    assert "| 0 | 0.8250 | 75% | 0.790 -> 0.805 | 9999 |" in row
    assert "| 25% | supervised, the semi runs' step count (baseline) | 0, 1 | 0.8000 (0.7900-0.8100) | - |" in text
    assert "| 10% | mean teacher (lvit) | 1 | 0.7800 | - | 0.700 -> 0.700 | 7150 |" in text
    assert "| 25% | EPI (paper) | 1 | 0.8031 | 33% | 0.780 -> 0.790 | - |" in text  # (0.8031 - 0.79) / 0.04
    assert "Machines (bench/qata_results.json): CPU AMD EPYC, 2 cores: lvit-25-epi-s1. CPU training" in text
    assert capsys.readouterr().out.startswith("## Semi-supervised recipes")

    # No tested run: exit 2, nothing written.
    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    assert bench.main(["--work", str(empty), "--json", str(tmp_path / "none.json"),
                       "--results-md", str(md), "--earlier", str(tmp_path / "missing.json")]) == 2
    assert "no tested run" in capsys.readouterr().err and not (tmp_path / "none.json").exists()


def test_method_names_from_the_rows():
    bench = load_bench("bench/semi_recipes.py", "bench_semi_recipes")
    qata = load_bench("bench/qata.py", "bench_qata")
    names = {row: bench.method_of(row) for row in (*qata.SEMI_ROWS, "lvit")}
    assert names["lvit"] == "supervised-100%" and names["lvit-25"] == "supervised-subset"
    assert names["lvit-25-steps"] == names["lvit-10-steps"] == "supervised-steps"
    assert names["lvit-25-steps-ema"] == names["lvit-10-steps-ema"] == "supervised-steps-ema"
    assert "lvit-10-steps-ema" not in qata.SHARED_OF  # the average acts from the first step: never branched
    assert names["lvit-25-mt"] == names["lvit-10-mt"] == "mean-teacher" and names["lvit-25-mt-w2"] == "mean-teacher-w2"
    assert names["lvit-25-epi+lv-beta0.5"] == "epi+lv-beta0.5" and names["lvit-25-mt-cw0"] == "mean-teacher-cw0"
    assert set(names.values()) - {"supervised-subset"} <= set(bench.LABELS)  # every method has its table label
    assert qata.SHARED_OF["lvit-25-mt-cw0"] == "lvit-25-steps"
    # The mean-teacher rows branch from their own fraction's steps row, which keeps its state there.
    assert qata.SHARED_OF["lvit-10-mt"] == "lvit-10-steps" and qata.keep_after("lvit-10-steps") == (5,)
    assert qata.SHARED_OF["lvit-10-mt-cutmix"] == "lvit-10-steps"
    assert names["lvit-10-mt-cutmix"] == "mean-teacher-cutmix"
    assert qata.SHARED_OF["lvit-25-mt"] == "lvit-25-steps" and 5 in qata.keep_after("lvit-25-steps")
