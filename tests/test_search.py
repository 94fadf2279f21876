"""The AOFP binary search (aofp_ext.search) against the authors' rule, with scripted damages.

The reference below is the rule of ../shared/docs/aofp-method.md written the plain way (Python
sets and floats, one decision per half); LayerSearch must make the same moves on the same attempts.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from aofp_ext.search import (
    LayerSearch,
    default_iters_per_half,
    default_warmup_iters,
    start_steps,
)


class ReferenceLayer:
    """The authors' rule, plainly: base mask, search space, per-filter sums and counts. With
    ``parts``: the same rule in every part in lockstep (``h`` of each part's share of ``S``,
    ranked within the part, one threshold test over all of ``P``)."""

    def __init__(self, size: int, iters_per_half: int, thresh: float, start: int = 0,
                 parts: int = 1):
        self.alive = set(range(size))
        self.space = set(range(size))
        self.acc = {i: 0.0 for i in range(size)}
        self.cnt = {i: 0 for i in range(size)}
        self.iph, self.thresh, self.start, self.n = iters_per_half, thresh, start, 0
        self.parts, self.part = parts, size // parts

    def by_part(self, xs: set[int]) -> list[list[int]]:
        return [sorted(i for i in xs if i // self.part == j) for j in range(self.parts)]

    def h(self) -> int:
        return len(self.space) // self.parts // 2

    def g(self) -> int:
        return self.parts * self.h()

    def record(self, dropped: list[set[int]], t: list[float]) -> None:
        for d, v in zip(dropped, t):
            for i in d:
                self.acc[i] += v
                self.cnt[i] += 1

    def end_step(self) -> tuple[str, set[int]] | None:
        self.n += 1
        if self.n < self.iph:
            return None
        self.n = 0
        h = self.h()
        avg = {i: self.acc[i] / self.cnt[i] if self.cnt[i] else math.inf for i in self.space}
        p = set()
        for members in self.by_part(self.space):
            p |= set(sorted(members, key=lambda i: (avg[i], i))[:h])
        worst = max(avg[i] for i in p)
        self.acc = {i: 0.0 for i in self.acc}
        self.cnt = {i: 0 for i in self.cnt}
        if worst < self.thresh:
            self.alive -= p
            self.space = set(self.alive)
            return "prune", p
        if h > 1:
            self.space = p
            return "halve", p
        self.space = set(self.alive)
        return "reset", set()


def scripted_damage(weights: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """t of each attempt: the share of the total weight its zeroed filters carry."""
    return ((~masks).double() * weights.double()).sum(dim=1) / weights.double().sum()


def dropped_sets(masks: torch.Tensor, alive: set[int]) -> list[set[int]]:
    return [set((~row).nonzero().flatten().tolist()) - (set(range(masks.shape[1])) - alive)
            for row in masks]


# ---- drawing ----------------------------------------------------------------------------------


def test_draw_zeroes_the_base_mask_and_g_filters_of_the_space() -> None:
    s = LayerSearch("l", 10, start=0, iters_per_half=1, thresh=0.5)
    s.alive[[0, 1]] = False
    s.space = s.alive.clone()
    s.space[[2, 3]] = False              # S = {4..9}, g = 3
    masks = s.draw(200, torch.Generator().manual_seed(0))
    assert masks.shape == (200, 10) and masks.dtype == torch.bool
    assert not masks[:, :2].any()        # the base mask is in every attempt
    assert masks[:, 2:4].all()           # outside S: never drawn
    assert ((~masks[:, 4:]).sum(dim=1) == 3).all()
    counts = (~masks[:, 4:]).sum(dim=0).double()
    assert (counts - 100).abs().max() < 35  # uniform: each in S half the time


def test_draw_is_reproducible_and_layers_with_one_filter_are_done() -> None:
    s = LayerSearch("l", 7, start=0, iters_per_half=1, thresh=0.5)
    a = s.draw(5, torch.Generator().manual_seed(3))
    b = s.draw(5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    one = LayerSearch("one", 1, start=0, iters_per_half=1, thresh=0.5)
    assert one.g == 0 and not one.active(10)
    assert one.end_step(10) is None
    with pytest.raises(RuntimeError, match="one filter left"):
        one.draw(1, torch.Generator())


# ---- the three moves --------------------------------------------------------------------------


def run_half(s: LayerSearch, weights: torch.Tensor, k: int, steps: int, gen, step0: int = 0):
    move = None
    for i in range(steps):
        masks = s.draw(k, gen)
        s.record(masks, scripted_damage(weights, masks))
        move = s.end_step(step0 + i)
        if i < steps - 1:
            assert move is None
    return move


def test_halving_keeps_the_better_half() -> None:
    # 8 filters, damages well above thresh: S halves to the 4 lightest, then to the 2 lightest.
    w = torch.tensor([5.0, 1, 6, 2, 7, 3, 8, 4])
    s = LayerSearch("l", 8, start=0, iters_per_half=40, thresh=1e-3)
    gen = torch.Generator().manual_seed(0)
    move = run_half(s, w, 4, 40, gen)
    assert move.action == "halve" and move.space == 8
    assert s.space.nonzero().flatten().tolist() == [1, 3, 5, 7]
    assert s.alive.all() and s.acc.abs().sum() == 0 and s.cnt.sum() == 0
    move = run_half(s, w, 4, 40, gen, 40)
    assert move.action == "halve" and s.space.nonzero().flatten().tolist() == [1, 3]


def test_prune_below_thresh_then_reset_to_all_remaining() -> None:
    # Filters 0..3 are nearly free, 4..7 costly. Half 1 (S = all, g = 4): every attempt holds
    # costly filters, nothing passes thresh, S halves onto the cheap ones. Half 2 (g = 2): the
    # attempts zero cheap filters only, t << thresh: the 2 cheapest are pruned and S is reset.
    w = torch.tensor([1e-4, 2e-4, 3e-4, 4e-4, 1.0, 1.0, 1.0, 1.0])
    s = LayerSearch("l", 8, start=0, iters_per_half=60, thresh=0.2)
    gen = torch.Generator().manual_seed(1)
    move = run_half(s, w, 8, 60, gen)
    assert move.action == "halve" and move.worst > 0.2
    assert s.space.nonzero().flatten().tolist() == [0, 1, 2, 3]
    move = run_half(s, w, 8, 60, gen, 60)
    assert move.action == "prune" and move.pruned == [0, 1] and move.space == 4
    assert move.worst < 0.2 and move.width == 6
    assert s.alive.tolist() == [False, False] + [True] * 6
    assert torch.equal(s.space, s.alive)


def test_prune_exact_scripted_half() -> None:
    # Script the damages directly: filters 2 and 5 cost nothing, the rest a lot.
    s = LayerSearch("l", 4, start=0, iters_per_half=1, thresh=0.01)
    s.alive[[1]] = False
    s.space = s.alive.clone()            # S = {0, 2, 3}, g = 1
    masks = torch.ones(3, 4, dtype=torch.bool)
    masks[:, 1] = False
    masks[0, 0] = masks[1, 2] = masks[2, 3] = False
    s.record(masks, torch.tensor([0.5, 0.001, 0.3]))
    move = s.end_step(0)
    assert move.action == "prune" and move.pruned == [2] and move.space == 3
    assert s.alive.tolist() == [True, False, False, True]
    assert torch.equal(s.space, s.alive) and s.width == 2


def test_reset_when_g_is_one_and_nothing_passes() -> None:
    s = LayerSearch("l", 6, start=0, iters_per_half=1, thresh=0.01)
    s.space[:] = False
    s.space[[1, 4]] = True               # |S| = 2, g = 1
    masks = torch.ones(2, 6, dtype=torch.bool)
    masks[0, 1] = masks[1, 4] = False
    s.record(masks, torch.tensor([0.2, 0.3]))
    move = s.end_step(0)
    assert move.action == "reset" and move.worst == pytest.approx(0.2)
    assert s.space.all() and s.alive.all()


def test_never_drawn_filters_count_as_very_large() -> None:
    # |S| = 6, g = 3, but the only attempt zeroes filters 0 and 1 (t = 0): P = {0, 1, x} with x
    # never drawn, so max avg(P) = inf, nothing is pruned, and S halves to P.
    s = LayerSearch("l", 6, start=0, iters_per_half=1, thresh=0.5)
    masks = torch.ones(1, 6, dtype=torch.bool)
    masks[0, :2] = False
    s.record(masks, torch.tensor([0.0]))
    assert math.isinf(s.averages()[3])
    move = s.end_step(0)
    assert move.action == "halve" and math.isinf(move.worst)
    assert s.space.nonzero().flatten().tolist() == [0, 1, 2]   # ties among inf: lowest index
    assert move.as_dict()["worst"] is None and move.as_dict()["g"] == 3


def test_record_checks_shapes_and_finite_damage() -> None:
    s = LayerSearch("l", 4, start=0, iters_per_half=1, thresh=0.5)
    with pytest.raises(ValueError, match=r"masks must be \(k, 4\)"):
        s.record(torch.ones(2, 3, dtype=torch.bool), torch.zeros(2))
    with pytest.raises(ValueError, match="non-finite"):
        s.record(torch.ones(1, 4, dtype=torch.bool), torch.tensor([float("nan")]))


# ---- staggered starts -------------------------------------------------------------------------


def test_staggered_starts_match_the_authors_settings() -> None:
    # ResNet-56 (27 targets), VGG-16 (13), LeNet-5 (2): warmup + (iph // n) * j exactly.
    for n, iph in ((27, 1000), (13, 1000), (2, 400)):
        assert start_steps(n, iph, 500) == [500 + (iph // n) * j for j in range(n)]
    # iph < n (K = 64: 16 steps per half, 27 layers): still spread over one half
    s = start_steps(27, 16, 8)
    assert s[0] == 8 and s[-1] == 8 + (16 * 26) // 27 and s == sorted(s)
    assert default_iters_per_half(1) == 1000 and default_iters_per_half(64) == 16
    assert default_warmup_iters(1) == 500 and default_warmup_iters(64) == 8


def test_a_layer_waits_for_its_start() -> None:
    s = LayerSearch("l", 4, start=5, iters_per_half=2, thresh=0.5)
    assert not s.active(4) and s.active(5)
    for step in range(5):
        assert s.end_step(step) is None
    assert s.steps_in_half == 0
    gen = torch.Generator().manual_seed(0)
    w = torch.ones(4)
    for step in (5, 6):
        m = s.draw(2, gen)
        s.record(m, scripted_damage(w, m))
        move = s.end_step(step)
    assert move is not None and move.step == 6


# ---- against the reference, many random scripted runs ----------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_same_moves_as_the_reference_rule(seed: int) -> None:
    rnd = random.Random(seed)
    size, k, iph = rnd.randint(2, 24), rnd.choice([1, 3, 16]), rnd.randint(1, 6)
    thresh = rnd.choice([0.05, 0.2, 0.4])
    weights = torch.tensor([rnd.random() ** 3 for _ in range(size)])
    noise = torch.Generator().manual_seed(seed)
    s = LayerSearch("l", size, start=0, iters_per_half=iph, thresh=thresh)
    ref = ReferenceLayer(size, iph, thresh)
    gen = torch.Generator().manual_seed(seed)
    moves = 0
    for step in range(300):
        if not s.active(step):
            assert ref.g() == 0
            break
        move = _step_both(s, ref, s.draw(k, gen), weights, noise, step)
        moves += move is not None
    assert moves > 0


def _step_both(s: LayerSearch, ref: ReferenceLayer, masks: torch.Tensor, weights: torch.Tensor,
               noise: torch.Generator, step: int):
    """One step of the search and of the reference on the same noisy scripted damages; the same
    move (action, pruned filters), alive set and search space. Returns the move."""
    k = masks.shape[0]
    t = scripted_damage(weights, masks) * (1 + 0.1 * torch.rand(k, generator=noise,
                                                                 dtype=torch.float64))
    s.record(masks, t)
    ref.record(dropped_sets(masks, ref.alive), t.tolist())
    move, expect = s.end_step(step), ref.end_step()
    assert (move is None) == (expect is None)
    if move is not None:
        assert move.action == expect[0]
        if move.action == "prune":
            assert set(move.pruned) == expect[1]
    assert set(s.alive.nonzero().flatten().tolist()) == ref.alive
    assert set(s.space.nonzero().flatten().tolist()) == ref.space
    return move


def test_state_dict_round_trip_continues_identically() -> None:
    w = torch.rand(12, generator=torch.Generator().manual_seed(0))
    a = LayerSearch("l", 12, start=0, iters_per_half=3, thresh=0.3)
    gen_a = torch.Generator().manual_seed(1)
    for step in range(7):
        m = a.draw(4, gen_a)
        a.record(m, scripted_damage(w, m))
        a.end_step(step)
    b = LayerSearch("l", 12, start=0, iters_per_half=3, thresh=0.3)
    b.load_state_dict(a.state_dict())
    gen_b = torch.Generator()
    gen_b.set_state(gen_a.get_state())
    for step in range(7, 40):
        outs = []
        for s, g in ((a, gen_a), (b, gen_b)):
            if not s.active(step):
                outs.append(None)
                continue
            m = s.draw(4, g)
            s.record(m, scripted_damage(w, m))
            outs.append(s.end_step(step))
        assert outs[0] == outs[1]
    assert torch.equal(a.alive, b.alive) and torch.equal(a.acc, b.acc)
    with pytest.raises(ValueError, match="iters_per_half"):
        LayerSearch("l", 12, start=0, iters_per_half=4, thresh=0.3).load_state_dict(a.state_dict())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="size"):
        LayerSearch("l", 0, start=0, iters_per_half=1, thresh=0.1)
    with pytest.raises(ValueError, match="iters_per_half"):
        LayerSearch("l", 3, start=0, iters_per_half=0, thresh=0.1)
    with pytest.raises(ValueError, match="thresh"):
        LayerSearch("l", 3, start=0, iters_per_half=1, thresh=float("nan"))
    with pytest.raises(ValueError, match="masks_per_step"):
        default_iters_per_half(0)
    with pytest.raises(ValueError, match="parts"):
        LayerSearch("l", 3, start=0, iters_per_half=1, thresh=0.1, parts=0)
    with pytest.raises(ValueError, match="parts=2 does not divide size=9"):
        LayerSearch("l", 9, start=0, iters_per_half=1, thresh=0.1, parts=2)


# ---- parts: equal counts in equal parts (grouped convs, chunk) --------------------------------


def counts_per_part(mask: torch.Tensor, parts: int) -> list[int]:
    return mask.view(parts, -1).sum(dim=1).tolist()


def test_one_part_draws_exactly_as_the_rule_without_parts() -> None:
    # the draw before parts existed: g = |S| // 2 indices of S by one argsort of k x |S| uniforms;
    # parts=1 must consume the generator the same way and zero the same filters
    rnd = random.Random(0)
    for trial in range(40):
        size, k = rnd.randint(2, 40), rnd.choice([1, 2, 7, 64])
        s = LayerSearch("l", size, start=0, iters_per_half=1, thresh=0.1)
        s.alive[rnd.sample(range(size), rnd.randint(0, size - 2))] = False
        s.space = s.alive.clone()
        alive_idx = s.alive.nonzero().flatten().tolist()
        s.space[rnd.sample(alive_idx, rnd.randint(0, len(alive_idx) - 2))] = False
        gen, ref_gen = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
        got = s.draw(k, gen)
        idx = s.space.nonzero().flatten()
        order = torch.rand(k, idx.numel(), generator=ref_gen).argsort(dim=1)[:, :idx.numel() // 2]
        want = s.alive.expand(k, size).clone()
        want.scatter_(1, idx[order], False)
        assert torch.equal(got, want)
        assert torch.equal(gen.get_state(), ref_gen.get_state())


def test_draw_with_parts_zeroes_h_filters_of_each_part_uniformly() -> None:
    s = LayerSearch("l", 15, start=0, iters_per_half=1, thresh=0.5, parts=3)   # parts of 5
    s.alive[[0, 5, 10]] = False          # 4 alive per part
    s.space = s.alive.clone()
    s.space[[1, 6, 11]] = False          # S: 3 per part, h = 1, g = 3
    assert (s.h, s.g) == (1, 3)
    masks = s.draw(3000, torch.Generator().manual_seed(0))
    assert not masks[:, [0, 5, 10]].any() and masks[:, [1, 6, 11]].all()
    zeroed = ~masks & s.space
    assert (zeroed.view(3000, 3, 5).sum(dim=2) == 1).all()   # h = 1 in every part, every attempt
    freq = zeroed.sum(dim=0)[s.space].double() / 3000
    assert (freq - 1 / 3).abs().max() < 0.04                  # uniform within each part


@pytest.mark.parametrize("seed", range(8))
def test_same_moves_as_the_reference_rule_with_parts(seed: int) -> None:
    rnd = random.Random(100 + seed)
    parts, part = rnd.choice([2, 3, 4]), rnd.randint(2, 9)    # odd part sizes included
    size, k, iph = parts * part, rnd.choice([1, 3, 16]), rnd.randint(1, 4)
    thresh = rnd.choice([0.05, 0.2, 0.4])
    weights = torch.tensor([rnd.random() ** 3 for _ in range(size)])
    noise = torch.Generator().manual_seed(seed)
    s = LayerSearch("l", size, start=0, iters_per_half=iph, thresh=thresh, parts=parts)
    ref = ReferenceLayer(size, iph, thresh, parts=parts)
    gen = torch.Generator().manual_seed(seed)
    decided = []
    for step in range(300):
        if not s.active(step):
            assert ref.g() == 0
            break
        assert s.g == ref.g() == parts * s.h
        masks = s.draw(k, gen)
        assert ((~masks & s.space).view(k, parts, part).sum(dim=2) == s.h).all()
        move = _step_both(s, ref, masks, weights, noise, step)
        if move is not None:
            decided.append(move.action)
            assert move.parts == parts
            if move.action == "prune":
                assert len(set(counts_per_part(~s.alive, parts))) == 1
        assert len(set(counts_per_part(s.alive, parts))) == 1    # equal counts kept per part
        assert len(set(counts_per_part(s.space, parts))) == 1
    assert "prune" in decided


def test_parts_prune_down_to_one_filter_per_part() -> None:
    # every attempt is free (t = 0 < thresh): each half prunes h of every part, down to one each
    s = LayerSearch("l", 21, start=0, iters_per_half=1, thresh=1.0, parts=3)    # parts of 7
    gen, widths = torch.Generator().manual_seed(0), []
    step = 0
    while s.active(step):
        masks = s.draw(2, gen)
        s.record(masks, torch.zeros(2, dtype=torch.float64))
        move = s.end_step(step)
        assert move.action == "prune" and len(move.pruned) == move.as_dict()["g"]
        widths.append(move.width)
        step += 1
    assert widths == [12, 6, 3]                 # per part 7 -> 4 -> 2 -> 1
    assert counts_per_part(s.alive, 3) == [1, 1, 1] and s.g == 0
    with pytest.raises(RuntimeError, match="one filter left per part"):
        s.draw(1, gen)


def test_parts_threshold_is_over_the_whole_of_p() -> None:
    # part 0's lightest filter is free, part 1's both cost: P = {0, 2} (one per part); its worst
    # average (filter 2) is above thresh, so nothing is pruned although filter 0 alone would pass
    s = LayerSearch("l", 4, start=0, iters_per_half=1, thresh=0.1, parts=2)
    masks = torch.ones(4, 4, dtype=torch.bool)
    for row, (a, b) in enumerate([(0, 2), (1, 3), (0, 3), (1, 2)]):
        masks[row, [a, b]] = False
    s.record(masks, torch.tensor([0.2, 0.9, 0.5, 0.6], dtype=torch.float64))
    # averages: 0: 0.35, 1: 0.75, 2: 0.4, 3: 0.7
    move = s.end_step(0)
    assert move.action == "reset" and move.worst == pytest.approx(0.4) and s.alive.all()
    s.record(masks, torch.tensor([0.02, 0.9, 0.05, 0.6], dtype=torch.float64))
    # averages: 0: 0.035, 1: 0.75, 2: 0.31, 3: 0.475 -> P = {0, 2}, worst 0.31: still no
    assert s.end_step(1).action == "reset"
    s.record(masks, torch.tensor([0.02, 0.9, 0.05, 0.08], dtype=torch.float64))
    # averages: 0: 0.035, 1: 0.49, 2: 0.05, 3: 0.475 -> P = {0, 2}, worst 0.05 < 0.1: prune
    move = s.end_step(2)
    assert move.action == "prune" and move.pruned == [0, 2] and move.as_dict()["g"] == 2
    assert s.alive.tolist() == [False, True, False, True]


def test_parts_state_dict_round_trip_and_checks() -> None:
    w = torch.rand(12, generator=torch.Generator().manual_seed(0))
    a = LayerSearch("l", 12, start=0, iters_per_half=2, thresh=0.3, parts=3)
    gen_a = torch.Generator().manual_seed(1)
    for step in range(5):
        m = a.draw(4, gen_a)
        a.record(m, scripted_damage(w, m))
        a.end_step(step)
    b = LayerSearch("l", 12, start=0, iters_per_half=2, thresh=0.3, parts=3)
    b.load_state_dict(a.state_dict())
    gen_b = torch.Generator()
    gen_b.set_state(gen_a.get_state())
    for step in range(5, 20):
        if not a.active(step):
            break
        ma, mb = a.draw(4, gen_a), b.draw(4, gen_b)
        assert torch.equal(ma, mb)
        for s, m in ((a, ma), (b, mb)):
            s.record(m, scripted_damage(w, m))
        assert a.end_step(step) == b.end_step(step)
    with pytest.raises(ValueError, match="parts=3, this search 2"):
        LayerSearch("l", 12, start=0, iters_per_half=2, thresh=0.3,
                    parts=2).load_state_dict(a.state_dict())
    one = LayerSearch("l", 12, start=0, iters_per_half=2, thresh=0.3)
    old = one.state_dict()
    del old["parts"]                            # a checkpoint written before parts existed
    LayerSearch("l", 12, start=0, iters_per_half=2, thresh=0.3).load_state_dict(old)
    broken = a.state_dict()
    broken["space"] = torch.ones(12, dtype=torch.bool)
    broken["space"][[0, 1]] = False             # 2, 4, 4 in the parts: not a valid state
    b.load_state_dict(broken)
    with pytest.raises(RuntimeError, match="same number of filters in each of its 3 parts"):
        b.draw(1, gen_b)
