"""Steering: difference-of-means vectors (`vectors`, the `cli` command's compute/generate/evaluate,
`evaluate`), and the gradient workflow's token and layer selectors with their MLP."""
