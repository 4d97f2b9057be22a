"""Post-processing of label maps: the largest connected component of each class (cc3d + fastremap)."""

from __future__ import annotations

import cc3d
import fastremap
import numpy as np


def largest_component_per_class(labels: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Keep, for every non-zero label value, only its largest connected component.

    ``labels`` is an integer (Z, Y, X) map; the result has the same shape and dtype, with removed
    voxels set to 0. One multi-label cc3d pass finds all components (components never join
    across label values); fastremap counts them and maps each to its label value; a lookup
    table indexed by component id then writes the winners' values in one pass. Ties go to the
    lower component id.
    """
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D label map, got shape {labels.shape}")
    if not labels.any():
        return labels.copy()
    components, n = cc3d.connected_components(labels, connectivity=connectivity, return_N=True)
    ids, sizes = fastremap.unique(components, return_counts=True)
    counts = np.zeros(n + 1, dtype=np.int64)
    counts[ids] = sizes
    keep: dict[int, int] = {}
    for cid, value in sorted(fastremap.component_map(components, labels).items()):
        if cid == 0:
            continue
        best = keep.get(value)
        if best is None or counts[cid] > counts[best]:
            keep[value] = int(cid)
    lookup = np.zeros(n + 1, dtype=labels.dtype)
    for value, cid in keep.items():
        lookup[cid] = value
    return lookup[components]
