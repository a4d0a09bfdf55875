"""What a batch of a data loader is: ``(x, y)`` or a dict holding the targets.

The one rule lives in :mod:`curvlib._inputs` (:func:`split_batch`, :func:`batch_size`), shared
by every loop over data in curvlib (:func:`curvlib.data.fit`, the matrix-free operator over a
data set); this module names it for the data package.
"""

from __future__ import annotations

from curvlib._inputs import batch_size as batch_dim
from curvlib._inputs import split_batch

__all__ = ["split_batch", "batch_dim"]
