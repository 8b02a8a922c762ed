"""Judged evaluation: the judges (`judges`), the run over a prompt set (`pairwise`), win rates with intervals
(`win_rates`)."""
