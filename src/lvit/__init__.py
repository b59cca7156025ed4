"""lvit: language-guided medical image segmentation (LViT, Li et al., IEEE TMI 2023).

Importing lvit has no side effects; the ``lvit`` command applies the OpenMP wait policy (:mod:`lvit.core.openmp`).
"""

__version__ = "0.1.0"
