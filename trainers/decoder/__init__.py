"""A decoder from stored SAE codes to next-token logits, gated on KL (see trainers.decoder.cli)."""
