"""Pictures of a result: the PNG preview of a segmentation (CT slices with organ overlays), 3D organ surfaces."""
