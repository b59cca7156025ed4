"""What every layer of lvit uses: one-line errors and warnings (:mod:`.errors`), atomic file writing
(:mod:`.io`), Dice/IoU (:mod:`.metrics`), mask overlays (:mod:`.overlays`) and the OpenMP wait policy
(:mod:`.openmp`). Imports nothing else of lvit."""
