"""``lvit model-info``: parameters and forward GFLOPs of a model, in total and per module group."""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError

GROUPS = ("cnn encoder", "cnn decoder", "PLAM", "vit down", "vit up", "reconstruct", "text")
_GROUP_RULES = (  # first match wins; applied to parameter / module names of LViT and UNet
    (re.compile(r"^text_"), "text"),
    (re.compile(r"^(stem|down)(\.|$)"), "cnn encoder"),
    (re.compile(r"^up\.\d+\.attention(\.|$)"), "PLAM"),
    (re.compile(r"^(up|head)(\.|$)"), "cnn decoder"),
    (re.compile(r"^vit_down(\.|$)"), "vit down"),
    (re.compile(r"^vit_up(\.|$)"), "vit up"),
    (re.compile(r"^reconstruct(\.|$)"), "reconstruct"),
)


def module_group(name: str) -> str:
    """The reporting group of a parameter or module name (``"other"`` if none fits)."""
    for pattern, group in _GROUP_RULES:
        if pattern.search(name):
            return group
    return "other"


def _group_roots(model, counted: set[str]) -> dict[str, str]:
    """The outermost *called* modules whose parameters all fall in one group -> that group.

    ``counted`` holds the names the FLOP counter saw run (containers such as ModuleList never run
    themselves, so their children are taken instead).
    """
    roots: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or name not in counted or any(name.startswith(r + ".") for r in roots):
            continue
        groups = {module_group(f"{name}.{p}") for p, _ in module.named_parameters()}
        if len(groups) == 1:
            roots[name] = groups.pop()
    return roots


def measure(model_name: str, config, height: int | None = None, width: int | None = None) -> dict[str, Any]:
    """Parameter counts and forward FLOPs (a multiply-add = 2 FLOPs) of one image, per group."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ..models import build_model, count_parameters

    # On the meta device nothing is allocated or computed: the counter needs only shapes.
    with torch.device("meta"):
        model = build_model(model_name, config).eval()
    cfg = model.config
    height = height or cfg.image_size
    width = width or cfg.image_size

    params = defaultdict(int)
    for name, p in model.named_parameters():
        params[module_group(name)] += p.numel()

    image = torch.zeros(1, cfg.in_channels, height, width, device="meta")
    text = None
    if cfg.use_text and model_name != "unet":
        text = torch.zeros(1, cfg.text_tokens, cfg.text_dim, device="meta")
    # The CPU fused-attention kernel has no FLOP formula in torch.utils.flop_counter; the math backend
    # runs attention as two counted batched matmuls (same FLOPs as the fused kernel does).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(image, text)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    flops = defaultdict(int)
    counted = {key.split(".", 1)[1] for key in counts if "." in key}
    for name, group in _group_roots(model, counted).items():
        flops[group] += sum(counts.get(f"{root}.{name}", {}).values())
    total_flops = sum(counts["Global"].values())
    unattributed = total_flops - sum(flops.values())
    if unattributed:
        flops["other"] += unattributed

    result: dict[str, Any] = {
        "model": model_name,
        "config": cfg.to_dict(),
        "input": [1, cfg.in_channels, height, width],
        "parameters": count_parameters(model),
        "gflops": total_flops / 1e9,
        "groups": {g: {"parameters": params.get(g, 0), "gflops": flops.get(g, 0) / 1e9}
                   for g in (*GROUPS, "other") if params.get(g) or flops.get(g)},
    }
    if hasattr(model, "reconstruct"):
        # The official code upsamples before Reconstruct's 1x1 conv; we convolve on the patch grid and
        # upsample after (identical output). The official operation order would cost this much more:
        grid = (height // 16) * (width // 16)
        extra = 0
        for level, rec in enumerate(model.reconstruct):
            pixels = (height >> level) * (width >> level)
            extra += 2 * rec.conv.in_channels * rec.conv.out_channels * (pixels - grid)
        result["gflops_official_order"] = (total_flops + extra) / 1e9
    return result


def _read_model_section(path: Path) -> tuple[dict, str | None]:
    """The ``model`` mapping and ``model_name`` of a YAML preset, a user's config or a run's config.yaml.

    A run's config.yaml is taken as it is (its ``text_dim`` is the width the run's encoder gave). A preset's
    ``text_dim`` follows its text encoder, as training does (MiniLM: 384), unless the preset sets it.
    """
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model", {}), dict):
        raise ConfigError(f"{path}: expected a mapping with a 'model' section")
    if any(key in data for key in ("lvit_version", "text_encoder", "data_info", "lvit_format")):  # a trained run's
        return dict(data.get("model") or {}), data.get("model_name")
    from ..train.config import load_config

    cfg = load_config(path)
    values = cfg.model.to_dict()
    preset_sets_dim = "text_dim" in (data.get("model") or {})
    reads_text = cfg.model_name == "lvit" and cfg.model.use_text
    spec = cfg.text.encoder
    if reads_text and not preset_sets_dim and not (spec == "learned" or spec.startswith("learned:")):
        from ..text import get_text_encoder

        values["text_dim"] = get_text_encoder(spec, cfg.model.text_tokens).dim  # reads config.json only
    return values, cfg.model_name


def source_path(source: str) -> Path:
    """A run folder (its config.yaml), a model folder (its config.json, YAML's subset), a YAML file, or a preset
    name -> the file to read."""
    from ..artifacts.runs import is_model_folder, read_run_config
    from ..presets import resolve_config as resolve_preset

    path = Path(source)
    if path.is_dir():
        if is_model_folder(path):
            read_run_config(path)  # the folder's files and config.json checked (one-line error)
            return path / "config.json"
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"{path}: no config.yaml (not a run folder made by lvit train)")
        return path / "config.yaml"
    try:
        return resolve_preset(source)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("no such config file", "no such run folder, config file")) from None


def resolve_config(config_path: str | None, overrides: list[str]):
    """LViTConfig from an optional preset, config file or run folder plus ``key=value`` overrides (``model.``
    prefix optional)."""
    from ..models import LViTConfig
    from ..train.config import apply_override

    values: dict[str, Any] = {}
    model_name = None
    if config_path:
        values, model_name = _read_model_section(source_path(config_path))
    raw = {"model": values}
    for item in overrides:  # the one key=value parser of --set, with the "model." prefix optional here
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value, e.g. text_dim=768")
        apply_override(raw, item if item.strip().startswith("model.") else f"model.{item.strip()}")
    values = raw["model"]
    try:
        return LViTConfig.from_dict(values), model_name
    except TypeError as exc:  # a value of the wrong kind reaching a comparison in validation
        raise ConfigError(f"model config: {exc}") from None


def _print_table(info: dict[str, Any]) -> None:
    rows = [(g, f"{v['parameters']:,}", f"{v['gflops']:.2f}") for g, v in info["groups"].items()]
    total = ("total", f"{info['parameters']:,}", f"{info['gflops']:.2f}")
    cfg = info["config"]
    text = f"text {cfg['text_tokens']}x{cfg['text_dim']}" if info["model"] != "unet" and cfg["use_text"] else "no text"
    title = (f"{info['model']}: input {'x'.join(map(str, info['input']))}, base_channels {cfg['base_channels']}, "
             f"{text}")
    try:
        from rich.console import Console
        from rich.table import Table

        print(title)
        table = Table()
        for col in ("group", "parameters", "GFLOPs"):
            table.add_column(col, justify="left" if col == "group" else "right")
        for row in rows:
            table.add_row(*row)
        table.add_row(*total, style="bold")
        Console().print(table)
    except ImportError:  # pragma: no cover
        print(title)
        for row in (("group", "parameters", "GFLOPs"), *rows, total):
            print(f"{row[0]:<14}{row[1]:>14}{row[2]:>10}")
    if "gflops_official_order" in info:
        print(f"GFLOPs with the official operation order (upsample before Reconstruct's 1x1 conv): "
              f"{info['gflops_official_order']:.2f}")
    print("FLOPs: torch.utils.flop_counter, one image, a multiply-add counted as 2.")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    source = args.config
    if overrides and "=" not in overrides[0]:  # model-info RUN_DIR | config.yaml | preset [KEY=VALUE ...]
        if source:
            raise ConfigError(f"{overrides[0]}: give either a run folder / config as the first argument or --config")
        source = overrides.pop(0)
    config, preset_model = resolve_config(source, [*overrides, *args.set])
    model_name = args.model or preset_model or "lvit"
    info = measure(model_name, config, *(args.size or (None, None)))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_table(info)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("model-info", help="parameters and GFLOPs of a model, per module group",
                              description="Count parameters and forward GFLOPs (per image) of LViT, LViT-T or "
                                          "U-Net, in total and per module group.")
    p.add_argument("overrides", nargs="*", metavar="[RUN_DIR|CONFIG] KEY=VALUE",
                   help="a trained run folder, its config.yaml or a preset name (first, optional), then LViTConfig "
                        "overrides, e.g. text_dim=768 image_size=224 base_channels=32")
    p.add_argument("--model", choices=("lvit", "lvit-t", "unet"), default=None,
                   help="network (default: the preset's model_name, else lvit)")
    p.add_argument("--config", default=None,
                   help="a preset name, a YAML config or a run folder / its config.yaml (its 'model' section and "
                        "model_name are used; a preset's text width follows its text encoder)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="same as a positional override")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="input size for the FLOP count (default: image_size x image_size)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
