"""Does a trained LViT read its reports? Score one run on a split with the true reports and with changed ones.

    python bench/text_probe.py RUN_DIR --data ROOT [--split test] [--json OUT.json]

A thin command over :func:`lvit.evaluate.text_probe.probe_reports` (true, left/right swapped, another image's
report, "No pulmonary infection."; each also on the reports the change alters). bench/compare_models.py and
bench/qata.py record these figures in their raw results; ``--json`` writes them for any other run.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = p.parse_args(argv)
    import torch

    from lvit.core.errors import LvitError
    from lvit.core.io import atomic_write_text
    from lvit.evaluate.text_probe import format_probe, probe_reports

    torch.set_num_threads(1)
    try:
        result = probe_reports(args.run, args.data, args.split)
    except LvitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_probe(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
