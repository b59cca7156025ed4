"""Model folders in the Hugging Face layout: ``config.json`` + ``model.safetensors`` + ``README.md`` (model card).

``model.save_pretrained(folder)`` / ``LViT.from_pretrained(folder)`` (and ``UNet``) write and read them. The
layout is the one ``huggingface_hub``'s ``PyTorchModelHubMixin`` uses, so a folder can be uploaded to the Hub as
it is (``huggingface_hub.upload_folder``), but loading is stricter than the mixin's:

* only from a local folder: a name that is not one is a one-line error, never a download (lvit never goes to the
  network; fetch a model yourself, e.g. ``hf download NAME --local-dir DIR``, then pass ``DIR``);
* weights only from safetensors: a folder holding pickled weights (``pytorch_model.bin``, ``*.pt``, ``*.ckpt``
  ...) or any file lvit does not write there is refused with one line naming it (``.git/``, ``.gitattributes``
  and ``.cache/``, which git and ``hf download`` add, are ignored);
* ``config.json`` must be lvit's (``library_name: lvit``, ``lvit_format`` 1) and the weights must fit it exactly.

``config.json`` holds ``model_name`` (``lvit``, ``lvit-t`` or ``unet``) and ``model`` (the :class:`LViTConfig`
fields), plus, for a folder exported from a run (``lvit export RUN --hf DIR``), what prediction needs besides
the network: ``text_encoder`` (spec, max_tokens, min_words, dim), the training settings and test metrics.
Optional files: ``report_words.json`` (training reports' words, for report warnings),
``report_cache.safetensors`` (the training reports already encoded: such a report needs no text model at
prediction time), and for the ``learned`` text backend ``vocab.json`` + ``text_embedding.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError, ConfigError, OutputExistsError

MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CARD = "README.md"
TEXT_EMBEDDING_WEIGHTS = "text_embedding.safetensors"
VOCAB_FILE = "vocab.json"
WORDS_FILE = "report_words.json"  # = lvit.text.vocabulary.WORDS_FILE (models does not import text)
REPORT_CACHE = "report_cache.safetensors"  # embeddings of the training reports (lvit.text.cache's file format)
FORMAT_VERSION = 1
LIBRARY_NAME = "lvit"

REPORTER_DIR = "reporter"  # the report writer (lvit.artifacts.reporter_folder's files), for images without a report
REPORTER_FILES = ("reporter.json", "weights.safetensors")
REQUIRED_FILES = (MODEL_CONFIG, MODEL_WEIGHTS)
OPTIONAL_FILES = (MODEL_CARD, WORDS_FILE, VOCAB_FILE, TEXT_EMBEDDING_WEIGHTS, REPORT_CACHE)
FOLDER_FILES = REQUIRED_FILES + OPTIONAL_FILES
IGNORED_ENTRIES = (".git", ".gitattributes", ".cache")  # version control / `hf download` bookkeeping, never read
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".tar", ".joblib", ".npy", ".npz", ".h5",
                   ".msgpack", ".onnx")


def folder_problem(folder: str | Path) -> str | None:
    """Why ``folder`` is not a loadable model folder (one clause), or None when it is.

    Checks the files only (names, kinds, presence); :func:`read_model_config` checks ``config.json``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    for entry in entries:
        name = entry.name
        if name in IGNORED_ENTRIES:
            continue
        lower = name.lower()
        if any(lower.endswith(suffix) for suffix in PICKLE_SUFFIXES):
            return (f"refused: {name} holds weights in a format that can carry code (pickle) or that lvit does "
                    f"not read; lvit loads weights only from {MODEL_WEIGHTS} (safetensors): remove {name}")
        if name == REPORTER_DIR and entry.is_dir() and not entry.is_symlink():
            inside = sorted(p.name for p in entry.iterdir())
            if inside != sorted(REPORTER_FILES) or not all((entry / f).is_file() for f in REPORTER_FILES):
                return (f"refused: {REPORTER_DIR}/ must hold exactly {' and '.join(REPORTER_FILES)} (the report "
                        f"writer), found {', '.join(inside) or 'nothing'}")
            continue
        if name not in FOLDER_FILES:
            return (f"refused: unexpected {'folder' if entry.is_dir() else 'file'} {name} (a model folder holds only "
                    f"{', '.join(FOLDER_FILES)} and a {REPORTER_DIR}/ folder): remove it, or export the model again "
                    "into an empty folder")
        if not entry.is_file():
            return f"refused: {name} is not a regular file"
    names = {p.name for p in entries}
    missing = [name for name in REQUIRED_FILES if name not in names]
    if missing:
        return f"no {' or '.join(missing)} in this folder"
    if (VOCAB_FILE in names) != (TEXT_EMBEDDING_WEIGHTS in names):
        return f"{VOCAB_FILE} and {TEXT_EMBEDDING_WEIGHTS} come together (the learned text backend); one is missing"
    return None


def looks_like_model_folder(path: str | Path) -> bool:
    """A folder with ``config.json`` and no run ``config.yaml``: read as a model folder (then checked strictly)."""
    path = Path(path)
    return path.is_dir() and (path / MODEL_CONFIG).is_file() and not (path / "config.yaml").exists()


def not_local_error(name: str | Path) -> CheckpointError:
    """The one-line refusal for a name that is not a local folder (lvit never downloads)."""
    return CheckpointError(f"{name}: no such local folder; lvit loads models only from a folder on this machine "
                           "and never downloads (fetch it yourself, e.g. `hf download NAME --local-dir DIR`, then "
                           "pass DIR)")


def read_model_config(folder: str | Path) -> dict[str, Any]:
    """The checked ``config.json`` of a model folder (files checked first: :func:`folder_problem`)."""
    folder = Path(folder)
    if not folder.exists():
        raise not_local_error(folder)
    problem = folder_problem(folder)
    if problem:
        raise CheckpointError(f"{folder}: not a usable model folder: {problem}")
    path = folder / MODEL_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: unreadable config ({first})") from None
    if not isinstance(data, dict) or data.get("library_name") != LIBRARY_NAME or "lvit_format" not in data:
        raise CheckpointError(f"{path}: not an lvit model config (no library_name: lvit / lvit_format); lvit reads "
                              "model folders it wrote (model.save_pretrained, lvit export RUN --hf DIR)")
    if data["lvit_format"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: lvit_format {data['lvit_format']!r} (this lvit reads format {FORMAT_VERSION}; "
                              "a newer lvit wrote it?)")
    if not isinstance(data.get("model_name"), str) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}: model_name/model missing or malformed")
    return data


def read_safetensors(path: str | Path) -> dict:
    """The tensors of a safetensors file; a missing or unreadable file is a one-line CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_clause(exc)})") from None


def load_checked_weights(model, tensors: dict, where: str | Path, config_name: str):
    """Load ``tensors`` into ``model`` strictly after refusing non-finite values; a mismatch is one line naming
    ``where`` (the weights) and ``config_name`` (the config that built the model). -> ``model`` in eval mode."""
    check_finite(tensors, where)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: weights do not fit the model in {config_name} "
                              f"({_first_clause(exc)})") from None
    return model.eval()


def check_finite(tensors: dict, where: str | Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged run, a damaged file): they would give a clean-looking
    mask, empty or full, with no hint that the model is broken."""
    import torch

    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"{where}: {len(bad)} weight tensor(s) hold NaN or infinity ({shown}): the run "
                              "diverged or the file is damaged; use weights of an earlier epoch")


def _first_clause(exc: BaseException, limit: int = 200) -> str:
    text = " ".join((str(exc) or type(exc).__name__).split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + "..."


def half_tensors(tensors: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Floating-point tensors as float16, except those holding a value beyond float16's range (a BatchNorm
    running variance can exceed 65504: in float16 it would become infinity); returns (tensors, the names kept
    as float32)."""
    import torch

    limit = torch.finfo(torch.float16).max
    out, kept = {}, []
    for name, value in tensors.items():
        if not value.is_floating_point():
            out[name] = value
        elif value.numel() and float(value.abs().max()) > limit:
            out[name] = value.float()
            kept.append(name)
        else:
            out[name] = value.half()
    return out, kept


def write_model_folder(folder: str | Path, model, config: dict[str, Any], *, card: str | None = None,
                       files: dict[str, bytes] | None = None, text_embedding=None, force: bool = False,
                       half: bool = False, reporter: dict[str, bytes] | None = None) -> Path:
    """Write ``model`` (weights), ``config`` (completed with the format keys), the card and ``files`` (other
    names of :data:`OPTIONAL_FILES`) into ``folder``, each atomically. An existing non-empty folder is refused
    without ``force``; with it, only a model folder is replaced (its stale optional files removed). ``half``:
    floating-point weights stored as float16 (half the bytes; loading casts them back to the model's float32).
    ``reporter``: the report writer's files (:data:`REPORTER_FILES` -> bytes) for ``reporter/``."""
    from safetensors.torch import save_file

    from ..core.io import atomic_path, atomic_write_bytes, atomic_write_text, prepare_output_dir

    folder = Path(folder)
    files = dict(files or {})
    unknown = sorted(set(files) - set(OPTIONAL_FILES) | ({MODEL_CARD, TEXT_EMBEDDING_WEIGHTS} & set(files)))
    if unknown:
        raise ValueError(f"write_model_folder: files {unknown} are not extra model-folder files")
    if folder.is_dir() and any(folder.iterdir()):
        if not force:
            raise OutputExistsError(f"{folder}: exists and is not empty (use --force to replace the model in it)")
        others = [p.name for p in folder.iterdir() if p.name not in FOLDER_FILES and p.name not in IGNORED_ENTRIES
                  and p.name != REPORTER_DIR]
        if others:
            raise OutputExistsError(f"{folder}: holds files a model folder does not ({', '.join(sorted(others)[:5])}): "
                                    "not replaced, even with --force; choose an empty or new folder")
    folder = prepare_output_dir(folder, force=True, what="model folder")
    full = {"library_name": LIBRARY_NAME, "lvit_format": FORMAT_VERSION, **config}
    full["model_name"] = model_name_of(model)
    full["model"] = model.config.to_dict()
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if half:
        tensors, kept = half_tensors(tensors)
        if kept:
            full["float32_tensors"] = kept
    full["weights_dtype"] = "float16" if half else "float32"
    written = {MODEL_WEIGHTS, MODEL_CONFIG, MODEL_CARD, *files}
    with atomic_path(folder / MODEL_WEIGHTS) as tmp:
        # one metadata key: safetensors writes a metadata map in no fixed order, so two keys would make the bytes
        # (and the sha256 a card states) differ between two exports of the same weights
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    if text_embedding is not None:
        emb = {k: v.detach().cpu().contiguous().clone() for k, v in text_embedding.state_dict().items()}
        with atomic_path(folder / TEXT_EMBEDDING_WEIGHTS) as tmp:
            save_file(emb, str(tmp), metadata={"format": "pt"})
        written.add(TEXT_EMBEDDING_WEIGHTS)
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    atomic_write_text(folder / MODEL_CARD, card if card is not None else default_card(full))
    for name in OPTIONAL_FILES:  # stale files of a model replaced with --force
        if name not in written and (folder / name).is_file():
            (folder / name).unlink()
    if reporter:
        if sorted(reporter) != sorted(REPORTER_FILES):
            raise ValueError(f"write_model_folder: a report writer is {' and '.join(REPORTER_FILES)}")
        (folder / REPORTER_DIR).mkdir(exist_ok=True)
        for name in ("weights.safetensors", "reporter.json"):  # its config last, as lvit train-reporter writes it
            atomic_write_bytes(folder / REPORTER_DIR / name, reporter[name])
    elif (folder / REPORTER_DIR).is_dir():  # the replaced model's writer would serve the new model
        import shutil

        shutil.rmtree(folder / REPORTER_DIR)
    atomic_write_text(folder / MODEL_CONFIG, json.dumps(full, indent=2) + "\n")  # last: the folder is complete
    return folder


def model_name_of(model) -> str:
    """The registry name of a built network: ``lvit``, ``lvit-t`` (LViT with use_text=False) or ``unet``."""
    names = getattr(model, "pretrained_names", ())
    if not names:
        raise TypeError(f"save_pretrained: {type(model).__name__} is not an lvit network")
    if "lvit" in names:
        return "lvit" if model.config.use_text else "lvit-t"
    return names[0]


def default_card(config: dict[str, Any]) -> str:
    """A minimal model card for a network saved without its run (``lvit export RUN --hf`` writes a full one)."""
    name = config["model_name"]
    return (f"---\nlibrary_name: {LIBRARY_NAME}\ntags:\n- medical-imaging\n- image-segmentation\n- {name}\n---\n\n"
            f"# {name}\n\nA {name} network saved with `save_pretrained` (lvit). Load it with "
            f"`lvit.artifacts.runs.load_run(folder)` or "
            f"`{'UNet' if name == 'unet' else 'LViT'}.from_pretrained(folder)`.\n\n"
            "For research only: not a medical device, not for diagnosis.\n")


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for lvit's networks (Hugging Face folder layout, local only)."""

    #: registry names this class loads (LViT: lvit and lvit-t; UNet: unet)
    pretrained_names: tuple[str, ...] = ()
    #: the config dataclass the class is built from (``from_dict`` of config.json's ``model``)
    config_class: type

    def save_pretrained(self, folder: str | Path, *, config: dict[str, Any] | None = None, card: str | None = None,
                        force: bool = False) -> Path:
        """Write ``folder/config.json``, ``model.safetensors`` and ``README.md`` (a minimal card unless ``card``).

        ``config``: extra keys for config.json (``text_encoder`` {spec, max_tokens, min_words, dim} makes the
        folder usable by ``lvit predict`` for a text-guided model). Returns the folder.
        """
        return write_model_folder(folder, self, dict(config or {}), card=card, force=force)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, map_location: Any = "cpu"):
        """The eval-mode network of a local model folder (never a download; safetensors only)."""
        config = read_model_config(folder)
        if cls.pretrained_names and config["model_name"] not in cls.pretrained_names:
            other = "UNet" if config["model_name"] == "unet" else "LViT"
            wanted = " or ".join(cls.pretrained_names)
            raise CheckpointError(f"{folder}: holds a {config['model_name']} model, not {wanted}; load it with "
                                  f"{other}.from_pretrained or lvit.artifacts.runs.load_run")
        try:
            model = cls(cls.config_class.from_dict(config["model"]))
        except (TypeError, ConfigError) as exc:
            raise CheckpointError(f"{Path(folder) / MODEL_CONFIG}: invalid model config ({exc})") from None
        path = Path(folder) / MODEL_WEIGHTS
        return load_checked_weights(model, read_safetensors(path), path, MODEL_CONFIG).to(map_location)


__all__ = [
    "FOLDER_FILES", "MODEL_CARD", "MODEL_CONFIG", "MODEL_WEIGHTS", "PretrainedMixin", "REPORTER_DIR", "REPORT_CACHE",
    "TEXT_EMBEDDING_WEIGHTS",
    "VOCAB_FILE", "check_finite", "folder_problem", "load_checked_weights", "looks_like_model_folder", "model_name_of",
    "not_local_error", "read_model_config", "read_safetensors", "write_model_folder",
]
