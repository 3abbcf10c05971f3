"""FID, sFID, Inception Score and precision/recall against ADM reference batches."""
