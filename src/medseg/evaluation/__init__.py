"""Folder-vs-folder evaluation: pairing, scoring, CSV/JSON/PNG reports."""

from medseg.evaluation.evaluate import CaseLabelResult, Evaluation, evaluate_pairs, load_pair
from medseg.evaluation.pairing import CasePair, case_name, pair_cases
from medseg.evaluation.report import write_report

__all__ = [
    "CaseLabelResult",
    "CasePair",
    "Evaluation",
    "case_name",
    "evaluate_pairs",
    "load_pair",
    "pair_cases",
    "write_report",
]
