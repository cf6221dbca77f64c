"""Stage two: the training loop (loop), self-critical sequence training (scst) and what a run
shows while it trains (monitor: TensorBoard, curves.png)."""
