"""Optuna over whole recipes: the space, one trial through the API, the study and its workers, the Pareto report."""
