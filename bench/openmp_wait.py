"""How OpenMP's wait policy changes LViT's CPU step time: bounded spin vs PASSIVE, alone and crowded.

    python bench/openmp_wait.py [--crowd 4] [--steps 5]

Each measurement runs in a fresh Python process with the policy set in its environment before torch loads (the
`lvit` command leaves a policy set by the user alone). Two steps are timed: the synth preset's training step (128
px, base 16, batch 8, 2 threads) and a tiny LViT step (64 px, base 8, batch 2); the tiny one also with ``--crowd``
copies running at once, which is what a shared machine looks like. Prints the median step times (ms). The `lvit`
command's own choice (``lvit.core.openmp.apply_wait_policy``) is based on these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

POLICIES = {"bounded spin (GOMP_SPINCOUNT=100000)": {"GOMP_SPINCOUNT": "100000"},
            "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}

CHILD = r"""
import json, sys, time
import torch
from lvit.models import LViTConfig, build_model
kind, steps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
if kind == "synth":
    cfg, batch, tokens = LViTConfig(image_size=128, base_channels=16, text_dim=384, text_tokens=24, vit_heads=4), 8, 24
else:
    cfg, batch, tokens = LViTConfig(image_size=64, base_channels=8, text_dim=384, vit_heads=4), 2, 10
model = build_model("lvit", cfg).train()
x = torch.rand(batch, 3, cfg.image_size, cfg.image_size)
t, m = torch.rand(batch, tokens, 384), torch.ones(batch, tokens, dtype=torch.bool)
opt = torch.optim.Adam(model.parameters())
times = []
for i in range(2 + steps):
    t0 = time.perf_counter()
    model(x, t, m).mean().backward()
    opt.step()
    opt.zero_grad()
    if i >= 2:
        times.append(time.perf_counter() - t0)
print(json.dumps(sorted(times)[len(times) // 2]))
"""


def run(kind: str, env: dict, steps: int, copies: int = 1) -> list[float]:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | env
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, kind, str(steps)], env=full, stdout=subprocess.PIPE,
                              text=True) for _ in range(copies)]
    return [1000 * json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crowd", type=int, default=4, help="copies of the tiny step run at once")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median reported)")
    args = p.parse_args()
    print(f"{os.cpu_count()} CPU(s); load average before {os.getloadavg()[0]:.2f}")
    print("| policy | synth step alone (ms) | tiny step alone (ms) | tiny step, "
          f"{args.crowd} at once (ms, each) |\n|---|---|---|---|")
    for name, env in POLICIES.items():
        synth = run("synth", env, args.steps)[0]
        tiny = run("tiny", env, args.steps * 3)[0]
        crowd = run("tiny", env, args.steps * 3, copies=args.crowd)
        print(f"| {name} | {synth:.0f} | {tiny:.0f} | {', '.join(f'{c:.0f}' for c in sorted(crowd))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
