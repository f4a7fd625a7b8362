"""A static HTML report of explained retrieval (:func:`retrieval_report`), and one for many
queries written query by query (:class:`ReportSiteWriter`)."""

from .page import MARKER_FILE
from .report import (
    ReportCard,
    ReportMatch,
    RetrievalReport,
    check_report_destination,
    retrieval_report,
)
from .site import FailureEntry, MatchEntry, QueryEntry, ReportSiteWriter

__all__ = [
    "retrieval_report",
    "RetrievalReport",
    "ReportCard",
    "ReportMatch",
    "check_report_destination",
    "MARKER_FILE",
    "ReportSiteWriter",
    "QueryEntry",
    "MatchEntry",
    "FailureEntry",
]
