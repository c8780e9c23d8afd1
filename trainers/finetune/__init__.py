"""LoRA finetunes on the store's own tokens (`train`), the completion-only loss they share with the
eval-loss command (`lm_loss`, `eval_loss`), and the math-answer check of downstream accuracy."""
