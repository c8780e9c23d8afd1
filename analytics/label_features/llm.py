"""The explainer and scorer model: any Hugging Face causal LM (extractors.model.load_model:
'embedded', a Hub id or a local folder), used two ways. `explain` generates greedily from a
chat prompt, with its output cached in the run folder by the hash of (model, prompt,
max_new_tokens), so a rerun never asks twice. `yes_no` reads, for a batch of prompts, the
next-token log-probabilities of Yes and No after the chat template's assistant turn: the
score log p(Yes) - log p(No) is continuous (AUROC) and its sign is the decision.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extractors.model import LoadedModel, load_model, pad_token_id, resolve


def check_loadable(model: str, cache_dir: Path | None) -> None:
    """An explainer path that cannot load fails here, before anything else loads: a local folder
    needs config.json (extractors.model.resolve's check); a path-like value must exist."""
    looks_local = model.startswith((".", "/", "~")) or Path(model).expanduser().exists()
    if looks_local and not Path(model).expanduser().exists():
        raise ValueError(f"--explainer {model!r}: no such folder; pass a model folder, a Hub id or embedded")
    if looks_local:
        resolve(model, cache_dir)


def load(model: str, device: str, dtype: str, cache_dir: Path | None) -> LoadedModel:
    try:
        return load_model(model, device, dtype, cache_dir)
    except (OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"--explainer {model!r} did not load ({e}); pass a model folder, a Hub id or embedded") from e


def render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat template's text with the assistant turn opened (plain text without a template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"


def prompt_hash(model_id: str, prompt: str, max_new_tokens: int) -> str:
    return hashlib.sha256(json.dumps([model_id, prompt, max_new_tokens]).encode()).hexdigest()[:24]


class Scorer:
    """One loaded model that explains and scores (see the module docstring)."""

    def __init__(self, lm: LoadedModel, cache_dir: Path, batch_size: int = 8):
        self.lm = lm
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.generated = 0  # generate calls that missed the cache
        tok = lm.tokenizer
        self.yes = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("Yes", " Yes", "yes", " yes")})
        self.no = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("No", " No", "no", " no")})

    @torch.no_grad()
    def explain(self, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        prompt = render(self.lm.tokenizer, messages)
        path = self.cache_dir / f"{prompt_hash(self.lm.model_id, prompt, max_new_tokens)}.json"
        if path.exists():
            return json.loads(path.read_text())["text"]
        tok = self.lm.tokenizer
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).to(self.lm.device)
        out = self.lm.model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id(tok),
        )
        text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        self.generated += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": self.lm.model_id, "max_new_tokens": max_new_tokens, "text": text}))
        tmp.replace(path)  # whole or absent: a killed run never leaves half an entry
        return text

    @torch.no_grad()
    def yes_no(self, prompts: list[list[dict[str, str]]]) -> np.ndarray:
        """[n] log p(Yes) - log p(No) of the first answer token (Yes/No spellings pooled)."""
        tok = self.lm.tokenizer
        texts = [render(tok, m) for m in prompts]
        out = np.empty(len(texts))
        pad = pad_token_id(tok)
        for s in range(0, len(texts), self.batch_size):
            enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[s : s + self.batch_size]]
            n = max(len(e) for e in enc)
            ids = torch.full((len(enc), n), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), n), dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, : len(e)] = torch.tensor(e)
                mask[i, : len(e)] = 1
            logits = self.lm.model(
                input_ids=ids.to(self.lm.device), attention_mask=mask.to(self.lm.device)
            ).logits.float()
            last = logits[torch.arange(len(enc)), torch.tensor([len(e) - 1 for e in enc])]  # right padding
            lp = torch.log_softmax(last, -1)
            score = torch.logsumexp(lp[:, self.yes], -1) - torch.logsumexp(lp[:, self.no], -1)
            out[s : s + len(enc)] = score.cpu().numpy()
        return out
