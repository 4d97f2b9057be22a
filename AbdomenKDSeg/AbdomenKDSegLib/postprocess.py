"""Post-processing of label maps: the largest connected component of each class (cc3d + fastremap)."""

from __future__ import annotations

import cc3d
import fastremap
import numpy as np


def largest_component_per_class(labels: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Keep, for every non-zero label value, only its largest connected component.

    ``labels`` is an integer (Z, Y, X) map; the result has the same shape and dtype, with removed
    voxels set to 0. One multi-label cc3d pass finds all components (components never join
    across label values), then fastremap keeps the winners. Ties go to the lower component id.
    """
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D label map, got shape {labels.shape}")
    if not labels.any():
        return labels.copy()
    components = cc3d.connected_components(labels, connectivity=connectivity)
    counts = cc3d.statistics(components, no_slice_conversion=True)["voxel_counts"]
    keep: dict[int, int] = {}
    for cid, value in fastremap.component_map(components, labels).items():
        if cid == 0:
            continue
        best = keep.get(value)
        if best is None or counts[cid] > counts[best]:
            keep[value] = int(cid)
    kept = fastremap.mask_except(components, list(keep.values()))
    return np.where(kept > 0, labels, 0).astype(labels.dtype, copy=False)
