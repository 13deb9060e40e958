"""Evaluation: perplexity (this package), and later human SSA ratings and the perplexity-SSA report."""
