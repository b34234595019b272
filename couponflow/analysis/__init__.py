"""Experiment analysis: arms against the holdout with CIs and guards, sequential looks,
CUPED, IPW, and the summary the next campaign reads."""

from couponflow.analysis.arms import DECISION_RULE, ArmResult, GroupSummary
from couponflow.analysis.cuped import CupedComparison, compare_with_cuped
from couponflow.analysis.decisions import (
    load_campaign_summary,
    offers_to_drop,
    offers_to_keep,
)
from couponflow.analysis.experiment import (
    ArmSequence,
    ExperimentResult,
    analyze_experiment,
)
from couponflow.analysis.guards import SampleRatioCheck, check_sample_ratio
from couponflow.analysis.ipw import (
    Estimate,
    ipw_policy_lift,
    ipw_policy_value,
    self_normalized_ipw_policy_value,
)
from couponflow.analysis.qini import UpliftSummary
from couponflow.analysis.sequential import SequentialLook, confidence_sequence
from couponflow.analysis.stats import (
    Interval,
    compare_proportions,
    fisher_exact_p_value,
    holm_adjust,
    newcombe_difference,
    welch_difference,
    wilson_interval,
)
from couponflow.analysis.stratified import (
    SplitCheck,
    check_split_change,
    stratified_difference,
)

__all__ = [
    "DECISION_RULE",
    "ArmResult",
    "ArmSequence",
    "CupedComparison",
    "Estimate",
    "ExperimentResult",
    "GroupSummary",
    "Interval",
    "SampleRatioCheck",
    "SequentialLook",
    "SplitCheck",
    "UpliftSummary",
    "analyze_experiment",
    "check_sample_ratio",
    "check_split_change",
    "compare_proportions",
    "compare_with_cuped",
    "confidence_sequence",
    "fisher_exact_p_value",
    "holm_adjust",
    "ipw_policy_lift",
    "ipw_policy_value",
    "load_campaign_summary",
    "newcombe_difference",
    "offers_to_drop",
    "offers_to_keep",
    "self_normalized_ipw_policy_value",
    "stratified_difference",
    "welch_difference",
    "wilson_interval",
]
