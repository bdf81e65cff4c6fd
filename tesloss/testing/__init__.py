"""What tesloss's kernels are held to, for its test suite and for anyone who
checks an install (``python -m tesloss.check``), as torch.testing is for torch:

- the float64 truth and the accuracy rule (rule.py): against the recipe run in
  float64, each output of the fused op errs at most RULE_FACTOR times the
  recipe's own error in the inputs' dtype, plus FLOOR_ULPS ulps;
- the cases (cases.py): a TeS problem with its layout in memory, built from a
  random draw's choices or as the fixed problems that reach every kernel path;
- the hard regimes (regimes.py): parameters at their edges, confident rows,
  labels far below the rest, subnormal weights, and what random draws found.
"""
from .cases import (EDGE_CLASSES, EDGE_TARGETS, REDUCTIONS, ROW_LAYOUTS, TARGET_FORMS, Case,
                    build_case, edge_case, on_device, placed, shifted)
from .regimes import (FOUND_BY_FUZZ, OPEN_FINDINGS, PARAMETER_EDGES, RECIPE, as_probabilities,
                      confident, label_far_below, offset, parameter_edge_case, problem,
                      subnormal_weights_case)
from .rule import (ALL_DTYPES, FLOOR_ULPS, FP64_RULE, HALF_DTYPES, RULE_FACTOR, Tolerance,
                   assert_close, assert_elements_match, assert_matches_reference,
                   check_against_reference, errors, floor_units, gradient_sizes, max_abs,
                   max_error, rule_bounds, run, run_reference64, scales)

__all__ = [
    "ALL_DTYPES", "Case", "EDGE_CLASSES", "EDGE_TARGETS", "FLOOR_ULPS", "FOUND_BY_FUZZ",
    "FP64_RULE", "HALF_DTYPES", "OPEN_FINDINGS", "PARAMETER_EDGES", "RECIPE", "REDUCTIONS",
    "ROW_LAYOUTS", "RULE_FACTOR", "TARGET_FORMS", "Tolerance", "as_probabilities", "assert_close",
    "assert_elements_match", "assert_matches_reference", "build_case",
    "check_against_reference", "confident", "edge_case", "errors", "floor_units", "gradient_sizes",
    "label_far_below", "max_abs", "max_error", "offset", "on_device", "parameter_edge_case", "placed",
    "problem", "rule_bounds", "run", "run_reference64", "scales", "shifted",
    "subnormal_weights_case",
]
