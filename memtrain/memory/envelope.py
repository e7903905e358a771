"""The upper envelope of quadratics through three points: which of them can be the (first) maximum at some size.

A size model (:mod:`memtrain.memory.scaling`) holds, per phase, hundreds of events, each a
quadratic ``q(s)`` in the image side given by its values at three sizes; the phase's peak at
``s`` is the *first* event with the largest ``round(q(s))``. Most events are never that
maximum at any size of interest. :func:`envelope` finds the ones that can be, in exact
integer arithmetic, so that the rest can be dropped without changing any answer:

event ``j`` is dropped when every integer ``s ≥ lo`` is covered by some other event ``i``
that rules it out there: ``q_i(s) - q_j(s) > 1`` (then ``round(q_i) > round(q_j)``
whatever the rounding), or ``i`` comes first and ``q_i(s) ≥ q_j(s)`` (then ``j`` is never the
first maximum). A dropped event is thus never the first maximum at an integer ``s ≥ lo``,
and the first maximum over the kept events is the first maximum over all of them. Kept
are the events that come within one unit of the envelope somewhere on ``[lo, ∞)``.

Each rule is a quadratic inequality with integer coefficients (values × the common
denominator of the Lagrange basis); its integer solutions on ``[lo, ∞)`` are at most two
intervals, found from the integer square root and checked by evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Poly = tuple[int, int, int]  # (a, b, c): a·s² + b·s + c, over the common denominator of coefficients()
Interval = tuple[int, int | None]  # [low, high] of integers; high None: unbounded


def coefficients(values: Sequence[int], xs: Sequence[int]) -> tuple[Poly, int]:
    """Integer (a, b, c) and denominator D with ``(a s² + b s + c) / D`` the quadratic through ``(xs[k], values[k])``."""
    terms = []
    for k in range(3):
        x_a, x_b = (xs[m] for m in range(3) if m != k)
        terms.append(((xs[k] - x_a) * (xs[k] - x_b), x_a, x_b))
    denominator = math.lcm(*(abs(d) for d, _, _ in terms))
    a = b = c = 0
    for v, (d, x_a, x_b) in zip(values, terms):
        w = v * (denominator // d)
        a, b, c = a + w, b - w * (x_a + x_b), c + w * x_a * x_b
    return (a, b, c), denominator


def _value(p: Poly, s: int) -> int:
    return (p[0] * s + p[1]) * s + p[2]


def _first(pred, low: int, high: int) -> int:
    """The smallest integer in [low, high] where the monotone (False … True) ``pred`` holds; high + 1 if none."""
    while low <= high:
        mid = (low + high) // 2
        if pred(mid):
            high = mid - 1
        else:
            low = mid + 1
    return low


def nonnegative(p: Poly, lo: int) -> list[Interval]:
    """The integers ``s ≥ lo`` with ``p(s) ≥ 0``, as at most two sorted intervals (exact)."""
    a, b, c = p
    if a == 0 and b == 0:
        return [(lo, None)] if c >= 0 else []
    if a == 0:  # b·s + c ≥ 0
        if b > 0:
            return [(max(lo, -(c // b)), None)]  # s ≥ ceil(-c / b)
        high = c // -b  # s ≤ floor(c / -b)
        return [(lo, high)] if high >= lo else []
    disc = b * b - 4 * a * c
    if disc < 0:
        return [(lo, None)] if a > 0 else []
    q = p if a > 0 else (-a, -b, -c)  # upward: q decreases on integers ≤ m, increases from m + 1
    m = -q[1] // (2 * q[0])  # floor of the vertex
    root = math.isqrt(disc)
    # Floors of (-b ∓ isqrt(disc)) / 2a: within (ρ1 - 1, ρ1 + 1/2] and (ρ2 - 3/2, ρ2] of q's real roots ρ1 ≤ ρ2,
    # so q > 0 two steps beyond them: brackets for exact binary searches on each monotone side.
    r1, r2 = (-q[1] - root) // (2 * q[0]), (-q[1] + root) // (2 * q[0])
    out: list[Interval] = []
    if a > 0:  # p ≥ 0 on (-∞, left] ∪ [right, ∞)
        left = _first(lambda s: _value(q, s) < 0, min(m, r1 - 2), m) - 1
        right = _first(lambda s: _value(q, s) >= 0, m + 1, max(m + 1, r2 + 2))
        if left >= lo:
            out.append((lo, left))
        out.append((max(lo, right), None))
        return out
    # a < 0: p ≥ 0 ⇔ q ≤ 0, on [left, m] ∪ [m + 1, right] (either part may be empty)
    left = _first(lambda s: _value(q, s) <= 0, min(m, r1 - 2), m)
    right = _first(lambda s: _value(q, s) > 0, m + 1, max(m + 1, r2 + 2)) - 1
    low = left if left <= m else m + 1
    if right < low:
        return []
    low = max(low, lo)
    return [(low, right)] if right >= low else []


def _covers(intervals: list[Interval], lo: int) -> bool:
    """Whether the union of ``intervals`` holds every integer ≥ ``lo``."""
    reach = lo  # every integer in [lo, reach) is covered
    for low, high in sorted(intervals, key=lambda iv: iv[0]):
        if low > reach:
            return False
        if high is None:
            return True
        reach = max(reach, high + 1)
    return False


def envelope(polys: Sequence[Poly], denominator: int, lo: int) -> list[int]:
    """Indices (sorted) of the polynomials that can be the first maximum of ``round(p(s) / denominator)`` at an integer ``s ≥ lo``.

    A superset, exact in the sense of the module docstring: the first maximum over the
    returned ones equals the first maximum over all, at every integer ``s ≥ lo``.
    """
    n = len(polys)
    # Candidate rulers first: the maxima at a few sizes and as s → ∞ rule out most events alone.
    probes = [lo * 2**k for k in range(12)]
    leaders = {max(range(n), key=lambda i: (_value(polys[i], s), -i)) for s in probes}
    leaders.add(max(range(n), key=lambda i: (*polys[i], -i)))
    order = sorted(leaders) + sorted(set(range(n)) - leaders, key=lambda i: -_value(polys[i], lo))
    kept = []
    for j in range(n):
        pj = polys[j]
        intervals: list[Interval] = []
        for i in order:
            if i == j:
                continue
            pi = polys[i]
            diff = (pi[0] - pj[0], pi[1] - pj[1], pi[2] - pj[2] - (0 if i < j else denominator + 1))
            intervals += nonnegative(diff, lo)
            if _covers(intervals, lo):
                break
        else:
            kept.append(j)
    return kept
