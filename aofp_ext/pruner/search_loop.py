"""The AOFP search loop. :meth:`AofpSearch.step` is one step of the method: take a batch, train
the model on it with the base masks applied (the *normal path*), draw ``masks_per_step``
attempts per active target, price them on the followers' captured inputs (the *attempt paths*),
record the damages, and let every target's :class:`~aofp_ext.search.LayerSearch` decide.
:meth:`AofpSearch.run` repeats it until the MACs target or ``max_steps``, with checkpoints,
progress and the callback in between.

Hooks: the base masks are applied at the input of every consumer (the conv/Linear that reads a
target's channels) by a forward pre-hook, which is exactly equivalent to zeroing them at the
group's mask point (the graph analysis guarantees that only zero-preserving ops lie between the
two) and also works where the mask point is a function rather than a module, or where a group
has none (coupled groups with ``targets="all"``). The same hooks capture the follower's input
for pricing, and the follower's unmasked output norm ``||Y_base||^2``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from .. import distributed as ddist
from ..pricing import Target, price_parts
from .batches import Batches, rng_state
from .common import NonFiniteLossError, progress_bar
from .plan import Plan
from .run_checkpoint import RunCheckpoint, RunState
from .settings import Settings

__all__ = ["AofpSearch"]


class AofpSearch:
    """The search over ``plan``'s targets; ``run.step`` counts the steps done, ``run.history``
    gets every decision, ``run.stop_reason`` ends the loop ("target" or "max_steps")."""

    def __init__(self, model: nn.Module, plan: Plan, s: Settings, run: RunState,
                 optimizer: torch.optim.Optimizer, loss_fn: Callable, batches: Batches,
                 gen: torch.Generator, store: RunCheckpoint, device: torch.device, *,
                 callback: Callable[[int, dict[str, Any]], None] | None,
                 checkpoint_seconds: float, progress: bool):
        self.model, self.plan, self.s, self.run_state = model, plan, s, run
        self.optimizer, self.loss_fn, self.batches, self.gen = optimizer, loss_fn, batches, gen
        self.store, self.device, self.callback = store, device, callback
        self.checkpoint_seconds, self.progress = checkpoint_seconds, progress
        self.net: nn.Module = model
        self.macs_now = 0

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> float:
        """batch -> train -> draw -> price -> record -> decide; returns the loss."""
        run = self.run_state
        ddist.note(f"search step {run.step}")
        before = rng_state(self.gen), self.batches.state()  # for a non-finite loss
        inputs, labels = self.batches.next()
        active = [t for t in self.plan.targets if t.search.active(run.step)]
        self._capture(active)
        self.net.train()
        loss = self.loss_fn(self.net(*inputs), labels)
        self._check_loss(loss, before)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # before the optimizer step: the attempts see this forward's weights
            self._draw_price_record(active)
        self.optimizer.step()
        self._capture([])
        loss_value = float(loss.detach())
        self._decide()
        run.step += 1
        return loss_value

    def _capture(self, active: list[Target]) -> None:
        """The followers of ``active`` keep their inputs and output norms in this forward."""
        live = {id(link.consumer) for t in active for link in t.links}
        for c in self.plan.consumers.values():
            c.capture, c.calls = id(c) in live, []

    def _check_loss(self, loss: torch.Tensor, before: tuple[dict, dict]) -> None:
        """On every rank (all stop together): a non-finite loss saves the state before this
        step and raises :class:`NonFiniteLossError`."""
        if ddist.all_finite(loss.detach()):
            return
        state = self.run_state.search_snapshot(self.model, self.optimizer, self.plan.targets,
                                               *before)
        state["nonfinite"] = True
        self.store.save(state)
        where = (f"the state before this step is saved in {self.store.path}; resume from it "
                 "with a lower lr" if self.store.path is not None else
                 "pass checkpoint_dir= to keep the state of the step before")
        raise NonFiniteLossError(
            f"the loss is {float(loss.detach().float().mean())} at search step "
            f"{self.run_state.step}: the search stopped ({where}).")

    def _draw_price_record(self, active: list[Target]) -> None:
        """K attempts per active target, priced on its followers' captured inputs; the damage
        relative to ``||Y_base||^2`` recorded (distributed: every rank's batch, summed). One
        device-to-host copy and one finiteness check for the whole step."""
        drawn = [(t, t.search.draw(self.s.masks_per_step, self.gen)) for t in active]
        parts = price_parts([(t, masks.to(self.device)) for t, masks in drawn])
        tts = [damage / max(base, 1e-30) for damage, base in ddist.sum_damages(parts)]
        if tts and not bool(torch.isfinite(torch.cat(tts)).all()):
            bad = next(t for (t, _), tt in zip(drawn, tts) if not bool(torch.isfinite(tt).all()))
            raise NonFiniteLossError(
                f"non-finite damage for '{bad.name}' at step {self.run_state.step}: the "
                "follower's activations are not finite")
        for (t, masks), tt in zip(drawn, tts):
            t.search.record(masks, tt)

    def _decide(self) -> None:
        """Every target whose half ends now decides; the run stops as soon as a prune brings
        the MACs to the target (the later targets do not decide this step)."""
        run, pruned_now = self.run_state, False
        for t in self.plan.targets:
            move = t.search.end_step(run.step)
            if move is None:
                continue
            run.history.append(move.as_dict())
            if move.action == "prune":
                pruned_now = True
                self.macs_now = self.plan.macs.current()
                if self.macs_now <= self.s.target_flops * self.plan.macs.total:
                    run.stop_reason = "target"
                    break
        if pruned_now:
            self.plan.apply_keep(self.device)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Steps until the target or ``max_steps``; the hooks and DDP wrapper live only here."""
        run, plan = self.run_state, self.plan
        plan.apply_keep(self.device)
        self.macs_now = plan.macs.current()
        if self.macs_now <= self.s.target_flops * plan.macs.total:
            run.stop_reason = "target"
        with self._hooks(), progress_bar(self.progress, total=self.s.max_steps,
                                         initial=run.step, desc="AOFP search",
                                         unit="step") as bar:
            clock = _Clock(run.timing["search"])
            self.net = ddist.wrap(self.model, self.device)  # DDP when distributed
            try:
                while run.stop_reason is None:
                    if run.step >= self.s.max_steps:
                        run.stop_reason = "max_steps"
                        break
                    loss = self.step()
                    run.timing["search"] = clock.elapsed()
                    self._after_step(bar, loss, clock)
            finally:
                self.net = self.model  # drops the DDP wrapper (its hooks)

    def _after_step(self, bar: Any, loss: float, clock: _Clock) -> None:
        """Progress, a checkpoint when due, the callback."""
        run, plan = self.run_state, self.plan
        frac = self.macs_now / max(plan.macs.total, 1)
        removed = sum(t.group.size - t.search.width for t in plan.targets)
        bar.update(1)
        bar.set_postfix(macs=f"{frac:.3f}", pruned=removed, loss=f"{loss:.3f}", refresh=False)
        if self._checkpoint_due(clock):
            self.store.save(run.search_snapshot(self.model, self.optimizer, plan.targets,
                                                rng_state(self.gen), self.batches.state()))
            clock.saved()
        if self.callback is not None:
            self.callback(run.step, {"macs_fraction": frac, "loss": loss,
                                     "widths": {t.name: t.search.width for t in plan.targets}})

    def _checkpoint_due(self, clock: _Clock) -> bool:
        """Every ``checkpoint_every`` steps, else every ``checkpoint_seconds`` (as rank 0's
        clock says: every rank saves at the same step)."""
        every = self.s.checkpoint_every
        return self.store.path is not None and self.run_state.stop_reason is None and (
            (every is not None and self.run_state.step % every == 0)
            or (every is None and ddist.agree(clock.since_saved() >= self.checkpoint_seconds)))

    @contextmanager
    def _hooks(self):
        """The consumers' pre-hooks (base masks, capture) and hooks (output norms); removed, and
        the consumers reset, however the loop ends."""
        consumers = self.plan.consumers.values()
        handles = []
        for c in consumers:
            handles.append(c.module.register_forward_pre_hook(c.pre_hook))
            handles.append(c.module.register_forward_hook(c.post_hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for c in consumers:
                c.capture, c.calls, c.keep = False, [], None


class _Clock:
    """The search's seconds (``base`` from a resumed run plus this run's) and the time since
    the last checkpoint."""

    def __init__(self, base: float):
        self.base = base
        self.start = self.last_save = time.perf_counter()
        self.now = self.start

    def elapsed(self) -> float:
        return self.base + time.perf_counter() - self.start

    def since_saved(self) -> float:
        self.now = time.perf_counter()
        return self.now - self.last_save

    def saved(self) -> None:
        self.last_save = self.now
