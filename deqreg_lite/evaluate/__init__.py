"""Turn registration results into numbers and tables (floor 3: uses metrics and methods, never their insides).

One job per module:

* :mod:`.run` - :func:`evaluate` (a :class:`Table` of per-pair Dice, HD95, folding %, SDlogJ (the Learn2Reg
  ``sdlogj`` and the textbook ``sdlogj_plain``), TRE where keypoints exist, and inference time),
  :func:`step_sweep` (Dice and folding against the number of inference steps, Fig. 3), :func:`pair_metrics`
  (one registered pair), :func:`evaluate_elastix`, and :func:`as_method`, the one adapter that turns a
  RegistrationMethod or a plain callable into the call the runners make (what is accepted: see :mod:`.run`);
* :mod:`.tables` - :class:`Table` (markdown, CSV, summary), :func:`format_table`, :func:`table1` (Table 1 with
  significance marks), :func:`trained_vs_best` and :func:`table2` (Table 2);
* :mod:`.stats` - :func:`wilcoxon` (paired signed-rank test) and the paired values it compares;
* :mod:`.cost` - :func:`training_memory` and :func:`training_cost` (memory and time of one training step).

Re-exported from where they live: the baselines :func:`identity_method`, :func:`classical_method`,
:func:`elastix_method`, :func:`elastix_available` (:mod:`deqreg_lite.methods.baselines`, registration methods like
the learned ones), and the Learn2Reg files :func:`save_l2r_disp` / :func:`load_l2r_disp`
(:mod:`deqreg_lite.datasets.learn2reg`).
"""
from ..datasets.learn2reg import _case_number, load_l2r_disp, save_l2r_disp  # noqa: F401 (_case_number: old name)
from ..methods.baselines import (
    ELASTIX_INSTALL_HINT,
    classical_method,
    elastix_available,
    elastix_method,
    identity_method,
)
from .cost import training_cost, training_memory
from .run import DEFAULT_SWEEP_STEPS, MethodCall, as_method, evaluate, evaluate_elastix, pair_metrics, step_sweep
from .stats import min_pairs_for_test, no_test_note, wilcoxon
from .tables import Table, format_table, table1, table2, trained_vs_best

__all__ = ["pair_metrics", "format_table", "Table", "evaluate", "identity_method", "classical_method",
           "elastix_method", "elastix_available", "evaluate_elastix", "training_memory", "training_cost",
           "step_sweep", "trained_vs_best", "table2", "wilcoxon", "table1", "DEFAULT_SWEEP_STEPS",
           "ELASTIX_INSTALL_HINT", "min_pairs_for_test", "no_test_note", "save_l2r_disp", "load_l2r_disp", "as_method", "MethodCall"]
