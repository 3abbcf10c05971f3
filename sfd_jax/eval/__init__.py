"""FID, sFID, Inception Score and precision/recall against ADM reference batches.

`images` (sources: .npz batches, folders, tfds splits) → `features` (sharded InceptionV3 activations) →
`fid`, `inception_score`, `precision_recall` (the ADM evaluator's formulas) ; `reference` reads and writes ADM
reference batches; `evaluator.evaluate` runs the whole evaluation and returns a JSON-able report.
"""
