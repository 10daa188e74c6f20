"""A scoring run: its configuration, its resumable state, the run itself, the
per-row records, selection and plots."""
