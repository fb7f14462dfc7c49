"""POPS: receptive-field geometry, patch tiling and stitching,
and the memory planner."""
