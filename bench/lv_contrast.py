"""Which contrast label does the LV loss pick on real reports, and how much does it say about the withheld mask?

    python bench/lv_contrast.py --data QATA [--fraction 0.25 --seed 0 --size 128]

On the training split, the labelled subset is drawn as `lvit train --labeled-fraction F` draws it (seeded); every
unlabelled image's report is matched to the nearest labelled report (the LV loss's TextSim, MiniLM report
vectors as in training), whose mask becomes its contrast label. Measured against the withheld masks: the cosine
similarity the LV loss would reward (contrast vs true mask) and the Dice of the contrast label, beside the same
figures for a random labelled mask. Writes bench/lv_contrast.json, a figure docs/lv_contrast_qata.png (image,
report, chosen labelled report, its mask, the withheld mask) and bench/RESULTS.md section "lv-contrast".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchkit import REPO


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--examples", type=int, default=6)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lvit-lv-contrast-cache")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "lv_contrast.json")
    p.add_argument("--figure", type=Path, default=REPO / "docs" / "lv_contrast_qata.png")
    p.add_argument("--results-md", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from lvit.core.io import atomic_write_text
    from lvit.data import SegmentationDataset, load_split
    from lvit.train.config import load_config
    from lvit.train.semi.labelled_subset import choose_fraction
    from lvit.train.semi.lv_loss import ContrastLabelBank
    from lvit.train.semi.module import report_encoder

    records = load_split(args.data, "train")
    names = [r.name for r in records]
    labelled = choose_fraction(names, args.fraction, args.seed).mask_for(names)
    lab_rows, unl_rows = np.flatnonzero(labelled), np.flatnonzero(~labelled)
    plain = SegmentationDataset(records, args.size, in_channels=1)
    masks = torch.stack([plain[i]["mask"] for i in range(len(records))])  # [N, 1, S, S] (reads every mask once)
    bank = ContrastLabelBank.from_labelled(masks[lab_rows], [records[i].text for i in lab_rows],
                                           [records[i].name for i in lab_rows])
    config = load_config(None)  # MiniLM report vectors, lv_max_tokens as training uses them
    encoder = report_encoder(config, config.semi, args.cache)
    chosen = bank.assign(encoder, [records[i].text for i in unl_rows])  # [U] rows of the bank

    def cos(a, b):
        a, b = a.flatten(1).float(), b.flatten(1).float()
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)

    def dice(a, b):
        a, b = a.flatten(1) > 0.5, b.flatten(1) > 0.5
        inter = (a & b).sum(1).float()
        total = a.sum(1) + b.sum(1)
        return torch.where(total == 0, torch.ones_like(inter), 2 * inter / total.clamp_min(1))

    truth = masks[unl_rows]
    contrast = bank.masks[chosen]
    rng = np.random.default_rng(args.seed)
    random = bank.masks[torch.from_numpy(rng.integers(0, len(bank), len(unl_rows)))]
    same_text = np.array([bank.texts[c] == records[i].text for c, i in zip(chosen.tolist(), unl_rows)])
    result = {
        "data": str(args.data), "fraction": args.fraction, "seed": args.seed, "size": args.size,
        "n_labelled": int(labelled.sum()), "n_unlabelled": int(len(unl_rows)),
        "distinct_labelled_reports": len(set(bank.texts)),
        "same_report_text": float(same_text.mean()),
        "contrast": {"cosine": float(cos(contrast, truth).mean()), "dice": float(dice(contrast, truth).mean())},
        "random_labelled_mask": {"cosine": float(cos(random, truth).mean()), "dice": float(dice(random, truth).mean())},
    }
    # How often the tie among identical reports goes to the same labelled mask: the contrast labels used.
    result["distinct_contrast_masks_used"] = int(len(set(chosen.tolist())))
    examples = rng.choice(len(unl_rows), size=min(args.examples, len(unl_rows)), replace=False)
    result["examples"] = [{"image": records[unl_rows[k]].name, "report": records[unl_rows[k]].text,
                           "contrast_image": bank.names[chosen[k]], "contrast_report": bank.texts[chosen[k]],
                           "cosine": float(cos(contrast[k:k + 1], truth[k:k + 1])[0])} for k in examples.tolist()]
    atomic_write_text(args.results, json.dumps(result, indent=1) + "\n")
    figure(args.figure, records, unl_rows, examples, chosen, bank, truth, args.size)
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=1))
    render(result, args.results_md)
    return 0


def figure(path: Path, records, unl_rows, examples, chosen, bank, truth, size: int) -> None:
    import textwrap

    import torch

    from lvit.core.figures import NOTE_SIZE, figure_png, image_panel, new_figure
    from lvit.core.io import atomic_write_bytes
    from lvit.data import read_image, resize_image

    fig = new_figure(12, 2.9 * len(examples), dpi=80)
    for row, k in enumerate(examples.tolist()):
        record = records[unl_rows[k]]
        image = torch.from_numpy(read_image(record.image_path)[..., 0]).float()[None] / 255
        image = resize_image(image, size)[0].numpy()
        panels = [(image, "unlabelled image", "gray"), (truth[k, 0].numpy(), "its withheld mask", "gray"),
                  (bank.masks[chosen[k], 0].numpy(), "contrast label (LV loss)", "gray")]
        for col, (picture, title, cmap) in enumerate(panels):
            image_panel(fig.add_subplot(len(examples), 4, 4 * row + col + 1), picture, title, cmap, vmin=0, vmax=1)
        ax = fig.add_subplot(len(examples), 4, 4 * row + 4)
        ax.set_axis_off()
        text = (f"report:\n{textwrap.fill(record.text, 42)}\n\nnearest labelled report:\n"
                f"{textwrap.fill(bank.texts[chosen[k]], 42)}\n({bank.names[chosen[k]][:38]})")
        ax.text(0, 0.5, text, fontsize=NOTE_SIZE, va="center", ha="left")
    atomic_write_bytes(path, figure_png(fig))


def render(r: dict, md: Path) -> None:
    from lvit.benchmark import cpu_name
    from lvit.core.io import write_marked_section

    text = "\n".join([
        "## What the LV loss's contrast labels say on real reports (QaTa-COV19)",
        "",
        f"Training split, labelled subset {r['fraction']:.0%} (seed {r['seed']}: {r['n_labelled']} masks, "
        f"{r['distinct_labelled_reports']} distinct reports among them), {r['n_unlabelled']} unlabelled images, "
        f"masks at {r['size']} px. Each unlabelled report is matched to the nearest labelled report (MiniLM report "
        "vectors, as in training); that report's mask is the image's contrast label.",
        "",
        "| contrast label | cosine with the withheld mask (what the LV loss rewards) | Dice with the withheld mask |",
        "|---|---|---|",
        f"| nearest labelled report's mask (LV loss) | {r['contrast']['cosine']:.3f} | {r['contrast']['dice']:.3f} |",
        f"| a random labelled mask | {r['random_labelled_mask']['cosine']:.3f} | "
        f"{r['random_labelled_mask']['dice']:.3f} |",
        "",
        f"{r['same_report_text']:.1%} of the unlabelled images find a labelled report with exactly their own text; "
        f"ties go to the first such image, so only {r['distinct_contrast_masks_used']} distinct masks serve as "
        "contrast labels. Figure: docs/lv_contrast_qata.png. "
        f"Command: `python bench/lv_contrast.py --data QATA --fraction {r['fraction']} --seed {r['seed']}`; "
        f"machine: CPU {cpu_name()}.",
    ])
    write_marked_section(md, "lv-contrast", text)


if __name__ == "__main__":
    sys.exit(main())
