"""CI gate after `lvit demo`: the demo's model must read the report (true-report Dice clearly above the
Dice with left and right swapped, on the same weights and test images)."""

import json
import sys
from pathlib import Path

MARGIN = 0.05  # absolute Dice; the demo seeds measured on the reference machine: bench/RESULTS.md, "demo"

metrics = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "lvit-demo/run/test-test/metrics.json").read_text())
variants = metrics["text_probe"]["variants"]
true, swapped = variants["true"]["dice"], variants["swapped"]["dice"]
print(f"demo text probe: true-report Dice {true:.4f}, left/right swapped {swapped:.4f} (margin needed {MARGIN})")
if not true >= swapped + MARGIN:
    sys.exit("error: the demo's model does not read the report (true-report Dice not clearly above the swapped one)")
