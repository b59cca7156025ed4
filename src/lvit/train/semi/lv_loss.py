"""The Language-Vision (LV) loss: guide unlabelled images with the mask of the nearest report.

Paper (LViT, Eqs. 16-18): each report is embedded as one vector; for an unlabelled image the contrast label is
the mask whose report has the highest cosine similarity (TextSim) with the image's report; the loss is
1 - cosine similarity (ImgSim) between the predicted segmentation and the contrast label, both flattened.
Official code: ``utils.WeightedDiceBCE_unsup`` adds ``0.1 * LV_loss`` to Dice + BCE; ``Load_Dataset.LV2D``
reads a fixed folder of 14 chest-X-ray template masks (``LV_loss/fig*.png`` binarised at > 0 after resizing)
whose reports live in ``LV_loss.xlsx`` (columns Image, Description); ``utils.img_similarity_vectors_via_numpy``
is the flattened-image cosine similarity. We ship those 14 templates (``default_contrast_bank``) and can build an
equivalent bank from the labelled part of any training set (``ContrastLabelBank.from_labelled``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...core.errors import DataError

TEMPLATE_TABLE = "LV_loss.xlsx"


def report_vectors(encoder, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """One L2-normalised vector per report ``[N, D]``: the mean of its valid token embeddings.

    ``encoder`` follows the ``lvit.text.TextEncoder`` contract: ``encode(texts) -> (emb [N, L, D], mask [N, L])``.
    Give it enough ``max_tokens`` to see the whole report: the laterality words of a QaTa-style report come
    after the first 10 tokens.
    """
    vectors = []
    for start in range(0, len(texts), batch_size):
        emb, mask = encoder.encode(list(texts[start : start + batch_size]))
        emb = torch.as_tensor(emb, dtype=torch.float32)  # [n, L, D]
        weight = torch.as_tensor(mask, dtype=torch.float32).unsqueeze(-1)  # [n, L, 1]
        pooled = (emb * weight).sum(1) / weight.sum(1).clamp_min(1.0)  # [n, D]
        vectors.append(F.normalize(pooled, dim=-1))
    if not vectors:
        return torch.zeros(0, getattr(encoder, "dim", 0))
    return torch.cat(vectors)


def nearest_labelled(unlabelled_vecs: torch.Tensor, labelled_vecs: torch.Tensor) -> torch.Tensor:
    """Index ``[U]`` (into the labelled rows ``[L, D]``) of the most cosine-similar report for each ``[U, D]`` row.

    Ties go to the lowest index (``torch.argmax`` returns the first maximum), so the choice is deterministic.
    """
    if labelled_vecs.shape[0] == 0:
        raise ValueError("the LV loss needs at least one labelled report to compare against")
    sim = F.normalize(unlabelled_vecs.float(), dim=-1) @ F.normalize(labelled_vecs.float(), dim=-1).T  # [U, L]
    return sim.argmax(dim=1)


def lv_loss(pred: torch.Tensor, contrast: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over the batch of ``1 - cos(pred_i, contrast_i)``, both flattened; inputs ``[B, 1, H, W]`` in [0, 1].

    ``pred`` is the predicted probability map (gradients flow through it); ``contrast`` is resized (nearest) to
    ``pred``'s size when they differ. An all-zero map has similarity 0 with anything (loss 1).
    """
    if contrast.shape[-2:] != pred.shape[-2:]:
        contrast = F.interpolate(contrast.float(), size=pred.shape[-2:], mode="nearest")
    sim = F.cosine_similarity(pred.flatten(1), contrast.to(pred.dtype).flatten(1), dim=1, eps=eps)  # [B]
    return (1.0 - sim).mean()


@dataclass
class ContrastLabelBank:
    """Contrast labels: masks ``[K, 1, H, W]`` float {0, 1} with one report each."""

    masks: torch.Tensor
    texts: list[str]
    names: list[str]

    def __post_init__(self):
        if self.masks.dim() != 4 or self.masks.shape[1] != 1 or self.masks.shape[0] != len(self.texts):
            raise ValueError(f"contrast masks must be [K, 1, H, W] with K reports, got {tuple(self.masks.shape)}")

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_folder(cls, folder: str | Path, image_size: int, table: str | None = None) -> ContrastLabelBank:
        """Read template masks + a table (columns ``Image``, ``Description``; XLSX or CSV) from ``folder``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(folder, "LV contrast-label folder does not exist")
        table_path = _find_table(folder, table)
        rows = _read_table(table_path)
        masks, texts, names = [], [], []
        for name, text in rows:
            masks.append(_read_template(folder / name, image_size))
            texts.append(text)
            names.append(name)
        return cls(torch.stack(masks), texts, names)

    @classmethod
    def from_labelled(cls, masks: torch.Tensor, texts: Sequence[str], names: Sequence[str]) -> ContrastLabelBank:
        """The labelled training images themselves as contrast labels (masks ``[K, 1, H, W]``)."""
        return cls((masks > 0.5).float(), list(texts), list(names))

    def assign(self, encoder, texts: Sequence[str]) -> torch.Tensor:
        """For each report in ``texts``, the index ``[U]`` of the contrast label with the nearest report."""
        return nearest_labelled(report_vectors(encoder, texts), report_vectors(encoder, self.texts))

    def resized(self, image_size: int) -> ContrastLabelBank:
        if self.masks.shape[-1] == image_size and self.masks.shape[-2] == image_size:
            return self
        masks = F.interpolate(self.masks, size=(image_size, image_size), mode="nearest")
        return ContrastLabelBank(masks, self.texts, self.names)


def default_contrast_folder() -> Path:
    """The packaged 14 chest-X-ray templates of the official LViT release (MIT licence)."""
    return Path(str(resources.files("lvit") / "resources" / "lv_contrast_labels"))


def default_contrast_bank(image_size: int = 224) -> ContrastLabelBank:
    return ContrastLabelBank.from_folder(default_contrast_folder(), image_size, TEMPLATE_TABLE)


# ---------------------------------------------------------------------- file helpers
def _find_table(folder: Path, table: str | None) -> Path:
    if table is not None:
        path = folder / table
        if not path.is_file():
            raise DataError(path, "LV contrast-label table not found")
        return path
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".xlsx", ".csv"))
    if len(found) != 1:
        raise DataError(folder, f"expected one .xlsx/.csv table of template reports, found {len(found)}")
    return found[0]


def _read_table(path: Path) -> list[tuple[str, str]]:
    import pandas as pd

    try:
        df = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_excel(path)
    except Exception as exc:  # pandas raises many types for unreadable files
        raise DataError(path, f"cannot read the table ({exc.__class__.__name__}: {exc})") from None
    missing = {"Image", "Description"} - set(df.columns)
    if missing:
        raise DataError(path, f"table lacks column(s) {sorted(missing)} (needs Image, Description)")
    rows = [(str(i).strip(), str(d).strip()) for i, d in zip(df["Image"], df["Description"]) if str(i).strip()]
    if not rows:
        raise DataError(path, "table lists no template masks")
    return rows


def _read_template(path: Path, image_size: int) -> torch.Tensor:
    from PIL import Image

    if not path.is_file():
        raise DataError(path, "template mask listed in the LV table is missing")
    try:
        with Image.open(path) as im:
            # Palette PNGs: convert to grey through the palette, as cv2.imread(..., 0) does in the official code.
            grey = im.convert("L").resize((image_size, image_size), Image.BILINEAR)
    except OSError as exc:
        raise DataError(path, f"cannot read template mask ({exc})") from None
    # Official LV2D: resize, then mask > 0 -> 1.
    return torch.from_numpy((np.asarray(grey) > 0).astype(np.float32)).unsqueeze(0)  # [1, H, W]
