"""Training-data selection: subsets as catalog objects (`subsets`) and the SAE -> attribution-rank
predictor (`predictor`, with its data and held-out statistics)."""
