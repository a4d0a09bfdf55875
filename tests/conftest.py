"""Test-session settings shared by every test module."""

import sys
from pathlib import Path

import torch

# tests import the shared cases and references as top-level modules
sys.path.insert(0, str(Path(__file__).parent))

# One intra-op thread: on a busy 2-core machine two threads spin-wait and slow small
# kernels by orders of magnitude; results do not depend on it.
torch.set_num_threads(1)
