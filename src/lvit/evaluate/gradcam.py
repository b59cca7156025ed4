"""Grad-CAM for segmentation networks: which features of a layer drove the predicted region.

Grad-CAM (Selvaraju et al., 2017) weights a layer's activation channels by the spatial mean of the gradient
of a scalar score and keeps the positive part. A segmentation network has no class score, so
:class:`SegmentationScore` makes one: the summed logits of the target class *inside the predicted mask*
(the evidence for the region the model actually outputs), or over the whole image when the prediction is
empty (so an all-background prediction still gets a map instead of a zero gradient).

MONAI's :class:`monai.visualize.GradCAM` does the weighting. Its stock hook container registers *full*
backward hooks, which autograd rejects as soon as a layer's output is later modified in place (LViT adds the
CNN features into the Reconstruct output with ``add_`` and uses in-place ReLUs), and it expects
``[B, C, H, W]`` activations whereas the ViT levels output tokens ``[B, N, C]``. :class:`LayerTaps` is a
drop-in replacement for MONAI's ``ModelWithHooks``: a forward hook clones the activation and puts a tensor
hook on the output for its gradient (both unaffected by later in-place ops), token outputs are folded back
to their patch grid ``[B, C, h, w]``, and one forward/backward pass serves every requested layer.

Maps are returned at the size the caller asks for (the original image size), min-max scaled to [0, 1] with
1 = most important (MONAI's default normaliser flips that: 1 = least important). This module computes;
:mod:`lvit.evaluate.explanation` draws and writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from monai.visualize.class_activation_maps import ModelWithHooks
from torch import nn

from ..core.errors import ConfigError

#: Module classes whose outputs the paper's interpretability figure shows: the CNN decoder levels and the
#: pixel-level attention (PLAM) gates of the skip connections. ``UNetUpBlock`` covers the U-Net baseline.
DEFAULT_LAYER_CLASSES = ("UpBlock", "UNetUpBlock", "PixelLevelAttention")


# --------------------------------------------------------------------------------------------------------
# The scalar target
# --------------------------------------------------------------------------------------------------------
class SegmentationScore(nn.Module):
    """Wrap a segmentation network so it returns one score per image, as a classifier would: ``[B, 1]``.

    ``image [B, C, H, W]`` (+ ``text [B, L, D]``, ``text_mask [B, L]``) -> ``[B, 1]``. The score is the sum
    of the target class's logits over the pixels predicted as that class (logit > 0 for a one-channel
    model, argmax for several), or over all pixels when none is. The logits of the last call are kept in
    ``last_logits`` so the caller gets the prediction without a second forward pass.
    """

    def __init__(self, model: nn.Module, target_class: int | None = None):
        super().__init__()
        self.model = model
        self.target_class = target_class
        self.last_logits: torch.Tensor | None = None
        # Mirror the wrapped model's mode: MONAI restores the *wrapper's* mode after each call, and a fresh
        # module is in training mode, which would silently switch an eval model to training.
        self.train(model.training)

    def forward(self, image: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model(image, text, text_mask)  # [B, K, H, W]
        self.last_logits = logits.detach()
        n_classes = logits.shape[1]
        target = self.target_class if self.target_class is not None else (0 if n_classes == 1 else 1)
        if not 0 <= target < n_classes:
            raise ConfigError(f"Grad-CAM target class {target} is not one of the model's {n_classes} classes")
        class_logits = logits[:, target]  # [B, H, W]
        with torch.no_grad():
            inside = class_logits > 0 if n_classes == 1 else logits.argmax(dim=1) == target  # [B, H, W]
            empty = ~inside.flatten(1).any(dim=1)  # [B]
            inside = inside | empty[:, None, None]  # empty prediction -> the whole image
        return (class_logits * inside).flatten(1).sum(dim=1, keepdim=True)  # [B, 1]


# --------------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------------
def _token_grid(n_tokens: int, height: int, width: int) -> tuple[int, int] | None:
    """The patch grid ``(h, w)`` with ``h * w == n_tokens`` and the image's aspect ratio, or None."""
    aspect = height / width
    h = max(1, round(math.sqrt(n_tokens * aspect)))
    for cand in (h, h - 1, h + 1):
        if cand > 0 and n_tokens % cand == 0 and abs(cand / (n_tokens // cand) - aspect) < 0.25 * aspect:
            return cand, n_tokens // cand
    return None


def _plausible_map(shape: tuple[int, ...], image_hw: tuple[int, int]) -> bool:
    """A ``[B, C, h, w]`` output on a grid that divides the image (rules out channels-last ``[B, H, W, C]``)."""
    h, w = shape[-2:]
    return image_hw[0] % h == 0 and image_hw[1] % w == 0 and image_hw[0] // h == image_hw[1] // w


def _as_spatial(t: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor | None:
    """``[B, C, H, W]`` unchanged; ViT tokens ``[B, N, C]`` -> ``[B, C, h, w]``; anything else -> None."""
    if t.ndim == 4:
        return t
    if t.ndim == 3:
        grid = _token_grid(t.shape[1], *image_hw)
        if grid is not None:
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)
    return None


class LayerTaps(ModelWithHooks):
    """MONAI's ``ModelWithHooks`` with forward + tensor hooks (robust to in-place ops) and token folding.

    ``__call__(x, class_idx, retain_graph, **kwargs) -> (logits, activations, gradients)`` as MONAI's; the
    result of the last input is reused, so ``GradCAM(..)(x, layer_idx=i)`` over all ``i`` costs one
    forward and one backward pass.
    """

    def __init__(self, nn_module: nn.Module, target_layer_names: list[str], inner: nn.Module):
        # Not calling ModelWithHooks.__init__: it would register the full backward hooks we avoid.
        self.model = nn_module
        self.target_layers = tuple(target_layer_names)
        self.register_forward = True
        self.register_backward = True
        self.gradients: dict[str, torch.Tensor] = {}
        self.activations: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.score: torch.Tensor | None = None
        self.class_idx: int | None = None
        self._image_hw = (1, 1)
        # The inputs of the cached result are kept (not their ids: a freed tensor's id can be reused).
        self._cached_inputs: tuple | None = None
        self._cache: tuple | None = None
        modules = dict(inner.named_modules())
        missing = [name for name in self.target_layers if name not in modules]
        if missing:
            raise ConfigError(f"unknown layer(s) {', '.join(missing)}; list them with `lvit explain --list-layers`")
        self._handles = [modules[name].register_forward_hook(self._tap(name)) for name in self.target_layers]

    def _tap(self, name: str):
        def hook(_module, _inputs, output):
            self.calls[name] = self.calls.get(name, 0) + 1
            if not torch.is_tensor(output):
                raise ConfigError(f"layer {name} returns {type(output).__name__}, not a tensor; choose another layer")
            spatial = _as_spatial(output, self._image_hw)
            if spatial is None:
                raise ConfigError(f"layer {name} output {tuple(output.shape)} is neither [B, C, H, W] nor tokens "
                                  "[B, N, C] on the patch grid; choose another layer")
            # Clone: a later in-place op (e.g. ``add_``) must not change what we explain.
            self.activations[name] = spatial.detach().clone()
            if output.requires_grad:
                output.register_hook(lambda grad: self.gradients.__setitem__(name, _as_spatial(grad, self._image_hw)))
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.forget()

    def forget(self) -> None:
        """Drop the cached pass (and the tensors it holds)."""
        self._cached_inputs = self._cache = None

    def _is_cached(self, x, class_idx, kwargs) -> bool:
        if self._cached_inputs is None:
            return False
        cached_x, cached_idx, cached_kwargs = self._cached_inputs
        return (cached_x is x and cached_idx == class_idx and cached_kwargs.keys() == kwargs.keys()
                and all(cached_kwargs[k] is v for k, v in kwargs.items()))

    def __call__(self, x, class_idx=None, retain_graph=False, **kwargs):
        if self._is_cached(x, class_idx, kwargs):
            return self._cache
        self.forget()
        self.gradients.clear()
        self.activations.clear()
        self.calls.clear()
        self._image_hw = tuple(x.shape[-2:])
        with torch.enable_grad():
            result = super().__call__(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        for name in self.target_layers:
            if self.calls.get(name, 0) != 1:
                raise ConfigError(f"layer {name} ran {self.calls.get(name, 0)} times in one forward pass; "
                                  "Grad-CAM needs a layer that runs exactly once")
            if name not in self.gradients:
                raise ConfigError(f"layer {name} does not influence the prediction (no gradient reaches it); "
                                  "choose another layer")
        self._cached_inputs, self._cache = (x, class_idx, dict(kwargs)), result
        return result


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
@dataclass
class LayerInfo:
    """One module Grad-CAM can explain: its name in ``model.named_modules()``, class and output shape."""

    name: str
    kind: str  # "cnn" ([B, C, H, W]) or "vit" (tokens [B, N, C] folded to the patch grid)
    module_class: str
    output_shape: tuple[int, ...]
    default: bool


def _dummy_inputs(model: nn.Module, image_size: int | None = None):
    cfg = getattr(model, "config", None)
    size = image_size or getattr(cfg, "image_size", 224)
    channels = getattr(cfg, "in_channels", 3)
    param = next(model.parameters())
    image = torch.zeros(1, channels, size, size, device=param.device)
    text = text_mask = None
    if getattr(cfg, "use_text", False):
        text = torch.zeros(1, cfg.text_tokens, cfg.text_dim, device=param.device)
        text_mask = torch.ones(1, cfg.text_tokens, dtype=torch.bool, device=param.device)
    return image, text, text_mask


def list_layers(model: nn.Module, image_size: int | None = None) -> list[LayerInfo]:
    """Every module that runs once per forward pass and outputs a map or patch tokens, in module order."""
    image, text, text_mask = _dummy_inputs(model, image_size)
    seen: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m, _i, out, name=name):
            seen.setdefault(name, []).append(tuple(out.shape) if torch.is_tensor(out) else None)

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(image, text, text_mask)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    layers = []
    for name, module in model.named_modules():
        shapes = seen.get(name)
        if not shapes or len(shapes) != 1 or shapes[0] is None:
            continue
        shape = shapes[0]
        if len(shape) == 4 and _plausible_map(shape, image.shape[-2:]):
            kind = "cnn"
        elif len(shape) == 3 and _token_grid(shape[1], *image.shape[-2:]) is not None:
            kind = "vit"
        else:
            continue
        cls = type(module).__name__
        layers.append(LayerInfo(name, kind, cls, shape, cls in DEFAULT_LAYER_CLASSES))
    return layers


def default_layers(model: nn.Module) -> list[str]:
    """The paper's choice: decoder levels and PLAM gates (falls back to the last four spatial layers)."""
    names = [name for name, module in model.named_modules() if type(module).__name__ in DEFAULT_LAYER_CLASSES]
    if names:
        return names
    return [info.name for info in list_layers(model) if info.kind == "cnn"][-4:]


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max scaling to [0, 1] (1 = most important); a constant map becomes all zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    span = (flat.max(dim=1).values.view(-1, 1, 1, 1) - low).clamp_min(1e-12)
    return ((maps - low) / span).clamp(0, 1)


@dataclass
class Explanation:
    """Grad-CAM maps of one image: ``cams[layer]`` ``HxW`` float32 in [0, 1] at the requested size,
    ``probability`` ``HxW`` float32 (the target class, at the requested size), ``score`` the explained scalar."""

    cams: dict[str, np.ndarray]
    probability: np.ndarray
    score: float


class SegmentationGradCAM:
    """Grad-CAM of chosen layers of a segmentation model (MONAI GradCAM over :class:`LayerTaps`).

    >>> explainer = SegmentationGradCAM(model, ["up.0", "up.0.attention", "vit_up.0"])
    >>> result = explainer(image, text, text_mask, size=(512, 512))   # image [1, C, H, W]
    >>> result.cams["up.0"].shape
    (512, 512)
    """

    def __init__(self, model: nn.Module, layers: list[str] | None = None, target_class: int | None = None):
        self.model = model
        self.layers = list(layers) if layers else default_layers(model)
        if not self.layers:
            raise ConfigError("no layer to explain: pass --layers (see --list-layers)")
        self.scorer = SegmentationScore(model, target_class)
        self.taps = LayerTaps(self.scorer, self.layers, inner=model)
        # Upsampling to the caller's size happens in __call__; MONAI only computes the raw weighted maps.
        self.cam = GradCAM(nn_module=self.taps, target_layers=self.layers)

    def close(self) -> None:
        """Remove the hooks from the model."""
        self.taps.remove()

    def __enter__(self) -> SegmentationGradCAM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, image: torch.Tensor, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                 size: tuple[int, int] | None = None) -> Explanation:
        """``image [1, C, H, W]`` in [0, 1] -> maps of every layer, resized to ``size`` (default ``H x W``)."""
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"explain one image at a time: expected [1, C, H, W], got {tuple(image.shape)}")
        size = tuple(size or image.shape[-2:])
        # The input must require grad so every activation downstream of the image is on the graph, even
        # when the loaded model's parameters are frozen.
        x = image.detach().clone().requires_grad_(True)
        kwargs = {"text": text, "text_mask": text_mask}
        self.taps.forget()
        cams = {}
        for idx, layer in enumerate(self.layers):
            raw = self.cam.compute_map(x, class_idx=0, layer_idx=idx, **kwargs)  # [1, 1, h, w] >= 0
            up = F.interpolate(raw.detach().float(), size=size, mode="bilinear", align_corners=False)
            cams[layer] = _normalise(up)[0, 0].cpu().numpy().astype(np.float32)
        # As `lvit predict`: logits resized to the requested size first, then sigmoid (softmax).
        logits = F.interpolate(self.scorer.last_logits.float(), size=size, mode="bilinear", align_corners=False)
        n_classes = logits.shape[1]
        target = self.scorer.target_class if self.scorer.target_class is not None else (0 if n_classes == 1 else 1)
        probs = torch.sigmoid(logits[:, :1]) if n_classes == 1 else logits.softmax(1)[:, target:target + 1]
        probability = probs[0, 0]  # [H, W]
        score = float(self.taps.score.detach().sum()) if self.taps.score is not None else float("nan")
        return Explanation(cams, probability.cpu().numpy().astype(np.float32), score)


# --------------------------------------------------------------------------------------------------------
# One image, end to end (what `lvit explain` runs)
# --------------------------------------------------------------------------------------------------------
TextEncodeFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # reports -> ([N, L, D], [N, L] bool)


def model_input(image: np.ndarray, model: nn.Module) -> torch.Tensor:
    """HxWxC uint8 -> ``[1, in_channels, S, S]`` at the model's training size, preprocessed exactly as for
    training and testing (:func:`lvit.data.prepare_image`), so the explanation is of the tested input."""
    from ..data import prepare_image

    cfg = model.config
    return prepare_image(image, cfg.image_size, cfg.in_channels)[None].to(next(model.parameters()).device)


def explain_image(model: nn.Module, image: np.ndarray, texts: list[str], encode: TextEncodeFn | None,
                  layers: list[str] | None = None) -> list[Explanation]:
    """Grad-CAM of ``layers`` for the same ``image`` (HxWxC uint8) under each report in ``texts``; maps
    and probabilities at the image's own size. ``encode`` is None for text-free models; an empty report (a model
    trained with report dropout) is explained through the model's no-report path."""
    x = model_input(image, model)
    size = image.shape[:2]
    uses_text = bool(getattr(model.config, "use_text", False)) and encode is not None
    given = [i for i, t in enumerate(texts) if t is not None and str(t).strip()] if uses_text else []
    if given:
        emb, mask = encode([texts[i] for i in given])  # [N, L, D], [N, L]
        rows = {i: (emb[j:j + 1].to(x.device), mask[j:j + 1].to(x.device)) for j, i in enumerate(given)}
    results = []
    with SegmentationGradCAM(model, layers) as explainer:
        for i in range(len(texts)):
            text, text_mask = rows[i] if i in given else (None, None)
            results.append(explainer(x, text, text_mask, size=size))
    return results


__all__ = [
    "DEFAULT_LAYER_CLASSES", "Explanation", "LayerInfo", "LayerTaps", "SegmentationGradCAM", "SegmentationScore",
    "default_layers", "explain_image", "list_layers", "model_input",
]
