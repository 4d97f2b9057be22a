"""The Slicer side: MRML logic (the only module importing `slicer`), the worker client (process supervision,
no MRML) and the engine worker process it starts."""
