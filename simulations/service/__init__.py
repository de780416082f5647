"""After a run: scores for people on request, disputes, drift on a later cohort, `fedscore
serve`."""
