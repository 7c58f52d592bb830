"""Training jobs: configuration, the loop, evaluation, cross-validation, prediction, distribution."""
