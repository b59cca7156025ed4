"""Worker entry point: ``python -m lvit.benchmark TASK_JSON``."""

import sys

from .worker import worker_main

sys.exit(worker_main(sys.argv[1:]))
