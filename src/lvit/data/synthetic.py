"""``lvit synth``: a seeded synthetic chest-radiograph dataset in the official LViT layout.

Each image is a PA-chest-like phantom (torso, two darker lung fields, ribs, clavicles, spine, heart and
mediastinum, soft-tissue gradient, vessel texture, blur, noise) with low-contrast fuzzy-edged opacities in
2-4 of the six lung zones (upper / middle / lower x left / right). Only the opacities in the zones named by
the report are lesions (in the mask); the others are distractors drawn from the same distribution, so the
image alone is ambiguous and the report resolves it. About 15 % of cases are normal: distractors only, an
empty mask and the report "No pulmonary infection.".

Side convention: as in the official LViT annotations (the LV-loss templates' "all left lung" lies on the
image's left), "left lung" means the lung on the IMAGE's left. (In radiographic convention that is the
patient's right lung; the reports here describe the image, like the official text.)

Deterministic: image ``i`` of a split depends only on (seed, split, i), and files are written with fixed
encoder settings and fixed timestamps, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import io
import json
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..core.io import atomic_write_bytes, atomic_write_text, prepare_output_dir
from .describe import LEVELS, SIDES, ZONES, Findings, format_report, named_zones

# The report template (sides, levels, zone order, number words) is lvit.data.describe's, shared with real data.
SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
SPLIT_DIRS = {"train": "Train", "val": "Val", "test": "Test"}
NORMAL_FRACTION = 0.15
NORMAL_REPORT = "No pulmonary infection."

# Nominal lung geometry in units of the image side (jittered per image). Zone bands are thirds of
# [LUNG_TOP, LUNG_BOTTOM]; lesion centres stay well inside their band, so a lesion's centroid always tells
# its zone (see zone_at).
LUNG_TOP, LUNG_BOTTOM = 0.15, 0.75
LUNG_CX = {"left": 0.30, "right": 0.70}
LUNG_HALF_WIDTH = 0.15


def zone_at(y: float, x: float, size: int) -> tuple[str, str]:
    """(level, side) of a pixel position in a synthetic image of side ``size``."""
    u, v = (x + 0.5) / size, (y + 0.5) / size
    side = "left" if u < 0.5 else "right"
    band = (v - LUNG_TOP) / ((LUNG_BOTTOM - LUNG_TOP) / 3)
    return LEVELS[int(np.clip(band, 0, 2))], side


def report_for(zones: list[tuple[str, str]]) -> str:
    """QaTa-COV19-style report naming the side(s), count and zones of the lesions (capitalised, as the official
    spreadsheets write it; :func:`lvit.data.describe.format_report` with ``capitalize=True``)."""
    return format_report(Findings.from_zones(zones), capitalize=True)


def parse_report(text: str) -> set[tuple[str, str]]:
    """Inverse of :func:`report_for`: the (level, side) zones a report names, synthetic or real (other text:
    the zones its "<levels> <side> lung" phrases name, often none). The whole structure of a report in the
    template (sides, count, zones): :func:`lvit.data.describe.parse_findings`."""
    return set(named_zones(text))


@dataclass
class SynthCase:
    image: np.ndarray  # [S, S] uint8
    mask: np.ndarray  # [S, S] uint8 {0, 255}
    lesion_zones: list[tuple[str, str]]
    distractor_zones: list[tuple[str, str]]
    report: str


@functools.lru_cache(maxsize=8)
def _upsampler(size: int, cells: int) -> np.ndarray:
    """``[size, cells]`` Gaussian interpolation weights: ``A @ grid @ A.T`` is a smooth upsampled field."""
    x = (np.arange(size) + 0.5) / size * cells - 0.5
    w = np.exp(-0.5 * ((x[:, None] - np.arange(cells)[None]) / 0.7) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a random ``cells x cells`` grid, smoothly upsampled."""
    a = _upsampler(size, cells)
    field = a @ rng.standard_normal((cells, cells)).astype(np.float32) @ a.T
    return field / (np.abs(field).max() + 1e-6)


@functools.lru_cache(maxsize=4)
def _anatomy(size: int) -> dict[str, np.ndarray]:
    """Per-size fixed fields (coordinates, ribs, clavicles, spine, torso, heart, mediastinum), computed
    once; each case jitters them by shifting rows."""
    coords = ((np.arange(size) + 0.5) / size).astype(np.float32)
    u, v = np.meshgrid(coords, coords)
    d = np.abs(u - 0.5)
    ribs = np.zeros((size, size), np.float32)
    for k in range(10):  # posterior ribs: curved bands, descending laterally
        centre = 0.12 + k * 0.062 - 0.9 * (d - 0.05) * (0.5 - d) + 0.1
        width = 0.010 + 0.004 * d
        ribs += np.exp(-(((v - centre) / width) ** 2)) * ((d > 0.04) & (d < 0.43))
    clavicles = np.exp(-(((v - (0.12 + 0.25 * (d - 0.08))) / 0.012) ** 2)) * (d > 0.03) * (d < 0.3)
    return {
        "u": u,
        "v": v,
        "ribs": ribs,
        "clavicles": clavicles.astype(np.float32),
        "spine": (np.exp(-(((u - 0.5) / 0.025) ** 2)) * (v > 0.1)).astype(np.float32),
        "torso": ((u - 0.5) / 0.47) ** 2 + ((v - 0.55) / 0.62) ** 2 < 1,
        "heart": ((u - 0.54) / 0.13) ** 2 + ((v - 0.63) / 0.11) ** 2 < 1,
        "mediastinum": (np.abs(u - 0.5) < 0.05 + 0.02 * (v > 0.5)) & (v > 0.08) & (v < 0.8),
        "abdomen": np.clip((v - 0.55) / 0.4, 0, 1).astype(np.float32),
    }


def _shift_rows(field: np.ndarray, rows: int) -> np.ndarray:
    """Shift a field down by ``rows`` (up if negative), repeating the edge row."""
    if rows == 0:
        return field
    idx = np.clip(np.arange(field.shape[0]) - rows, 0, field.shape[0] - 1)
    return field[idx]


def _blob(rng: np.random.Generator, size: int, cu: float, cv: float, radius: float):
    """A fuzzy opacity field in [0, 1] (1 at the core) of 1-3 rotated Gaussian lobes: varied shape/size.

    Returns (field, row slice, col slice): the field covers only the blob's neighbourhood.
    """
    half = 4.5 * radius
    r0, r1 = max(int((cv - half) * size), 0), min(int((cv + half) * size) + 1, size)
    c0, c1 = max(int((cu - half) * size), 0), min(int((cu + half) * size) + 1, size)
    v = ((np.arange(r0, r1) + 0.5) / size).astype(np.float32)[:, None]
    u = ((np.arange(c0, c1) + 0.5) / size).astype(np.float32)[None, :]
    field = np.zeros((r1 - r0, c1 - c0), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        du, dv = rng.normal(0, 0.45 * radius, 2)
        su, sv = radius * rng.uniform(0.55, 1.0, 2)
        theta = rng.uniform(0, np.pi)
        x, y = u - (cu + du), v - (cv + dv)
        xr, yr = x * np.cos(theta) + y * np.sin(theta), -x * np.sin(theta) + y * np.cos(theta)
        field = np.maximum(field, np.exp(-0.5 * ((xr / su) ** 2 + (yr / sv) ** 2)))
    return field, slice(r0, r1), slice(c0, c1)


def make_case(seed: int, split: str, index: int, size: int = 224) -> SynthCase:
    """One phantom, its mask and report; depends only on (seed, split, index, size)."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    a = _anatomy(size)
    u, v, torso = a["u"], a["v"], a["torso"]

    # Torso and soft tissue: brighter towards the abdomen, dark air outside the body.
    soft = 0.50 + 0.22 * a["abdomen"] + 0.04 * _smooth_noise(rng, size, 6)
    img = np.where(torso, soft, np.float32(0.06))

    # Lungs: ellipses narrowing towards the apex; per-image jitter of position and size.
    lung_mask = np.zeros((size, size), bool)
    lungs = {}
    for side in SIDES:
        cx = LUNG_CX[side] + rng.uniform(-0.015, 0.015)
        top = LUNG_TOP + rng.uniform(-0.015, 0.015)
        bottom = LUNG_BOTTOM + rng.uniform(-0.015, 0.015)
        half_w = LUNG_HALF_WIDTH * rng.uniform(0.92, 1.08)
        cy, half_h = (top + bottom) / 2, (bottom - top) / 2
        taper = 0.55 + 0.45 * np.clip((v - top) / (0.5 * (bottom - top)), 0, 1)  # narrow apex
        lung_mask |= ((u - cx) / (half_w * taper)) ** 2 + ((v - cy) / half_h) ** 2 < 1
        lungs[side] = (cx, half_w)
    # Heart (slightly to the image's right, as on a PA film) and mediastinum/spine hide the medial lung.
    lung_mask &= ~a["heart"] & ~a["mediastinum"]
    lung_soft = ndimage.gaussian_filter(lung_mask.astype(np.float32), 1.5 * size / 224)
    vessels = _smooth_noise(rng, size, 28)
    img = img - lung_soft * (0.30 + 0.03 * vessels + 0.05 * rng.uniform(-1, 1))
    img = img + 0.10 * (a["heart"] & torso) + 0.05 * a["spine"]
    # Ribs and clavicles: fixed shapes, shifted a few rows per case.
    shift = round(rng.uniform(-0.01, 0.01) * size)
    img = img + 0.07 * _shift_rows(a["ribs"], shift) * torso + 0.08 * _shift_rows(a["clavicles"], shift)

    # Opacities: blobs in 2-4 zones; the report's zones are lesions, the rest distractors.
    n_zones = int(rng.integers(2, 5))
    picked = [ZONES[i] for i in sorted(rng.choice(len(ZONES), n_zones, replace=False))]
    normal = rng.random() < NORMAL_FRACTION
    n_lesions = 0 if normal else int(rng.integers(1, n_zones))
    lesion_set = {picked[i] for i in rng.permutation(n_zones)[:n_lesions]}
    mask = np.zeros((size, size), bool)
    band = (LUNG_BOTTOM - LUNG_TOP) / 3
    texture = 1 + 0.35 * vessels
    min_core = 20 * (size / 224) ** 2  # pixels: every opacity's core is clearly visible and maskable
    for level, side in picked:
        cx, half_w = lungs[side]
        for _attempt in range(50):  # redraw until the core lies (>= 70 %) inside the lung and within its zone
            cv = LUNG_TOP + band * (LEVELS.index(level) + 0.5) + rng.uniform(-0.12, 0.12) * band
            lateral = -1 if side == "left" else 1  # keep off the medial edge (heart, mediastinum)
            cu = cx + lateral * rng.uniform(-0.05, 0.35) * half_w * (0.75 if level == "upper" else 1.0)
            radius = rng.uniform(0.04, 0.07)  # 9-16 px at 224: large enough to learn on 2 CPU cores, within one zone
            field, rows, cols = _blob(rng, size, cu, cv, radius)
            core = field > 0.5
            inside = core & lung_mask[rows, cols]
            # The core must stay inside its own zone band, so two lesions in neighbouring zones never merge
            # into one connected region whose zone the report would misname.
            core_rows = np.flatnonzero(core.any(axis=1)) + rows.start
            top = (LUNG_TOP + band * LEVELS.index(level)) * size
            in_band = core_rows.size > 0 and core_rows[0] > top + 1 and core_rows[-1] < top + band * size - 1
            if in_band and inside.sum() >= max(min_core, 0.7 * core.sum()):
                break
        contrast = rng.uniform(0.20, 0.32)  # visible haze; only the report says lesion vs look-alike
        img[rows, cols] += contrast * np.clip(1.25 * field, 0, 1) * texture[rows, cols] * lung_soft[rows, cols]
        if (level, side) in lesion_set:
            mask[rows, cols] |= inside
    lesion_zones = [z for z in picked if z in lesion_set]
    distractor_zones = [z for z in picked if z not in lesion_set]

    # Acquisition: blur, quantum noise, exposure/gamma variation.
    img = ndimage.gaussian_filter(img, rng.uniform(0.6, 1.1) * size / 224)
    img += rng.normal(0, rng.uniform(0.008, 0.02), img.shape).astype(np.float32)
    img = np.clip(img, 0, 1) ** np.float32(rng.uniform(0.85, 1.15))
    image = np.round(img * 255).astype(np.uint8)
    return SynthCase(image, mask.astype(np.uint8) * 255, lesion_zones, distractor_zones, report_for(lesion_zones))


# --- deterministic writers -------------------------------------------------------------------------------

_FIXED_TIME = _dt.datetime(2000, 1, 1, 0, 0, 0)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG with fixed encoder settings (no timestamps or metadata): same pixels -> same bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1, optimize=False)  # fast; fixed
    return buf.getvalue()


def _normalise_zip(data: bytes) -> bytes:
    """Rewrite a zip (xlsx) with fixed member timestamps and order, so it is byte-reproducible."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=(2000, 1, 1, 0, 0, 0))
            fixed.compress_type = zipfile.ZIP_DEFLATED
            fixed.external_attr = 0o644 << 16
            payload = src.read(info.filename)
            if info.filename == "docProps/core.xml":  # openpyxl stamps "modified" with the current time
                payload = re.sub(rb"(<dcterms:modified[^>]*>)[^<]*(<)", rb"\g<1>2000-01-01T00:00:00Z\g<2>", payload)
            dst.writestr(fixed, payload)
    return out.getvalue()


def xlsx_bytes(rows: list[tuple[str, str]], columns=("Image", "Description")) -> bytes:
    """An .xlsx with the official columns, fixed document properties and timestamps."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(list(columns))
    for row in rows:
        ws.append(list(row))
    wb.properties.creator = "lvit synth"
    wb.properties.created = _FIXED_TIME
    wb.properties.modified = _FIXED_TIME
    wb.properties.lastModifiedBy = "lvit synth"
    buf = io.BytesIO()
    wb.save(buf)
    return _normalise_zip(buf.getvalue())


def generate_synthetic(
    out: str | Path,
    n_train: int = 200,
    n_val: int = 40,
    n_test: int = 60,
    size: int = 224,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write the dataset to ``out`` (official layout) and return ``out``."""
    from tqdm import tqdm

    if size < 32:
        raise ValueError(f"size must be >= 32 px, got {size}")
    out = prepare_output_dir(out, force, what="dataset folder")
    started = time.perf_counter()
    counts = {"train": n_train, "val": n_val, "test": n_test}
    meta: dict = {"seed": seed, "size": size, "side_convention": "left = image left", "splits": {}}
    stats = {"cases": 0, "normal": 0, "lesions": 0, "distractors": 0}
    bar = tqdm(total=sum(counts.values()), desc="lvit synth", unit="img", disable=not progress)
    with _single_threaded_blas():
        _write_splits(out, seed, size, counts, meta, stats, bar)
    bar.close()
    atomic_write_text(out / "synth_meta.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "DATASHEET.md", _datasheet(counts, size, seed, stats))
    elapsed = time.perf_counter() - started
    if progress:
        print(f"wrote {stats['cases']} cases to {out} in {elapsed:.1f} s")
    return out


@contextlib.contextmanager
def _single_threaded_blas():
    """The tiny matrix products here are ~15x slower with a multi-threaded BLAS on a busy machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only speed depends on it
        yield
        return
    with threadpool_limits(1):
        yield


def _write_splits(out: Path, seed: int, size: int, counts: dict, meta: dict, stats: dict, bar) -> None:
    for split, n in counts.items():
        folder = out / f"{SPLIT_DIRS[split]}_Folder"
        rows, cases = [], []
        for i in range(n):
            case = make_case(seed, split, i, size)
            name = f"{split}_{i:04d}.png"
            mask_name = f"mask_{name}"  # QaTa-COV19 naming; the table's Image column holds the mask name
            atomic_write_bytes(folder / "img" / name, png_bytes(case.image))
            atomic_write_bytes(folder / "labelcol" / mask_name, png_bytes(case.mask))
            rows.append((mask_name, case.report))
            cases.append({"image": name, "mask": mask_name, "report": case.report,
                          "lesion_zones": [" ".join(z) for z in case.lesion_zones],
                          "distractor_zones": [" ".join(z) for z in case.distractor_zones]})
            stats["cases"] += 1
            stats["normal"] += not case.lesion_zones
            stats["lesions"] += len(case.lesion_zones)
            stats["distractors"] += len(case.distractor_zones)
            bar.update(1)
        atomic_write_bytes(folder / f"{SPLIT_DIRS[split]}_text.xlsx", xlsx_bytes(rows))
        meta["splits"][split] = cases


def _datasheet(counts: dict, size: int, seed: int, stats: dict) -> str:
    n = max(stats["cases"], 1)
    return f"""# Datasheet: lvit synthetic chest radiographs

Generated by `lvit synth` (lvit, seed {seed}, {size}x{size} px): {counts['train']} train / {counts['val']} val /
{counts['test']} test cases in the official LViT layout (`*_Folder/img`, `*_Folder/labelcol`,
`*_text.xlsx` with columns `Image` = mask file name and `Description` = report; masks are
`mask_<image name>` as in QaTa-COV19). Everything is synthetic: no patient data, no licence restrictions.

## Why
To exercise and test language-guided segmentation without downloading a medical dataset, on a task where
the report genuinely matters: a model that reads the report can beat one that cannot.

## What
- Image: an 8-bit grayscale PA-chest-like phantom: torso with a soft-tissue gradient, two darker lung
  fields, ribs, clavicles, spine, heart and mediastinum, vessel texture, blur and noise.
- Opacities: low-contrast, fuzzy-edged blobs of varied shape and size (1-3 Gaussian lobes) in 2-4 of the
  six zones (upper / middle / lower x left / right lung), one per zone.
- Lesions vs distractors: only the opacities in the zones named by the report are lesions (white in the
  mask, 0/255 PNG, foreground = opacity above half its peak, inside the lung). The others are distractors
  drawn from the same distribution, so the image alone is ambiguous and the report resolves it.
- Reports, QaTa-COV19 style: "Bilateral pulmonary infection, two infected areas, upper left lung and lower
  right lung." / "Unilateral pulmonary infection, one infected area, middle right lung."; normal cases
  (about {100 * NORMAL_FRACTION:.0f} %: distractors only, empty mask): "{NORMAL_REPORT}".
- Side convention: "left lung" is the lung on the IMAGE's left, as in the official LViT annotations
  (the LV-loss templates); in radiographic convention that is the patient's right lung.
- `synth_meta.json`: per case the lesion and distractor zones (ground truth for analysis).

## Statistics of this copy
{stats['cases']} cases; {stats['normal']} normal ({100 * stats['normal'] / n:.0f} %); {stats['lesions']} lesions and
{stats['distractors']} distractors ({stats['lesions'] / n:.2f} and {stats['distractors'] / n:.2f} per image).

## Caveats
- The reports are 9-18 word pieces long (BERT/MiniLM uncased vocabulary); the official setting keeps only
  10 tokens, which cuts most reports after their first zone ("... infected areas, upper left"). Use
  `text_tokens` (max_tokens) >= 18 to give the model the whole report.
- Phantoms are far simpler than real radiographs; figures on this data say nothing about clinical accuracy.
- Reproducible: the same arguments give byte-identical files (fixed PNG/XLSX settings and timestamps).
"""
