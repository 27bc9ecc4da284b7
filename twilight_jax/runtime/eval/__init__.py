"""The accuracy harness: offline long-context tasks (tasks), string-match scores and tables
(scoring), the methods and settings of a sweep (settings), the model adapter (adapter), the
dense-prefill / sparse-decode protocol (decode), the method sweep (runner), plots and the
results page (plots, report). Entry point: scripts/eval_accuracy.py."""
