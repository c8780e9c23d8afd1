"""The SAE spliced into the residual stream, and the three estimates of a feature's effect.

At the output of decoder block L, on the site tokens (the view's tokens of the rows), a
forward hook replaces the residual stream h by

    h -> SAE.decode(f) + err,   f = SAE.encode(h),   err = h - SAE.decode(f)

with f and err as leaf tensors: the forward is unchanged (up to float rounding) but the
metric now has gradients with respect to every feature at every site token and to the
SAE's reconstruction error, which stays a node of its own (sparse feature circuits, Marks
et al. 2024). Every node has a baseline b (`zero`, or `mean`: its mean over every site
token of the rows) and its effect is

    effect = metric(clean) - metric(node set to b at every site token).

* `attribution_patching`: the first-order estimate, one backward at the clean point:
  effect_i ~= sum_t (f[t, i] - b_i) * dmetric/df[t, i] (Nanda 2023; Syed et al. 2023).
* `integrated_gradients`: the gradient averaged along the straight path b + alpha (x - b),
  every node (features and error) moving together, at alpha = k / steps for k = 1..steps (a
  right Riemann sum, so `steps=1` is attribution patching); the node effects sum to
  metric(clean) - metric(every node at its baseline) as steps grows (completeness).
* `exact_ablation`: the metric recomputed with one node set to its baseline, for each node
  asked for (one forward per node and batch).

Batches are independent (causal attention, right padding, rows never interact) and each
batch's metric is already divided by the global denominator (see `Metric`), so the metric
of all rows, and every effect, is the sum over batches. Feature index `ERR` (-1) is the
error node.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from extractors.gradnorm import completion_loss
from extractors.model import decoder_layers

ERR = -1  # the feature id of the SAE error node in results and tables


class Batch(NamedTuple):
    """Right-padded rows: ids/attn [B, T]; `site` [B, T] the tokens where the SAE is spliced and
    effects are summed; `target` [B, T] the tokens the metric reads (supervised tokens for the
    loss metrics, the site tokens for a probe)."""

    ids: torch.Tensor
    attn: torch.Tensor
    site: torch.Tensor
    target: torch.Tensor


class Metric(NamedTuple):
    """What is differentiated, per batch already divided by `denom` (the global number of target
    tokens), so that the sum over batches is the metric of all rows:

    * `loss`: the mean cross-entropy of the target tokens (completion_loss);
    * `logprob`: its negative, the mean log-probability of the target tokens (category:<name>);
    * `probe`: the mean over target tokens of a linear probe's logit h_Lp . coef + bias on the
      residual stream after block `probe_layer` (>= the SAE's layer)."""

    kind: str
    denom: float
    probe_layer: int | None = None
    coef: torch.Tensor | None = None
    bias: float = 0.0


class _Stop(Exception):
    """Raised by the probe hook: nothing above the probe's layer is needed."""


class Splice:
    """The forward hook of the module docstring. `mode` says what the nodes are:
    ("clean",), ("path", alpha), ("ablate", feature) with `grad` making them leaves."""

    def __init__(self, sae: Any, f_base: torch.Tensor, e_base: torch.Tensor):
        self.sae, self.f_base, self.e_base = sae, f_base, e_base
        self.site: torch.Tensor | None = None
        self.mode: tuple = ("clean",)
        self.grad = False
        self.f = self.err = self.f_leaf = self.e_leaf = None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            f = self.sae.encode(x)
            f = f.to_dense() if f.is_sparse else f
            return f, x - self.sae.decode(f)

    def __call__(self, module: Any, args: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        x = h[self.site].to(self.sae.W_dec.dtype)  # sae.dtype is the config's, even after .double()
        f, err = self.encode(x)
        self.f, self.err = f, err
        kind = self.mode[0]
        if kind == "clean":
            fn, en = f, err
        elif kind == "path":
            a = self.mode[1]
            fn, en = self.f_base + a * (f - self.f_base), self.e_base + a * (err - self.e_base)
        elif kind == "ablate":
            i = self.mode[1]
            fn, en = f, err
            if i == ERR:
                en = self.e_base.expand_as(err)
            else:
                fn = f.clone()
                fn[:, i] = self.f_base[i]
        else:
            raise ValueError(f"unknown splice mode {self.mode!r}")
        if self.grad:
            fn, en = fn.detach().requires_grad_(True), en.detach().requires_grad_(True)
            self.f_leaf, self.e_leaf = fn, en
        out = h.clone()
        out[self.site] = (self.sae.decode(fn) + en).to(h.dtype)
        return (out, *output[1:]) if isinstance(output, tuple) else out


@contextmanager
def spliced(model: Any, layer: int, splice: Splice, metric: Metric) -> Iterator[dict[str, torch.Tensor]]:
    """Hook the splice on block `layer` (and, for a probe, a capture on block probe_layer, hooked
    after the splice so that a probe at the same layer reads the spliced stream)."""
    blocks = decoder_layers(model)
    handles = [blocks[layer].register_forward_hook(splice)]
    captured: dict[str, torch.Tensor] = {}
    if metric.kind == "probe":

        def capture(module: Any, args: Any, output: Any) -> None:
            captured["h"] = output[0] if isinstance(output, tuple) else output
            raise _Stop

        handles.append(blocks[metric.probe_layer].register_forward_hook(capture))
    try:
        yield captured
    finally:
        for hd in handles:
            hd.remove()


def _head(model: Any) -> tuple[Any, Any, float | None]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)


def metric_of(model: Any, layer: int, splice: Splice, metric: Metric, b: Batch) -> torch.Tensor:
    """One forward of a batch with the splice in its current mode: the batch's share of the metric."""
    splice.site = b.site
    dec, head, cap = _head(model)
    with spliced(model, layer, splice, metric) as cap_h:
        try:
            hidden = dec(input_ids=b.ids, attention_mask=b.attn).last_hidden_state
        except _Stop:
            hidden = None
    if metric.kind == "probe":
        h = cap_h["h"][b.target].float()
        return (h @ metric.coef.to(h.device) + metric.bias).sum() / metric.denom
    loss = completion_loss(hidden, b.ids, b.target, head, "sum", cap) / metric.denom
    return -loss if metric.kind == "logprob" else loss


class Clean(NamedTuple):
    value: float  # the metric of all rows, spliced, clean
    per_batch: list[float]
    f_mean: torch.Tensor  # [d_sae] mean of each feature over every site token
    e_mean: torch.Tensor  # [d_in] mean error
    fires: np.ndarray  # [d_sae] site tokens where each feature is active
    n_site: int


@torch.no_grad()
def clean_pass(model: Any, sae: Any, layer: int, batches: Sequence[Batch], metric: Metric, progress: bool) -> Clean:
    d_sae, d_in = int(sae.cfg.d_sae), int(sae.cfg.d_in)
    dev, dt = sae.W_dec.device, sae.W_dec.dtype
    sp = Splice(sae, torch.zeros(d_sae, device=dev, dtype=dt), torch.zeros(d_in, device=dev, dtype=dt))
    fsum, esum = torch.zeros(d_sae, dtype=torch.float64), torch.zeros(d_in, dtype=torch.float64)
    fires, n, vals = np.zeros(d_sae, np.int64), 0, []
    for b in tqdm(batches, desc="clean pass", unit="batch", disable=not progress):
        vals.append(float(metric_of(model, layer, sp, metric, b)))
        fsum += sp.f.double().sum(0).cpu()
        esum += sp.err.double().sum(0).cpu()
        fires += (sp.f > 0).sum(0).cpu().numpy()
        n += len(sp.f)
    return Clean(float(sum(vals)), vals, (fsum / max(n, 1)).to(dev, dt), (esum / max(n, 1)).to(dev, dt), fires, n)


def baselines(sae: Any, clean: Clean, baseline: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature baseline [d_sae], error baseline [d_in]): zeros, or the means over the site tokens."""
    if baseline == "mean":
        return clean.f_mean, clean.e_mean
    if baseline != "zero":
        raise ValueError(f"baseline must be zero or mean, got {baseline!r}")
    return torch.zeros_like(clean.f_mean), torch.zeros_like(clean.e_mean)


class Effects(NamedTuple):
    features: np.ndarray  # [d_sae] float64
    err: float


def attribution_patching(
    model: Any, sae: Any, layer: int, batches: Sequence[Batch], metric: Metric, base: tuple, progress: bool
) -> Effects:
    """sum_t (x - b) . dmetric/dx at the clean point, per node (one backward per batch)."""
    sp = Splice(sae, *base)
    sp.grad = True
    eff, err = torch.zeros(int(sae.cfg.d_sae), dtype=torch.float64), 0.0
    for b in tqdm(batches, desc="attribution patching", unit="batch", disable=not progress):
        m = metric_of(model, layer, sp, metric, b)
        gf, ge = torch.autograd.grad(m, [sp.f_leaf, sp.e_leaf])
        eff += ((sp.f - base[0]) * gf).double().sum(0).cpu()
        err += float(((sp.err - base[1]) * ge).double().sum())
    return Effects(eff.numpy(), err)


def integrated_gradients(
    model: Any,
    sae: Any,
    layer: int,
    batches: Sequence[Batch],
    metric: Metric,
    base: tuple,
    steps: int,
    progress: bool,
) -> Effects:
    """sum_t (x - b) . mean_k dmetric/dx at b + (k / steps)(x - b), k = 1..steps, per node."""
    sp = Splice(sae, *base)
    sp.grad = True
    eff, err = torch.zeros(int(sae.cfg.d_sae), dtype=torch.float64), 0.0
    bar = tqdm(total=len(batches) * steps, desc=f"integrated gradients ({steps} steps)", disable=not progress)
    for b in batches:
        gf_sum = ge_sum = None
        for k in range(1, steps + 1):
            sp.mode = ("path", k / steps)
            m = metric_of(model, layer, sp, metric, b)
            gf, ge = torch.autograd.grad(m, [sp.f_leaf, sp.e_leaf])
            gf_sum = gf.double() if gf_sum is None else gf_sum + gf.double()
            ge_sum = ge.double() if ge_sum is None else ge_sum + ge.double()
            bar.update()
        eff += ((sp.f - base[0]).double() * gf_sum / steps).sum(0).cpu()
        err += float(((sp.err - base[1]).double() * ge_sum / steps).sum())
    bar.close()
    return Effects(eff.numpy(), err)


@torch.no_grad()
def exact_ablation(
    model: Any,
    sae: Any,
    layer: int,
    batches: Sequence[Batch],
    metric: Metric,
    base: tuple,
    clean: Clean,
    nodes: Sequence[int],
    progress: bool,
) -> dict[int, float]:
    """metric(clean) - metric(node at its baseline) for each node (a feature id, or ERR)."""
    sp = Splice(sae, *base)
    out = dict.fromkeys(nodes, 0.0)
    bar = tqdm(total=len(batches) * len(nodes), desc="exact ablation", unit="forward", disable=not progress)
    for b, m_clean in zip(batches, clean.per_batch, strict=True):
        for i in nodes:
            sp.mode = ("ablate", int(i))
            out[i] += m_clean - float(metric_of(model, layer, sp, metric, b))
            bar.update()
    bar.close()
    return out


@torch.no_grad()
def all_at_baseline(
    model: Any, sae: Any, layer: int, batches: Sequence[Batch], metric: Metric, base: tuple, clean: Clean
) -> float:
    """metric(clean) - metric(every node at its baseline): what integrated gradients' effects sum to."""
    sp = Splice(sae, *base)
    sp.mode = ("path", 0.0)
    return clean.value - sum(float(metric_of(model, layer, sp, metric, b)) for b in batches)
