"""Evaluation of runs and labelers: metrics (pure functions), `python -m training.eval` (inputs,
eval, report) and `python -m training.eval_labeler`. Imports the loop and training.labeling; neither
imports this package.
"""
