"""PMP mask core: packed bits, exact distributed top-k, and the private mask artifact."""
from .artifact import (MaskArtifactError, merge_rank_slices, read_artifact, reslice_artifact,
                       slice_for_rank, write_artifact)
from .bits import pack_bits, popcount, unpack_bits
from .select import iou, mask_counts, random_scores, topk_mask

__all__ = [
    "MaskArtifactError", "iou", "mask_counts", "merge_rank_slices", "pack_bits",
    "popcount", "random_scores", "read_artifact", "reslice_artifact", "slice_for_rank",
    "topk_mask", "unpack_bits", "write_artifact",
]
