"""Planning: a dataset fingerprint and the training/inference plan derived from it (``plan.json``)."""

from medseg.planning.fingerprint import Fingerprint, fingerprint_dataset
from medseg.planning.plan import (
    Plan,
    TrainingConfig,
    check_plan_fits,
    fit_batch_to_budget,
    litemedsam_step_gb,
    make_plan,
    read_plan,
    write_plan,
)

__all__ = [
    "Fingerprint",
    "Plan",
    "TrainingConfig",
    "check_plan_fits",
    "fingerprint_dataset",
    "fit_batch_to_budget",
    "litemedsam_step_gb",
    "make_plan",
    "read_plan",
    "write_plan",
]
