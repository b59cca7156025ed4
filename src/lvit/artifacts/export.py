"""ONNX export of a segmentation model and an ONNX Runtime session that runs it like the PyTorch model.

``export_onnx(model, path, ...)`` writes ``model.onnx`` atomically (refusing to overwrite without
``force``) with a dynamic batch axis, then checks the file with ``onnx.checker`` and compares ONNX Runtime's
logits with PyTorch's on the export inputs. ``OnnxSegmenter(path)`` wraps an ``onnxruntime.InferenceSession``
with the model's forward signature: ``segmenter(image, text, text_mask) -> logits`` (torch in, torch out).

Exporter choice (torch 2.13): the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) is the
default. On this machine it exports LViT in ~5 s at opset 17 with a dynamic batch axis and matches PyTorch to
~1e-7. The torch.export-based exporter (``dynamo=True``, needs onnxscript; ``exporter="dynamo"``) also works,
but took ~80 s for the same tiny model, and it only implements opset >= 18: asked for 17 it fails to
down-convert (an ONNX version-converter assertion on ``axes`` inputs) and silently keeps 18, so with it we
ask for ``max(opset, 18)`` and record the opset actually written.

Spatial size is fixed at export: LViT's ViT branch has learned position embeddings for a fixed number of
patches (``image_size / 16`` squared), so only the batch axis is dynamic. ONNX files record the image size
and text shape in their metadata (``lvit.image_size`` ...), which :class:`OnnxSegmenter` checks inputs against.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import CheckpointError, LvitError
from ..core.io import atomic_path, refuse_clobber

#: Default tolerance of the export check: max |logit_onnx - logit_torch| (fp32 both sides).
EXPORT_ATOL = 1e-3

INPUT_NAMES = ("image", "text", "text_mask")
#: ONNX metadata key of the sha256 of the weights a file was exported from (see :func:`weights_digest`).
WEIGHTS_KEY = "lvit.weights_sha256"


def weights_digest(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and values): equal iff the weights are equal."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def example_inputs(
    batch: int,
    image_size: int,
    in_channels: int = 3,
    text_tokens: int = 10,
    text_dim: int = 768,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic inputs of the model contract: image ``[B, C, H, W]`` in [0, 1], text ``[B, L, D]``,
    text_mask ``[B, L]`` bool (the last two tokens of every second sample are padding)."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, in_channels, image_size, image_size, generator=gen)  # [B, C, H, W]
    text = torch.randn(batch, text_tokens, text_dim, generator=gen)  # [B, L, D]
    text_mask = torch.ones(batch, text_tokens, dtype=torch.bool)  # [B, L]
    text_mask[1::2, -2:] = False
    return image, text, text_mask


def inputs_for(model: nn.Module, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`example_inputs` shaped for ``model.config`` (an ``LViTConfig``)."""
    cfg = model.config
    return example_inputs(
        batch, cfg.image_size, cfg.in_channels, cfg.text_tokens, cfg.text_dim, seed=seed
    )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = 17,
    force: bool = False,
    exporter: str = "torchscript",
    check: bool = True,
    atol: float = EXPORT_ATOL,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export ``model`` (eval mode, fp32) to ONNX at ``path`` with a dynamic batch axis.

    Returns a summary dict: ``path``, ``exporter``, ``opset``, ``inputs`` (names the graph kept),
    ``max_abs_diff`` (ORT vs PyTorch logits on a batch of 2, when ``check``). Raises
    :class:`~lvit.core.errors.OutputExistsError` if ``path`` exists and not ``force``, and
    :class:`~lvit.core.errors.LvitError` if the exported graph disagrees with PyTorch by more than ``atol``.
    """
    path = Path(path)
    refuse_clobber(path, force)
    if exporter not in ("dynamo", "torchscript"):
        raise LvitError(f"unknown ONNX exporter {exporter!r}; use 'dynamo' or 'torchscript'")
    was_training = model.training
    model = model.eval().float()
    cfg = model.config
    # Batch 2 traces the graph with a non-trivial batch (a batch of 1 invites shape specialisation).
    image, text, text_mask = inputs_for(model, batch=2)
    # Models that ignore the report (LViT-T, U-Net) get an image-only graph: no dead inputs to feed.
    reads_text = model_reads_text(model)
    graph = model if reads_text else _ImageOnly(model).eval()  # eval: exporters restore the wrapper's mode
    args = (image, text, text_mask) if reads_text else (image,)
    meta = {
        "lvit.image_size": str(cfg.image_size),
        "lvit.in_channels": str(cfg.in_channels),
        "lvit.text_tokens": str(cfg.text_tokens),
        "lvit.text_dim": str(cfg.text_dim),
        "lvit.config": json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else {}),
        WEIGHTS_KEY: weights_digest(model),  # keys the file to these weights (onnx_for_run checks it)
    }
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    try:
        with atomic_path(path) as tmp:
            _export_to(graph, args, tmp, opset=opset, exporter=exporter)
            _stamp_metadata(tmp, meta)
            if check:
                import onnx

                onnx.checker.check_model(str(tmp))
                max_abs = _compare_with_torch(graph, tmp, args)
                if not max_abs <= atol:
                    raise LvitError(
                        f"{path}: ONNX Runtime logits differ from PyTorch by {max_abs:.3g} (> {atol:g}); "
                        "file not written"
                    )
            else:
                max_abs = float("nan")
    finally:
        model.train(was_training)
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    written_opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    inputs = [i.name for i in proto.graph.input]
    return {"path": str(path), "exporter": exporter, "opset": written_opset, "inputs": inputs,
            "max_abs_diff": max_abs}


def model_reads_text(model: nn.Module) -> bool:
    """True for a text-guided LViT; False for LViT-T and U-Net (which ignore ``text``)."""
    from ..models import LViT

    return isinstance(model, LViT) and bool(model.config.use_text)


class _ImageOnly(nn.Module):
    """``image -> logits`` view of a model that ignores text, so the ONNX graph has one input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, n_classes, H, W]
        return self.model(image)


def _export_to(model: nn.Module, args: tuple, dest: Path, *, opset: int, exporter: str) -> None:
    names = list(INPUT_NAMES[: len(args)])
    # Silence the exporters' progress chatter and their warnings about ops they handle anyway.
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            opset = max(opset, 18)  # the dynamo exporter has no opset-17 implementations (see module doc)
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(
                model,
                args,
                input_names=names,
                output_names=["logits"],
                dynamic_shapes={name: {0: batch} for name in names},
                opset_version=opset,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
            # Weights inline (LViT is ~120 MB in fp32, under protobuf's 2 GB limit): one self-contained file.
            program.save(str(dest), external_data=False)
        else:
            torch.onnx.export(
                model,
                args,
                str(dest),
                input_names=names,
                output_names=["logits"],
                dynamic_axes={name: {0: "batch"} for name in (*names, "logits")},
                opset_version=opset,
                dynamo=False,
            )


def _stamp_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


@torch.no_grad()
def _compare_with_torch(graph: nn.Module, onnx_path: Path, args: tuple) -> float:
    expected = graph(*args).float()
    got = OnnxSegmenter(onnx_path, threads=torch.get_num_threads())(*args)
    return float((got - expected).abs().max())


class OnnxSegmenter:
    """An ONNX Runtime session with the model's call signature.

    ``OnnxSegmenter(path, threads=None)(image [B,C,H,W], text [B,L,D] | None, text_mask [B,L] | None)
    -> logits [B, n_classes, H, W]`` (float32 torch tensor on CPU). Inputs the exported graph dropped
    (LViT-T and U-Net ignore the text) are not fed. ``threads`` sets ORT's intra-op pool (default: as many
    as torch uses).
    """

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: ONNX model not found")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise CheckpointError(f"{self.path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.image_size = int(self.metadata["lvit.image_size"]) if "lvit.image_size" in self.metadata else None

    def __call__(
        self,
        image: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.image_size is not None and tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise LvitError(
                f"{self.path}: exported for {self.image_size}x{self.image_size} images, "
                f"got {tuple(image.shape[-2:])}; resize the input or re-export"
            )
        feeds_all = {"image": image, "text": text, "text_mask": text_mask}
        feeds: dict[str, np.ndarray] = {}
        for name in self.input_names:
            value = feeds_all.get(name)
            if value is None:
                raise LvitError(f"{self.path}: the exported model needs input {name!r}")
            array = value.detach().cpu().numpy()
            feeds[name] = array if name == "text_mask" else np.ascontiguousarray(array, dtype=np.float32)
        (logits,) = self.session.run(None, feeds)
        return torch.from_numpy(logits)


def onnx_for_run(model: nn.Module, run_dir: str | Path | None, opset: int = 17,
                 weights: str | Path | None = None) -> OnnxSegmenter:
    """The ONNX Runtime session for a loaded run (``lvit predict --backend onnx``).

    Uses ``<run>/model.onnx`` (from ``lvit export RUN --onnx RUN/model.onnx``) only when it was exported from
    exactly these weights (the sha256 in its metadata) and model config. Otherwise (no such file, or one left
    by other weights: a retrained run, ``last`` vs ``best``, an export from before the hash was recorded) the
    loaded model is exported for this session, with a one-line warning when a stale file was passed over. The
    temporary file is deleted as soon as ONNX Runtime has read it. ``weights``: the loaded weights file (named in
    that warning).
    """
    import shutil
    import tempfile

    from ..core.errors import warn

    cfg_json = json.dumps(model.config.to_dict())
    if run_dir is not None:
        candidate = Path(run_dir) / "model.onnx"
        if candidate.is_file():
            session = OnnxSegmenter(candidate)
            digest = weights_digest(model)
            if session.metadata.get("lvit.config") == cfg_json and session.metadata.get(WEIGHTS_KEY) == digest:
                return session
            why = ("records no weights hash (exported by an older lvit)" if WEIGHTS_KEY not in session.metadata
                   else "was exported from other weights" + (f" than {weights}" if weights else ""))
            warn(f"{candidate} {why}: not used; exporting the loaded weights for this session instead (refresh "
                 f"the file with `lvit export {run_dir} --onnx {candidate} --force`)")
    folder = Path(tempfile.mkdtemp(prefix="lvit-onnx-"))
    try:
        path = folder / "model.onnx"
        export_onnx(model, path, opset=opset, force=True)
        return OnnxSegmenter(path)  # the session holds the model in memory: the file is no longer needed
    finally:
        shutil.rmtree(folder, ignore_errors=True)
