"""``method="agent"``: try-and-learn pruning agents (after Huang et al., WACV 2018, "Learning to
prune filters in convolutional neural networks", arXiv 1801.07365).

One small policy network per target layer maps per-filter features (weight and activation
statistics) to a keep probability per filter. It is trained with REINFORCE: each update samples
``actions`` keep-masks from the policy, scores every one of them on a validation batch in ONE
batched masked forward (:meth:`SelectionContext.masked_losses` with an accuracy ``metric``) and
rewards it with :func:`agent_reward`, the product of an accuracy term and an efficiency term
(the drop bound ``b`` is the one knob of the trade-off). Layers are handled in order; each later
layer is trained with the earlier layers' decisions fixed. The agents' decisions are then
extended or cut back by one global ranking (the same fraction of every layer's width, lowest keep
logit first) until the MACs meet the target. Every constant and default: docs/methods.md,
"## agent".
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from .base import Criterion, SelectionContext, register
from .functional import consumer_weight_norm
from .ranking import select_by_ranking

__all__ = ["Agent", "agent_reward", "agent_scores", "uniform_keep", "filter_features",
           "FEATURES"]

#: The per-filter features the policy reads (each standardised within its layer).
FEATURES = ("log_l1", "log_out_norm", "bn_gamma", "bn_beta", "log_act_rms", "act_rate")


def agent_reward(p: Any, p_hat: Any, kept: Any, total: Any, b: float) -> torch.Tensor:
    """The reward of a pruning action: ``(b - (p - p_hat)) / b * log(total / kept)``.

    ``p``: the performance (accuracy, in points) before the action; ``p_hat``: after it; ``kept``:
    the filters the action keeps out of ``total``; ``b``: the accuracy drop bound (same unit as
    ``p``). The accuracy term is 1 for no drop, 0 for a drop of exactly ``b`` and negative beyond
    (an improvement, ``p_hat > p``, makes it larger than 1; it is not clipped); the efficiency
    term is 0 when every filter is kept. Broadcasts over tensors; float64.
    """
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
        raise ValueError(f"the accuracy bound b must be a finite number > 0, got {b!r}")
    p, p_hat, kept, total = (torch.as_tensor(v, dtype=torch.float64)
                             for v in (p, p_hat, kept, total))
    if bool((total < 1).any()):
        raise ValueError("total (the layer's filters) must be >= 1")
    if bool((kept < 1).any()) or bool((kept > total).any()):
        raise ValueError("kept must be between 1 and total: an action keeps at least one filter")
    if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(p_hat).all())):
        raise ValueError("the accuracies p and p_hat must be finite")
    return (b - (p - p_hat)) / b * torch.log(total / kept)


def _accuracy(output: torch.Tensor, labels: torch.Tensor) -> float:
    return float((output.argmax(dim=1) == labels).double().mean()) * 100.0


def _standardise(f: torch.Tensor) -> torch.Tensor:
    """z-score each column; a constant column becomes 0."""
    mu = f.mean(dim=0, keepdim=True)
    sd = f.std(dim=0, unbiased=False, keepdim=True)
    return torch.where(sd > 1e-12 * (1 + mu.abs()), (f - mu) / sd.clamp_min(1e-30),
                       torch.zeros_like(f))


def filter_features(ctx: SelectionContext) -> list[torch.Tensor]:
    """``(size, 6)`` float64 per target, columns :data:`FEATURES`, standardised within the layer:
    log mean |W| of the filter, log norm of the consumer weights reading it, BN gamma and beta
    (0 without a BN), log RMS of its activation at the consumers' input and the fraction of
    those activations that are > 0 (calibration batches, eval mode)."""
    n_t = len(ctx.targets)
    sq = [torch.zeros(s, dtype=torch.float64) for s in ctx.sizes]
    pos = [torch.zeros(s, dtype=torch.float64) for s in ctx.sizes]
    den = [torch.zeros(s, dtype=torch.float64) for s in ctx.sizes]
    for _ in ctx.captured():
        for i, t in enumerate(ctx.targets):
            ln = t.links[0]          # every consumer reads the same activation
            blocks = torch.bincount(ln.chan_full, minlength=t.group.size).double()
            for x, *_ in ln.consumer.calls:
                xv = x.detach().double().cpu()
                xv = xv.reshape(xv.shape[0], xv.shape[1], -1)[:, ln.pos_full]  # (N, P, L)
                sq[i].index_add_(0, ln.chan_full, xv.pow(2).sum(dim=(0, 2)))
                pos[i].index_add_(0, ln.chan_full, (xv > 0).double().sum(dim=(0, 2)))
                den[i] += xv.shape[0] * xv.shape[2] * blocks
    out = []
    for i in range(n_t):
        d = den[i].clamp_min(1)
        w = ctx.out_weight(i).flatten(1).double()
        g = ctx.bn_gamma(i)
        beta = _bn_beta(ctx, i)
        f = torch.stack([
            torch.log(w.abs().mean(dim=1) + 1e-12),
            torch.log(consumer_weight_norm(ctx, i) + 1e-12),
            g.double() if g is not None else torch.zeros(ctx.sizes[i], dtype=torch.float64),
            beta if beta is not None else torch.zeros(ctx.sizes[i], dtype=torch.float64),
            0.5 * torch.log(sq[i] / d + 1e-12),
            pos[i] / d,
        ], dim=1)
        out.append(_standardise(f))
    return out


def _bn_beta(ctx: SelectionContext, i: int) -> torch.Tensor | None:
    for m, s in ctx.producer_modules(i, "norm"):
        if getattr(m, "bias", None) is not None and s.length == ctx.targets[i].group.size:
            return m.bias.detach()[s.start:s.start + s.length].double().cpu()
    return None


class _Policy(nn.Module):
    """features (size, F) -> keep logits (size,): Linear(F, hidden), tanh, Linear(hidden, 1),
    shared by the filters of one layer."""

    def __init__(self, n_features: int, hidden: int, init_keep: float,
                 generator: torch.Generator):
        super().__init__()
        self.fc1 = nn.Linear(n_features, hidden).double()
        self.fc2 = nn.Linear(hidden, 1).double()
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(hidden, n_features, generator=generator,
                                              dtype=torch.float64) / math.sqrt(n_features))
            self.fc1.bias.zero_()
            self.fc2.weight.copy_(torch.randn(1, hidden, generator=generator,
                                              dtype=torch.float64) * 0.1 / math.sqrt(hidden))
            self.fc2.bias.fill_(math.log(init_keep / (1 - init_keep)))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(f))).squeeze(-1)


class _LayerPolicy(nn.Module):
    """The policy of one layer: the shared feature network plus one free logit per filter."""

    def __init__(self, net: _Policy, size: int, per_filter: bool):
        super().__init__()
        self.net = net
        self.offset = nn.Parameter(torch.zeros(size, dtype=torch.float64),
                                   requires_grad=per_filter)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f) + self.offset


def _positive_int(name: str, v: Any, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"agent option {name} must be an integer >= {low}, got {v!r}")
    return v


def _number(name: str, v: Any, low: float, high: float | None = None,
            open_low: bool = True, open_high: bool = True) -> float:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok:
        ok = (v > low if open_low else v >= low) and (
            high is None or (v < high if open_high else v <= high))
    if not ok:
        lo, hi = ("(" if open_low else "["), (")" if open_high else "]")
        rng = f"{lo}{low}, {high if high is not None else 'inf'}{hi}"
        raise ValueError(f"agent option {name} must be a number in {rng}, got {v!r}")
    return float(v)


@register("agent")
class Agent(Criterion):
    """Try-and-learn agents, one per target layer, trained with REINFORCE (docs/methods.md).

    Options (``method_options``):
        b: the accuracy drop bound of the reward, in accuracy points (default 5.0: losing one
            of the 24 validation images, 4.2 points, still leaves a positive accuracy term).
        updates: policy updates per layer; default None: from ``budget``
            (:meth:`updates_per_layer`).
        budget: the forward MACs all agents may spend together when ``updates`` is None
            (default 5e12: 4 updates per layer on ResNet-56, the cap of 80 on LeNet-5).
        actions: sampled keep-masks per update, scored in one batched forward (default 12).
        val_samples: validation images each update scores its actions on (default 24); taken
            in turn from the calibration batches.
        hidden: hidden units of each policy network (default 16).
        lr: Adam learning rate of the policy (default 0.05).
        init_keep: keep probability of every filter when its layer's training starts: a
            number in (0, 1) (default 0.5), or ``"auto"``: the fraction of every layer's width
            that, kept uniformly, meets the MACs target (:func:`uniform_keep`; 0.5 in
            :meth:`scores`, which does not know the target).
        warm_start: start each layer's policy from the previous layer's trained one (default
            True; its output bias is reset to ``init_keep``); False: a fresh policy per layer.
        per_filter: add one free logit per filter to the feature network's output, so that an
            agent can learn which filters to keep beyond what the features tell (default False:
            the keep probability is a function of the features only).
    """

    #: bounds of the budget-derived number of updates per layer
    MIN_UPDATES, MAX_UPDATES = 4, 80

    needs_data = True

    def __init__(self, b: float = 5.0, updates: int | None = None, budget: float = 5e12,
                 actions: int = 12, val_samples: int = 24, hidden: int = 16, lr: float = 0.05,
                 init_keep: float | str = 0.5, warm_start: bool = True,
                 per_filter: bool = False):
        self.b = _number("b", b, 0.0)
        self.updates = None if updates is None else _positive_int("updates", updates)
        self.budget = _number("budget", budget, 0.0)
        self.actions = _positive_int("actions", actions, 2)
        self.val_samples = _positive_int("val_samples", val_samples)
        self.hidden = _positive_int("hidden", hidden)
        self.lr = _number("lr", lr, 0.0)
        self.init_keep = (init_keep if init_keep == "auto"
                          else _number("init_keep", init_keep, 0.0, 1.0))
        if not isinstance(warm_start, bool):
            raise ValueError(f"agent option warm_start must be True or False, got "
                             f"{warm_start!r}")
        self.warm_start = warm_start
        if not isinstance(per_filter, bool):
            raise ValueError(f"agent option per_filter must be True or False, got "
                             f"{per_filter!r}")
        self.per_filter = per_filter

    # -- validation data -------------------------------------------------------------------------

    @staticmethod
    def _validation(ctx: SelectionContext) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        if not ctx.batches:
            raise ValueError("method 'agent' needs calibration batches (calibration_batches >= 1)")
        labels = [lab for _, lab in ctx.batches]
        if not all(isinstance(lab, torch.Tensor) and lab.dim() == 1
                   and not lab.is_floating_point() for lab in labels):
            raise ValueError("method 'agent' scores actions by accuracy: the loader's targets "
                             "must be 1-D integer class labels")
        n_in = len(ctx.batches[0][0])
        inputs = tuple(torch.cat([inp[k] for inp, _ in ctx.batches]) for k in range(n_in))
        return inputs, torch.cat(labels)

    # -- the agents ------------------------------------------------------------------------------

    def updates_per_layer(self, ctx: SelectionContext) -> int:
        """``updates``, or ``budget / (targets * (actions + 1) * val_samples * MACs)`` rounded
        down (MACs: of the model on ``example_inputs``, one image), within [4, 80]."""
        if self.updates is not None:
            return self.updates
        n = min(self.val_samples, sum(int(lab.shape[0]) for _, lab in ctx.batches) or 1)
        per_update = len(ctx.targets) * (self.actions + 1) * n * max(ctx.macs.total, 1)
        return int(min(self.MAX_UPDATES, max(self.MIN_UPDATES, self.budget // per_update)))

    def train_layers(self, ctx: SelectionContext, init_keep: float | None = None
                     ) -> list[torch.Tensor]:
        """Train the agents layer by layer; returns the final keep logits of every target.
        ``init_keep``: the starting keep probability (default: the option, 0.5 for "auto")."""
        if init_keep is None:
            init_keep = 0.5 if self.init_keep == "auto" else float(self.init_keep)
        init_logit = math.log(init_keep / (1 - init_keep))
        inputs, labels = self._validation(ctx)
        updates = self.updates_per_layer(ctx)
        ctx.info["updates_per_layer"] = updates
        feats = filter_features(ctx)
        n_all = labels.shape[0]
        n = min(self.val_samples, n_all)
        gen = ctx.generator
        decisions: list[torch.Tensor | None] = [None] * len(ctx.targets)
        logits_out: list[torch.Tensor] = []
        per_layer: list[dict[str, Any]] = []
        policy: _Policy | None = None
        cursor = 0
        bar = None
        if ctx.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ctx.targets), desc="agent", unit="layer")
        for j, t in enumerate(ctx.targets):
            size = t.group.size
            fresh = _Policy(len(FEATURES), self.hidden, init_keep, gen)
            if self.warm_start and policy is not None:
                fresh.load_state_dict(policy.state_dict())
                with torch.no_grad():
                    fresh.fc2.bias.fill_(init_logit)
            policy = fresh
            layer_policy = _LayerPolicy(policy, size, self.per_filter)
            opt = torch.optim.Adam([p for p in layer_policy.parameters() if p.requires_grad],
                                   lr=self.lr)
            f = feats[j]
            rewards_seen = []
            for _ in range(updates):
                idx = (cursor + torch.arange(n)) % n_all
                cursor = (cursor + n) % n_all
                inp = tuple(x[idx] for x in inputs)
                lab = labels[idx]
                logits = layer_policy(f)
                with torch.no_grad():
                    p = torch.sigmoid(logits)
                    acts = torch.rand(self.actions, size, generator=gen,
                                      dtype=torch.float64) < p
                    empty = ~acts.any(dim=1)
                    acts[empty, int(torch.argmax(p))] = True   # an action keeps >= 1 filter
                masks = torch.cat([torch.ones(1, size, dtype=torch.bool), acts])
                acc = ctx.masked_losses(inp, lab, {j: masks}, alive=decisions,
                                        metric=_accuracy)
                r = agent_reward(acc[0], acc[1:], acts.sum(dim=1), size, self.b)
                rewards_seen.append(float(r.mean()))
                k = r.shape[0]
                adv = r - (r.sum() - r) / (k - 1)      # leave-one-out mean baseline
                sd = float(r.std(unbiased=False))
                adv = adv / sd if sd > 1e-12 else torch.zeros_like(adv)
                a = acts.double()
                logp = (a * nn.functional.logsigmoid(logits)
                        + (1 - a) * nn.functional.logsigmoid(-logits)).sum(dim=1)
                loss = -(adv * logp).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                final = layer_policy(f).detach().clone()
            keep = final >= 0
            if not bool(keep.any()):
                keep[int(torch.argmax(final))] = True
            decisions[j] = keep
            logits_out.append(final)
            per_layer.append({"layer": t.name, "width": size, "kept_by_agent": int(keep.sum()),
                              "keep_prob_mean": float(torch.sigmoid(final).mean()),
                              "mean_reward_first": rewards_seen[0],
                              "mean_reward_last": rewards_seen[-1]})
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        ctx.info["agents"] = per_layer
        return logits_out

    def scores(self, ctx: SelectionContext) -> list[torch.Tensor]:
        """Per filter: its quantile in its layer by the agent's keep logit minus the fraction of
        that layer the agent removes (see :func:`agent_scores`)."""
        return agent_scores(self.train_layers(ctx))

    def select(self, ctx: SelectionContext, target_flops: float) -> list[torch.Tensor]:
        """One global ranking of the :func:`agent_scores`, not normalised per layer (they are
        already fractions of each layer): at 0 every layer is cut exactly as its agent decided;
        a MACs target beyond (short of) that removes (restores) the same fraction of every
        layer's width, lowest (highest) keep logit first."""
        init = (uniform_keep(ctx, target_flops) if self.init_keep == "auto"
                else float(self.init_keep))
        ctx.info["init_keep"] = init
        lg = self.train_layers(ctx, init)
        scores = agent_scores(lg, [a["kept_by_agent"] for a in ctx.info["agents"]])
        ctx.check_scores(scores)
        ctx.info["scores"] = scores
        return select_by_ranking(scores, ctx.macs, target_flops, normalise=False)


def uniform_keep(ctx: SelectionContext, target_flops: float) -> float:
    """The largest fraction ``r`` such that keeping ``max(1, round(r * width))`` channels of every
    target meets ``target_flops`` (bisection, 30 steps), clipped to [0.05, 0.95]."""
    def meets(r: float) -> bool:
        alive = []
        for n in ctx.sizes:
            a = torch.zeros(n, dtype=torch.bool)
            a[:max(1, round(r * n))] = True
            alive.append(a)
        return ctx.macs.current(alive) <= target_flops * ctx.macs.total

    lo, hi = 0.0, 1.0
    if meets(hi):
        return 0.95
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return min(0.95, max(0.05, lo))


def agent_scores(logits: list[torch.Tensor], kept: list[int] | None = None) -> list[torch.Tensor]:
    """From the agents' keep logits to scores of one global ranking: ``q_c - d`` with ``q_c`` =
    the filter's rank in its layer by logit (ascending, ties by index) divided by the width, and
    ``d`` = the fraction the agent removes (logit < 0, at least one filter kept), plus
    ``1e-6 * sigmoid(logit)`` to order equal values across layers by keep probability. The
    agent's removed filters score <= 1e-6, its kept ones more."""
    out = []
    for lg in logits:
        lg = lg.to(torch.float64).cpu()
        n = lg.numel()
        q = torch.empty(n, dtype=torch.float64)
        q[torch.argsort(lg, stable=True)] = (torch.arange(n, dtype=torch.float64) + 1) / n
        removed = int((lg < 0).sum()) if kept is None else n - kept[len(out)]
        removed = min(removed, n - 1)
        out.append(q - removed / n + 1e-6 * torch.sigmoid(lg))
    return out
