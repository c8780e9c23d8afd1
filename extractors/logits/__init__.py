"""The frozen model's next-token distributions in the store (`--kinds logits`): the array kind
lives in extractors.logits.kind; its names are importable from here."""

from extractors.logits.kind import (
    DEFAULT_K,
    LAST_POSITION,
    Logits,
    LogitsSpec,
    extract_logits,
    final_norm_and_head,
    logits_array_names,
    topk_lse,
)

__all__ = [
    "DEFAULT_K",
    "LAST_POSITION",
    "Logits",
    "LogitsSpec",
    "extract_logits",
    "final_norm_and_head",
    "logits_array_names",
    "topk_lse",
]
