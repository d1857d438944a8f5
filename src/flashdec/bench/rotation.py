"""Cold L2 by rotation: how many input sets a row cycles through so no call finds its inputs
in the L2 left by the call before (:func:`rotation_sets`), and the sizes that rule works from."""

from __future__ import annotations

import math

L2_BYTES = 50 * 2**20                      # H100; the device's own L2 size wins when known
L2_ROTATION_BYTES = 4 * L2_BYTES           # working set of the rotated input sets, at least
MIN_SETS = 4                               # rotate at least this many sets while a set is small
MAX_SETS = 128                             # tiny custom rows: cap the rotation (cold_l2 says so)
MAX_ROTATION_ALLOC = 4 * 2**30             # device memory for all sets of one row, at most


def rotation_sets(touched_bytes: int, alloc_bytes: int, l2_bytes: int = L2_BYTES) -> int:
    """How many input sets to rotate so the L2 is cold at every call.

    At least ``MIN_SETS`` and 4x the L2 in total while a set is smaller than that; 2 sets once
    one set alone is 4x the L2; never more than ``MAX_SETS`` sets or ``MAX_ROTATION_ALLOC``
    bytes (at least 1 set).
    """
    target = 4 * l2_bytes
    if touched_bytes >= target:
        sets = 2
    else:
        sets = max(MIN_SETS, math.ceil(target / max(touched_bytes, 1)))
    return max(1, min(sets, MAX_SETS, MAX_ROTATION_ALLOC // max(alloc_bytes, 1)))
