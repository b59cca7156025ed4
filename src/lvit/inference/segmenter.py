"""The one way from input to answer: :class:`Segmenter`, built once from a run folder, a model folder, a weights
file or a shipped model's name, used by ``lvit predict``, ``lvit test``, ``lvit explain``, ``lvit app`` and the
benchmarks.

A Segmenter reads the run's config once (cheap: the model is loaded on first use, so a command checks its inputs
before the slow part) and owns everything an answer needs: the network, the text encoder (built on first use:
the no-report path never loads it), the report checker, the report writer (``lvit train-reporter``; the one named
or the run's own) and the model's no-report path (report dropout).

Preprocessing is the training pipeline's (:func:`lvit.data.prepare_image`: channels converted, scaled to [0, 1],
resized to the model's ``image_size``). The logits are resized back to the original ``H x W`` (bilinear) before
the sigmoid, so a probability map has the input's exact size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..artifacts.runs import BEST_WEIGHTS, CKPT_DIR, LAST_WEIGHTS, LoadedRun, model_image_size, model_in_channels
from ..core.errors import CheckpointError, ConfigError, LvitError
from ..models.pretrained import REPORT_CACHE

TextFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
TITLES = {"lvit": "LViT", "lvit-t": "LViT-T (no text)", "unet": "U-Net"}
#: How a model with a no-report path answers an image without a report: ``learned``, its learned stand-in for
#: the report (one pass); ``self-described``, that pass, then the report ``lvit describe``'s rules write from its
#: mask (sides, count, zones) read back as the image's report (a second pass; needs the text encoder).
NO_REPORT_PATHS = ("learned", "self-described")
# Images without a report, for a model that reads one and has no no-report path of its own: its answers with the
# report writer's this-many most likely reports are averaged (chosen on QaTa-COV19's validation split,
# bench/written_mixture.json).
MIXED_REPORTS = 16


def model_reads_text(run_config: dict) -> bool:
    return run_config.get("model_name") == "lvit" and bool(run_config.get("model", {}).get("use_text", True))


def model_has_no_report_path(run_config: dict) -> bool:
    """A text-guided model trained with report dropout: it also answers without a report."""
    return model_reads_text(run_config) and float(run_config.get("model", {}).get("report_dropout") or 0.0) > 0.0


def missing_report(text: str | None) -> bool:
    return text is None or not str(text).strip()


def resolve_device(name: str | torch.device, flag: str = "--device") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a torch.device, checked against this machine and torch build;
    anything else is a one-line ConfigError naming ``flag`` (never torch's traceback)."""
    if isinstance(name, torch.device):
        device = name
    else:
        try:
            device = torch.device(str(name).strip())
        except (RuntimeError, ValueError):
            raise ConfigError(f"{flag} {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None else
                   "no CUDA GPU is visible")
            raise ConfigError(f"{flag} {name}: {why} (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {name}: there are only {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return device
    if device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(f"{flag} {name}: MPS is not available on this machine; use --device cpu")
        return device
    raise ConfigError(f"{flag} {name}: lvit runs on cpu, cuda (cuda:N) or mps")


def read_run(source: str | Path) -> tuple[Path, Path, dict]:
    """(run or model folder, weights file, run config) without loading the model."""
    from ..artifacts.runs import read_run_config, resolve_run

    run_dir, weights = resolve_run(source)
    return run_dir, weights, read_run_config(run_dir)


def run_text_encoder(run: LoadedRun, cache_dir: str | Path | None = None) -> TextFn | None:
    """``texts -> (emb [N, L, D], mask [N, L])`` for the model of a loaded run, or None if the model ignores text.

    Rebuilds the encoder recorded in the run config (``text_encoder.spec``); the learned backend uses the
    trained embedding layer :func:`lvit.artifacts.runs.load_run` loaded (``run.text_embedding``). A model folder's
    training reports, shipped encoded, need no text model.
    """
    from ..text import encode_cached, get_text_encoder

    run_config, run_dir = run.config, run.run_dir
    if not model_reads_text(run_config):
        return None
    info = run_config.get("text_encoder") or {}
    spec = info.get("spec")
    if not spec:
        raise CheckpointError("run config has no text_encoder.spec; cannot encode reports for this model")
    max_tokens = int(info.get("max_tokens", run_config["model"].get("text_tokens", 10)))
    if spec.startswith("learned:"):
        vocab = Path(spec[len("learned:"):])
        if not vocab.is_absolute():
            vocab = Path(run_dir) / vocab
        encoder = get_text_encoder(f"learned:{vocab}")
        embedding = run.text_embedding
        if embedding is None:
            raise CheckpointError(f"{run_dir}: learned text backend but no text embedding weights in the checkpoint")

        @torch.no_grad()
        def encode_learned(texts: list[str]):
            ids, mask = encoder.tokenize(list(texts))  # [N, L]
            device = next(embedding.parameters()).device
            return embedding(ids.to(device)).float().cpu(), mask

        return encode_learned
    encoder = get_text_encoder(spec, max_tokens, min_words=int(info.get("min_words", 9)))
    if encoder.dim != run_config["model"]["text_dim"]:
        raise CheckpointError(f"text encoder {spec} gives {encoder.dim}-d vectors but the model expects "
                              f"{run_config['model']['text_dim']}-d")
    shipped = Path(run_dir) / REPORT_CACHE
    if run.is_model_folder and shipped.is_file():  # the training reports, encoded when the folder was made
        from ..text.cache import encode_with_rows

        return lambda texts: encode_with_rows(encoder, list(texts), shipped, cache_dir)
    return lambda texts: encode_cached(encoder, list(texts), cache_dir)


def to_original_size(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits ``[B, 1, S, S]`` -> probabilities ``[B, 1, H, W]`` (bilinear on logits, then sigmoid)."""
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)


class Segmenter:
    """Segment images with a trained model. ``source``: a run folder, a model folder, a weights file or a shipped
    model's name; ``backend``: ``torch`` or ``onnx`` (ONNX Runtime, see :mod:`lvit.artifacts.export`);
    ``cache_dir``: where encoded reports are cached; ``reporter``: a report writer folder (default: the run's own
    ``RUN/reporter/``, if any); ``no_report_path``: one of :data:`NO_REPORT_PATHS`, for images without a report."""

    def __init__(self, source: str | Path, device: str | torch.device = "cpu", backend: str = "torch",
                 cache_dir: str | Path | None = None, reporter: str | Path | None = None,
                 no_report_path: str = "learned"):
        if backend not in ("torch", "onnx"):
            raise ConfigError(f"unknown backend {backend!r} (available: torch, onnx)")
        if no_report_path not in NO_REPORT_PATHS:
            raise ConfigError(f"unknown no-report path {no_report_path!r} (available: {', '.join(NO_REPORT_PATHS)})")
        self.no_report_path = no_report_path
        self.device = resolve_device(device)
        if backend == "onnx" and self.device.type != "cpu":
            raise ConfigError("the onnx backend runs on CPU (ONNX Runtime's CPU provider): use --device cpu")
        if reporter is not None and not Path(reporter).is_dir():
            raise ConfigError(f"--reporter {reporter}: not a folder (give a folder written by lvit train-reporter)")
        self.source = source
        self.backend = backend
        self.run_dir, self.weights, self.run_config = read_run(source)  # the one read of the config
        self.reporter = reporter
        self.cache_dir = cache_dir
        self._run: LoadedRun | None = None
        self._model = None
        self._encode_text: TextFn | None = None
        self._checker = None
        self._writer = None
        self._threshold: tuple[dict | None] | None = None
        self.last_descriptions: list[str] = []  # the self-described path's reports of the last batch

    # ------------------------------------------------------------------ what the model is (no load needed)
    @property
    def model_name(self) -> str:
        return str(self.run_config.get("model_name"))

    @property
    def title(self) -> str:
        return TITLES.get(self.model_name, self.model_name)

    @property
    def uses_text(self) -> bool:
        """Whether the model reads reports (LViT; not LViT-T or U-Net)."""
        return model_reads_text(self.run_config)

    @property
    def has_no_report_path(self) -> bool:
        """Whether the model also answers without a report (trained with ``model.report_dropout``)."""
        return model_has_no_report_path(self.run_config)

    image_size = property(lambda self: model_image_size(self.run_config))

    @property
    def threshold_record(self) -> dict | None:
        """The threshold chosen for these weights on validation data (:mod:`lvit.artifacts.threshold`), or None."""
        if self._threshold is None:
            from ..artifacts.runs import is_model_folder
            from ..artifacts.threshold import read_threshold

            self._threshold = (read_threshold(self.run_dir, self.run_config, self.weights,
                                              is_model_folder(self.run_dir)),)
        return self._threshold[0]

    @property
    def threshold(self) -> float:
        """The probability at which this model's masks are cut: its chosen threshold, else 0.5."""
        from ..artifacts.threshold import DEFAULT_THRESHOLD

        record = self.threshold_record
        return DEFAULT_THRESHOLD if record is None else float(record["threshold"])
    in_channels = property(lambda self: model_in_channels(self.run_config))

    def warn_about_weights(self) -> None:
        """Print :meth:`weights_warning` when there is one."""
        from ..core.errors import warn

        note = self.weights_warning()
        if note:
            warn(note)

    def weights_warning(self) -> str | None:
        """A one-line warning when a run folder was given but its best weights are missing (last ones used)."""
        if Path(self.source).is_dir() and Path(self.weights).name == LAST_WEIGHTS:
            return (f"{self.source}: no {CKPT_DIR}/{BEST_WEIGHTS}; using {self.weights} (the weights after the last "
                    "finished epoch, not those of the best validation epoch)")
        return None

    def report_path(self, texts: Sequence[str | None] | None) -> str:
        """Which path answers for these reports: ``report``, ``no report`` (the model's learned no-report path),
        ``mixed`` (some images have one) or ``image only`` (a text-free model)."""
        if not self.uses_text:
            return "image only"
        missing = [missing_report(t) for t in texts] if texts is not None else [True]
        return "no report" if all(missing) else "mixed" if any(missing) else "report"

    # ------------------------------------------------------------------ what it owns, made on first use
    @property
    def run(self) -> LoadedRun:
        """The loaded run (the network in eval mode on the device)."""
        if self._run is None:
            from ..artifacts.runs import load_run

            self._run = load_run(self.source, map_location=self.device,
                                 resolved=(self.run_dir, self.weights, self.run_config))
        return self._run

    @property
    def model(self):
        """The network (or, with the onnx backend, an ONNX Runtime session with the same call and logits)."""
        if self._model is None:
            model = self.run.model
            if self.backend == "onnx":  # <run>/model.onnx if exported, else exported now
                from ..artifacts.export import onnx_for_run

                model = onnx_for_run(model, None if self.run.is_model_folder else self.run_dir, weights=self.weights)
            self._model = model
        return self._model

    @property
    def encode_text(self) -> TextFn | None:
        """``texts -> (emb [N, L, D], mask [N, L])`` of the model's text encoder (None for text-free models)."""
        if self._encode_text is None and self.uses_text:
            self._encode_text = run_text_encoder(self.run, self.cache_dir)
        return self._encode_text

    @property
    def checker(self):
        """The :class:`lvit.text.vocabulary.ReportChecker` of this model (None for text-free models)."""
        if self._checker is None and self.uses_text:
            from ..text.vocabulary import ReportChecker

            self._checker = ReportChecker(self.run_config, self.run_dir)
        return self._checker

    def report_writer_folder(self) -> Path | None:
        """The report writer for images without a report: the one named at construction (a one-line error when
        that folder holds none), else the run's own; None when there is none. Its config is checked here."""
        from ..artifacts.reporter_folder import find_reporter, read_reporter_meta

        folder = find_reporter(self.reporter if self.reporter is not None else self.run_dir)
        if folder is None and self.reporter is not None:
            raise ConfigError(f"--reporter {self.reporter}: no report writer in this folder (reporter.json missing; "
                              "train one with lvit train-reporter)")
        if folder is not None:
            read_reporter_meta(folder)  # damaged -> one line now, before the slow work
        return folder

    @property
    def report_writer(self):
        """The loaded :class:`lvit.inference.report_writer.ReportWriter` (ConfigError when there is none)."""
        if self._writer is None:
            folder = self.report_writer_folder()
            if folder is None:
                raise ConfigError(f"{self.source}: no report writer (lvit train-reporter {self.run_dir} --data ROOT, "
                                  "or --reporter DIR)")
            from .report_writer import ReportWriter

            self._writer = ReportWriter(folder, device=self.device)
        return self._writer

    # ------------------------------------------------------------------ answers
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``H x W [x C]`` uint8 -> ``[C, S, S]`` float in [0, 1] (as the training dataset does)."""
        from ..data import prepare_image

        return prepare_image(image, self.image_size, self.in_channels)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, text: torch.Tensor | None = None,
               text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``images [B, C, S, S]`` (+ text ``[B, L, D]``, mask ``[B, L]``) -> logits ``[B, 1, S, S]`` float32."""
        images = images.to(self.device)
        if text is not None:
            text = text.to(self.device)
            text_mask = None if text_mask is None else text_mask.to(self.device)
        missing = None  # [B] bool: the images without a report
        if self.has_no_report_path and text is None:
            missing = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        elif self.has_no_report_path and text_mask is not None and not bool(text_mask.any(1).all()):
            missing = ~text_mask.any(1)  # rows without a single token have no report (text_for)
        if missing is not None:
            logits = self.model(images, text, text_mask, no_report=None if text is None else missing).float()
            if self.no_report_path == "self-described":
                logits = self._read_own_description(images, logits, missing)
        else:
            logits = self.model(images, text, text_mask).float()
        if not bool(torch.isfinite(logits).all()):  # never a mask thresholded from NaN
            raise LvitError(f"{self.weights}: the model gave NaN or infinite values for this input (weights or "
                            "input out of range); no mask was written")
        return logits

    @torch.no_grad()
    def logits_over_reports(self, images: torch.Tensor, reports: Sequence[Sequence[str]],
                            weights: np.ndarray, chunk: int = 32) -> torch.Tensor:
        """The model's answer averaged over several reports per image: ``images [B, C, S, S]``, ``reports[b]`` the
        reports of image ``b`` and ``weights [B, K]`` theirs (each row summing to 1) -> logits ``[B, 1, S, S]`` of
        the weighted mean probability. For an image whose report is only guessed (:meth:`ReportWriter.likely_reports
        <lvit.inference.report_writer.ReportWriter.likely_reports>`), the mean over the likely guesses is the
        answer the guesses support together, where the one most likely guess commits to zones it often has wrong.
        Runs ``chunk`` (image, report) pairs per forward."""
        weights = np.asarray(weights, dtype=np.float64)
        if len(reports) != images.shape[0] or weights.shape[0] != images.shape[0]:
            raise ValueError(f"logits_over_reports: {images.shape[0]} images, {len(reports)} report lists, "
                             f"{weights.shape[0]} weight rows")
        pairs = [(b, j) for b, row in enumerate(reports) for j in range(len(row))]
        mean = torch.zeros(images.shape[0], 1, *images.shape[-2:], dtype=torch.float64)
        for start in range(0, len(pairs), chunk):
            part = pairs[start:start + chunk]
            emb, mask = self.encode_text([reports[b][j] for b, j in part])
            rows = torch.tensor([b for b, _ in part])
            probs = torch.sigmoid(self.logits(images[rows], emb, mask)).cpu().double()  # [P, 1, S, S]
            scale = torch.tensor([weights[b, j] for b, j in part], dtype=torch.float64).view(-1, 1, 1, 1)
            mean.index_add_(0, rows, probs * scale)
        return torch.logit(mean.clamp(1e-6, 1 - 1e-6)).float()

    def _read_own_description(self, images: torch.Tensor, logits: torch.Tensor,
                              missing: torch.Tensor) -> torch.Tensor:
        """The second pass of the self-described path: each image without a report gets the report ``lvit
        describe`` writes from its first mask (at the model's resolution, threshold 0.5) and is run again with it."""
        from ..data.describe import describe_mask

        rows = missing.nonzero().flatten()
        reports = [describe_mask((logits[i, 0] >= 0).cpu().numpy()) for i in rows.tolist()]  # logit 0 = p 0.5
        self.last_descriptions = reports
        emb, mask = self.encode_text(reports)
        second = self.model(images[rows], emb.to(self.device), mask.to(self.device)).float()
        logits = logits.clone()
        logits[rows] = second
        return logits

    def text_for(self, texts: Sequence[str | None] | None,
                 n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Encoded reports ``(emb [n, L, D], mask [n, L])``. A model with a no-report path also takes images
        without one (None or blank): all missing -> ``(None, None)``; some -> their rows of ``mask`` all False."""
        if not self.uses_text:
            return None, None
        if texts is not None and len(texts) != n:
            raise ValueError(f"text_for: {len(texts)} reports for {n} images")
        missing = [True] * n if texts is None else [missing_report(t) for t in texts]
        if not any(missing):
            return self.encode_text(list(texts))
        if not self.has_no_report_path:
            raise ConfigError("this model reads the report and has no no-report path (it was trained without "
                              "model.report_dropout): give a non-empty report text for every image")
        if self.backend == "onnx":
            raise ConfigError("the no-report path runs with the torch backend (the ONNX export takes a report): "
                              "use --backend torch")
        if all(missing):
            return None, None
        given = [i for i, m in enumerate(missing) if not m]
        emb_given, mask_given = self.encode_text([texts[i] for i in given])
        emb = emb_given.new_zeros((n, *emb_given.shape[1:]))
        mask = mask_given.new_zeros((n, mask_given.shape[1]))
        emb[given], mask[given] = emb_given, mask_given
        return emb, mask

    @torch.no_grad()
    def predict(self, image: np.ndarray, text: str | None = None) -> np.ndarray:
        """Probability map ``H x W`` float32 in [0, 1] at the image's original size."""
        return self.predict_many([image], [text] if text is not None else None)[0]

    @torch.no_grad()
    def predict_many(self, images: Sequence[np.ndarray], texts: Sequence[str] | None = None) -> list[np.ndarray]:
        batch = torch.stack([self.preprocess(im) for im in images])  # [B, C, S, S]
        emb, mask = self.text_for(texts, len(images))
        logits = self.logits(batch, emb, mask)  # [B, 1, S, S]
        return [to_original_size(logits[i:i + 1], im.shape[:2])[0, 0].cpu().numpy() for i, im in enumerate(images)]

    @torch.no_grad()
    def written_logits(self, images: torch.Tensor, zone_probs: np.ndarray) -> torch.Tensor:
        """Logits ``[B, 1, S, S]`` for preprocessed ``images [B, C, S, S]`` that have no report, given the report
        writer's zone scores of the same images ``[B, 6]``: the model's answers with the writer's
        :data:`MIXED_REPORTS` most likely reports, averaged (:meth:`logits_over_reports`)."""
        likely, weights = self.report_writer.likely_reports(zone_probs, MIXED_REPORTS)
        return self.logits_over_reports(images, likely, weights)

    @torch.no_grad()
    def predict_written(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[str]]:
        """Images without a report, for a model that reads one, through its report writer: ``(probability maps
        H x W at each image's original size, the writer's report of each image)``. The mask averages the model's
        answers over the writer's :data:`MIXED_REPORTS` most likely reports; the report returned is the one the
        writer writes (its zone scores thresholded), the single report to show and check."""
        writer = self.report_writer
        zone_probs = writer.probabilities(images)
        batch = torch.stack([self.preprocess(im) for im in images])  # [B, C, S, S]
        logits = self.written_logits(batch, zone_probs)
        return ([to_original_size(logits[i:i + 1], im.shape[:2])[0, 0].cpu().numpy() for i, im in enumerate(images)],
                writer.reports_from(zone_probs))
