"""Input: record sources (testbed generators, files) -> Grain pipelines -> global [B, K, L] batches."""
