"""Test configuration for scale_optax: makes the repository importable."""

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)
