"""The accuracy harness: offline long-context tasks (tasks), string-match scores and tables
(scoring), the dense-prefill / sparse-decode protocol and the method sweep (runner), plots and
the results page (plots, report). Entry point: scripts/eval_accuracy.py."""
