"""Experiment analysis: arm-versus-holdout effects with CIs, sample-ratio check, IPW."""

from couponflow.analysis.experiment import (
    ArmResult,
    ExperimentResult,
    GroupSummary,
    SampleRatioCheck,
    UpliftSummary,
    analyze_experiment,
    check_sample_ratio,
)
from couponflow.analysis.ipw import (
    Estimate,
    ipw_policy_lift,
    ipw_policy_value,
    self_normalized_ipw_policy_value,
)
from couponflow.analysis.stats import (
    Interval,
    newcombe_difference,
    welch_difference,
    wilson_interval,
)

__all__ = [
    "ArmResult",
    "Estimate",
    "ExperimentResult",
    "GroupSummary",
    "Interval",
    "SampleRatioCheck",
    "UpliftSummary",
    "analyze_experiment",
    "check_sample_ratio",
    "ipw_policy_lift",
    "ipw_policy_value",
    "newcombe_difference",
    "self_normalized_ipw_policy_value",
    "welch_difference",
    "wilson_interval",
]
