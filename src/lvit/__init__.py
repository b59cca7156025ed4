"""lvit: language-guided medical image segmentation (LViT, Li et al., IEEE TMI 2023)."""

import os as _os

# OpenMP threads that busy-wait for work burn the CPU other threads need: on a shared 2-core machine a tiny LViT
# step took 26 s with the default policy and 0.7 s with PASSIVE. Must be set before torch is first imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
