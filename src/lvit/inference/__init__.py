"""Inference: the one way from an image (and its report, or none) to a mask. :class:`Segmenter` is built once from
a run or model folder and serves ``lvit predict``, ``lvit test``, ``lvit explain``, ``lvit app`` and the
benchmarks; :class:`ReportWriter` writes a report from an image where none is given."""

from .report_writer import ReportWriter, write_reports
from .segmenter import (
    Segmenter,
    missing_report,
    model_has_no_report_path,
    model_reads_text,
    read_run,
    resolve_device,
    run_text_encoder,
    to_original_size,
)

__all__ = ["ReportWriter", "Segmenter", "missing_report", "model_has_no_report_path", "model_reads_text", "read_run",
           "resolve_device", "run_text_encoder", "to_original_size", "write_reports"]
