"""Files the tests write and modules they load by path, shared by several test modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    """A minimal 16-bit single-frame DICOM file (explicit VR little endian) holding ``pixels``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def load_bench(relative: str, name: str):
    """A bench script (path relative to the repository) as a module, registered in sys.modules under ``name``:
    dataclasses look their module up while the file executes, and pool workers unpickle its functions by name."""
    folder = str((REPO / relative).parent)
    if folder not in sys.path:  # bench scripts import their shared helper (bench/benchkit.py) from beside them
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_gpu_prepare():
    """bench/gpu/prepare.py as a module."""
    return load_bench("bench/gpu/prepare.py", "bench_gpu_prepare")


def semi_flag_overrides(out, *flags: str) -> list[str]:
    """The ``--set`` overrides that ``lvit train --out OUT FLAGS`` makes of its semi-supervised flags."""
    import argparse

    from lvit.commands import train as train_cmd
    from lvit.train.semi_flags import semi_overrides

    parser = argparse.ArgumentParser()
    train_cmd.register(parser.add_subparsers())
    return semi_overrides(parser.parse_args(["train", "--out", str(out), *flags]))


def train_tiny_lvit(base: Path, *, seed: int, n_val: int = 2, n_test: int = 3) -> tuple[Path, Path]:
    """(dataset root with 64 px images, run folder of a 1-epoch LViT working at 32 px), both under ``base``."""
    from lvit.data.synthetic import generate_synthetic
    from lvit.presets import preset_path
    from lvit.train import load_config
    from lvit.train.runner import train

    data = generate_synthetic(base / "data", n_train=6, n_val=n_val, n_test=n_test, size=64, seed=seed,
                              progress=False)
    config = load_config(preset_path("synth"), [
        "model.image_size=32", "model.base_channels=8", "model.vit_heads=4", "data.batch_size=3",
        "trainer.max_epochs=1", "trainer.progress=false", "data.num_workers=0"])
    train(config, data, base / "run")
    return data, base / "run"
