"""Evaluation: perplexity (perplexity.py) and SSA: rating sets (itemset, static_set, transcripts), the
rating form (rating_app, ratings_db, static/), scores and reports (ratings, scores, correlation, report),
and simulated raters for end-to-end runs (simulated_raters, rating_client).  See docs/evaluation.md."""
