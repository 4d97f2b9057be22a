"""AbdomenKDSeg engine: coarse-to-fine 13-organ abdominal CT segmentation (pure Python).

Nothing in this package imports Slicer, Qt or CTK except :mod:`AbdomenKDSegLib.slicer.logic`.
"""

__version__ = "0.1.0"
