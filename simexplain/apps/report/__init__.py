"""A static HTML report of explained retrieval (:func:`retrieval_report`)."""

from .page import MARKER_FILE
from .report import (
    ReportCard,
    ReportMatch,
    RetrievalReport,
    check_report_destination,
    retrieval_report,
)

__all__ = [
    "retrieval_report",
    "RetrievalReport",
    "ReportCard",
    "ReportMatch",
    "check_report_destination",
    "MARKER_FILE",
]
