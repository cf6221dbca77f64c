"""Scoring: coco-caption's metrics (metrics), CIDEr-D with fixed document frequencies (cider),
and decoding a split and scoring it (evaluate)."""
