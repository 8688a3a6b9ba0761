"""Streaming evaluators (PQ, mIoU, mask AP, top-k) and file-based PQ scoring.

All follow the official tools' semantics (panopticapi for PQ, pycocotools for AP) and keep
statistics that merge across processes: ``state()`` / ``merge(state)`` / ``all_reduce()``.
"""

from .classification import ClassificationAccuracy
from .instance_ap import InstanceAP
from .panoptic_quality import PanopticQuality, accumulate_image_stats, format_pq_table, summarize_pq
from .pq_files import pq_compute_files, score_image
from .semantic import SemanticIoU

__all__ = [
    "ClassificationAccuracy",
    "InstanceAP",
    "PanopticQuality",
    "SemanticIoU",
    "accumulate_image_stats",
    "format_pq_table",
    "pq_compute_files",
    "score_image",
    "summarize_pq",
]
