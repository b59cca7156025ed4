"""Image and mask readers: PNG/JPEG/BMP/TIFF (Pillow, tifffile), DICOM (pydicom), NIfTI (nibabel).

Every reader returns uint8 arrays and raises :class:`~lvit.core.errors.DataError` naming the file and the problem
(missing, empty, truncated, unsupported), never a library traceback.

Conversions:
* images -> ``H x W x C`` uint8 with C = 1 (grayscale) or 3 (RGB); RGBA/LA drop alpha, palette -> RGB;
* more than 8 bits (16-bit PNG/TIFF, DICOM, float NIfTI) -> linearly rescaled per image from [min, max] to
  [0, 255] (DICOM after its rescale slope/intercept and VOI LUT; MONOCHROME1 is inverted);
* masks -> ``H x W`` uint8 {0, 1}: a mask holding exactly two values is foreground at the larger one, whatever
  it is (0/255, 0/1, but also 0/127, 0/38 or 0/2: masks saved with another label value); other masks (soft
  0..255 masks, JPEG noise) are foreground where value > 127 for 8 bits, above half the range for wider types,
  and masks whose values are all in {0, 1} are taken as is. A mask with nonzero pixels that binarises to empty
  is warned about (:func:`binarise_mask` with ``where``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..core.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz")
MIN_SIDE, MAX_SIDE = 16, 16384  # smaller or larger is almost certainly a broken or wrong file

MASK_THRESHOLD_8BIT = 127


def suffix_of(path: str | Path) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_image_file(path: str | Path) -> bool:
    return suffix_of(path) in IMAGE_SUFFIXES and not Path(path).name.startswith(".")


def stem_of(path: str | Path) -> str:
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def _to_uint8_range(arr: np.ndarray) -> np.ndarray:
    """Linearly map an array of any numeric type onto 0..255 (per image min/max)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, np.nanmin(np.where(finite, arr, np.inf)) if finite.any() else 0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning etc.: sizes are checked below
            with Image.open(path) as im:
                _check_side(path, *im.size)  # from the header alone, before decoding allocates the pixels
                im.load()  # force decoding now so truncation fails here
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                if im.mode in ("RGBA", "LA", "PA"):
                    im = im.convert("RGB" if im.mode != "LA" else "L")
                elif im.mode in ("CMYK", "YCbCr", "HSV", "LAB", "1"):
                    im = im.convert("RGB" if im.mode != "1" else "L")
                return np.array(im)  # a writable copy (torch.from_numpy warns on read-only arrays)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # header claims > 2x PIL's pixel limit: never decoded
        raise DataError(path, f"absurd image size, refused before decoding ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, f"unreadable or truncated image ({exc})") from None


def _check_side(path: Path, w: int, h: int) -> None:
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise DataError(path, f"absurd image size {w}x{h} (allowed {MIN_SIDE}..{MAX_SIDE} px per side)")


def _read_tiff(path: Path) -> np.ndarray:
    try:
        import tifffile

        arr = tifffile.imread(path)
    except Exception:  # noqa: BLE001 - tifffile raises many types; Pillow gets a second chance
        return _read_pil(path)
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) TIFF
    return arr


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array
        if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
            if arr.shape[0] != 1:
                raise DataError(path, f"DICOM has {arr.shape[0]} frames; lvit reads single 2-D images")
            arr = arr[0]
        if getattr(ds, "SamplesPerPixel", 1) == 1:
            arr = apply_voi_lut(apply_modality_lut(arr, ds), ds)
            if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
                arr = arr.max() - arr  # MONOCHROME1: high values are dark
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataError(path, f"unreadable DICOM ({exc})") from None
    return np.asarray(arr)


def _read_nifti(path: Path) -> np.ndarray:
    try:
        import nibabel as nib

        arr = np.asarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # noqa: BLE001
        raise DataError(path, f"unreadable NIfTI ({exc})") from None
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise DataError(path, f"NIfTI of shape {arr.shape}: lvit reads 2-D images or single slices")
    # NIfTI stores (x, y); transpose to (rows, cols) so images and masks from NIfTI display upright alike.
    return arr.T


def read_array(path: str | Path) -> np.ndarray:
    """Raw pixel array (any dtype) of an image file, with existence / empty-file / size checks."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    suffix = suffix_of(path)
    if suffix in (".tif", ".tiff"):
        arr = _read_tiff(path)
    elif suffix in (".dcm", ".dicom"):
        arr = _read_dicom(path)
    elif suffix in (".nii", ".nii.gz"):
        arr = _read_nifti(path)
    elif suffix in (".png", ".jpg", ".jpeg", ".bmp"):
        arr = _read_pil(path)
    else:
        raise DataError(path, f"unsupported image type {suffix!r} (use {', '.join(IMAGE_SUFFIXES)})")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4)):
        raise DataError(path, f"unsupported pixel layout {arr.shape}")
    h, w = arr.shape[:2]
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise DataError(path, f"absurd image size {w}x{h} (allowed {MIN_SIDE}..{MAX_SIDE} px per side)")
    return arr


def read_image(path: str | Path) -> np.ndarray:
    """-> ``H x W x C`` uint8, C in {1, 3}."""
    arr = read_array(path)
    if arr.ndim == 3:
        if arr.shape[-1] == 4:
            arr = arr[..., :3]  # drop alpha
        elif arr.shape[-1] == 2:
            arr = arr[..., :1]  # gray + alpha
    arr = _to_uint8_range(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.ascontiguousarray(arr)


def mask_values(arr: np.ndarray) -> np.ndarray:
    """The 2-D mask channel of a raw mask array (colour masks: max over colour channels)."""
    if arr.ndim == 3:
        colour = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
        arr = colour.max(axis=-1)
    return arr


def mask_threshold(arr: np.ndarray) -> float:
    """The documented rule: the smaller value of a two-valued mask; else 127 (8 bits), half the range (wider
    integers) or half the maximum (floats); 0 for a mask already in {0, 1}."""
    if arr.size:
        lo, hi = arr.min(), arr.max()
        if lo != hi and bool(np.all((arr == lo) | (arr == hi))):
            return float(lo)  # two values: the larger one is the label, whatever number it was saved as
        if hi <= 1:
            return 0.0  # already a 0/1 mask
    if arr.dtype == np.uint8:
        return float(MASK_THRESHOLD_8BIT)
    if np.issubdtype(arr.dtype, np.integer):
        return float(np.iinfo(arr.dtype).max // 2)
    return 0.5 * float(arr.max()) if arr.size else 0.0


def binarise_mask(arr: np.ndarray, threshold: float | None = None, where: str | Path | None = None) -> np.ndarray:
    """-> ``H x W`` uint8 {0, 1}. ``threshold=None`` picks the documented rule (:func:`mask_threshold`).
    ``where`` (the mask's file): warn when nonzero pixels binarise to an empty mask."""
    arr = mask_values(arr)
    if threshold is None:
        if arr.dtype == bool:
            return arr.astype(np.uint8)
        threshold = mask_threshold(arr)
    out = (arr > threshold).astype(np.uint8)
    if where is not None and arr.size and not out.any() and arr.max() > 0:
        from ..core.errors import warn

        warn(f"{where}: the mask has nonzero pixels (up to {arr.max():g}) but none above the threshold "
             f"{threshold:g}: read as an empty mask (no lesion)")
    return out


def read_mask(path: str | Path, threshold: float | None = None) -> np.ndarray:
    """-> ``H x W`` uint8 in {0, 1} (see module doc for the threshold rule); warns when the file's nonzero
    pixels binarise to an empty mask."""
    return binarise_mask(read_array(path), threshold, where=path)


def is_binary_mask(arr: np.ndarray) -> bool:
    """True when a raw mask holds only {0, 255}, {0, 1} (or a subset): what check-data expects."""
    values = np.unique(mask_values(arr))
    allowed = {0, 1} if values.size and values.max() <= 1 else {0, 255}
    if arr.dtype != np.uint8 and not (values.size and values.max() <= 1):
        allowed = {0, int(values.max())} if values.size else {0}
    return set(values.tolist()) <= allowed
