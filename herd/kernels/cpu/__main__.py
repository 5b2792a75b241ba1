"""`python -m herd.kernels.cpu`: build the CPU kernels now (`make venv` does), instead of at first use."""

import logging
import sys

from herd.kernels.cpu import build_dir, gemv_ops

logging.basicConfig(level=logging.INFO)
built = gemv_ops() is not None
logging.getLogger("herd.kernels.cpu").info("%s: %s", "built" if built else "not built", build_dir())
sys.exit(0 if built else 1)
