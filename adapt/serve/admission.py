"""Per-tenant admission: a bounded queue per tenant, batches formed by weighted fair queuing over measured cost.

Each tenant has its own queue of at most `per_tenant` waiting requests; all queues together hold at most
`max_total`. A batch takes, one slot at a time, the head of the backlogged tenant that has been charged
the least compute (start-time fair queuing: a tenant that becomes backlogged starts no lower than the
charge of the last request picked, so idle time banks no credit). After a batch runs, its measured seconds are charged
to its tenants: all of it to the one tenant of a single-tenant batch, and in proportion to the tenants'
recent seconds per request in a mixed one. A tenant whose requests cost ten times more therefore gets a
tenth of the slots while others wait, and a light tenant is never queued behind a heavy one's backlog.

Two rules bound how long a light user waits behind a flood. While a light user (a tenant active in the last
30 s with at most one request waiting) is about, the requests of backlogged tenants in one batch cost at most
one of its requests (one backlogged request at least); among backlogged tenants only, at most a full batch of
the lightest. So the batch in progress when a light request arrives is short. And a batch runs as several passes (`runs`): first
the requests of tenants with nothing more waiting, then those of tenants with a backlog, each part by cost
classes (a tenant whose requests cost more than twice the cheapest of the class runs after it), so a light
user's request never waits for a flooding tenant's share of its own batch.

Refusals fall on the tenant over its share: a full tenant queue refuses that tenant (TenantOverShare,
HTTP 429); when all queues together are full, the newest request of the tenant holding the most is
pushed out to make room for a tenant holding fewer, and only when no tenant holds more than the caller
is the caller refused as server-wide overload (QueueFull, HTTP 503). Hand-written because the
scheduler must see tenants and measured batch costs, which no queue library models.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")

# Weight of the newest batch in a tenant's moving average of seconds per request.
_COST_SMOOTHING = 0.2
# A tenant that queued a request this recently counts as active: batches are kept short enough for it.
_ACTIVE_S = 30.0
# Tenants whose requests cost within this factor of the cheapest of a class share its pass.
_CLASS_RATIO = 2.0


class QueueFull(RuntimeError):
    """Every tenant holds its share of a full queue (HTTP 503 with Retry-After)."""

    def __init__(self, depth: int, retry_after_s: int, message: str | None = None):
        super().__init__(message or f"the server is at capacity ({depth} requests queued); "
                                    f"retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class TenantOverShare(QueueFull):
    """This tenant already has its share of the queue waiting (HTTP 429 with Retry-After)."""


@dataclass
class _Tenant(Generic[Item]):
    waiting: deque = field(default_factory=deque)  # (arrival number, item), oldest first
    charged: float = 0.0  # compute seconds charged so far: the fair-queuing clock
    cost: float = 0.0  # moving average of seconds per request; 0 until measured
    last_put: float = 0.0  # time.monotonic() of its latest request


class FairQueue(Generic[Item]):
    """Bounded per-tenant queues and a fair batch picker (thread-safe)."""

    def __init__(self, max_total: int, per_tenant: int):
        if max_total < 1 or per_tenant < 1:
            raise ValueError(f"FairQueue: max_total={max_total} and per_tenant={per_tenant} must be at least 1")
        self.max_total, self.per_tenant = max_total, per_tenant
        self._tenants: dict[str, _Tenant] = {}
        self._total = 0
        self._arrivals = 0
        self._clock = 0.0  # the charge level of the latest pick: where a newly backlogged tenant starts
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return self._total

    def waiting(self, tenant: str) -> int:
        entry = self._tenants.get(tenant)
        return len(entry.waiting) if entry else 0

    # ---------------------------------------------------------------------------------------------- admit

    def check(self, tenant: str) -> None:
        """Raise now what `put` would raise for `tenant` (lets the caller refuse before decoding an image)."""
        with self._changed:
            self._refusal(tenant, self._longest_other(tenant))

    def put(self, tenant: str, item: Item) -> Item | None:
        """Queue `item` for `tenant`; returns the item pushed out to make room (the caller refuses it), if any.

        Raises:
            TenantOverShare: `tenant` already has `per_tenant` requests waiting, or holds the most of a full queue.
            QueueFull: the queue is full and every tenant holds as many as `tenant`.
        """
        with self._changed:
            victim = self._longest_other(tenant)
            self._refusal(tenant, victim)
            pushed = None
            if self._total >= self.max_total:
                _, pushed = self._tenants[victim].waiting.pop()  # its newest: the oldest keep their place
                self._total -= 1
            entry = self._tenants.setdefault(tenant, _Tenant())
            if not entry.waiting:  # newly backlogged: no credit banked while idle
                entry.charged = max(entry.charged, self._clock)
            self._arrivals += 1
            entry.last_put = time.monotonic()
            entry.waiting.append((self._arrivals, item))
            self._total += 1
            self._changed.notify()
            return pushed

    def _longest_other(self, tenant: str) -> str | None:
        others = [(len(t.waiting), name) for name, t in self._tenants.items() if name != tenant and t.waiting]
        return max(others)[1] if others else None

    def _refusal(self, tenant: str, victim: str | None) -> None:
        mine = self.waiting(tenant)
        full = self._total >= self.max_total
        if mine < self.per_tenant and not (full and (victim is None or self.waiting(victim) <= mine + 1)):
            return
        wait = self.retry_after(tenant)
        if mine >= self.per_tenant:
            raise TenantOverShare(self._total, wait, f"this tenant already has {mine} requests waiting, its share of "
                                  f"the queue (at most {self.per_tenant} per tenant); retry in {wait} s")
        if mine:
            raise TenantOverShare(self._total, wait, f"the queue is full ({self._total} requests) and this tenant "
                                  f"holds {mine} of them, no fewer than any other tenant; retry in {wait} s")
        raise QueueFull(self._total, wait)

    def retry_after(self, tenant: str) -> int:
        """Seconds until `tenant` has likely been served one share: its waiting requests at its cost, times the
        number of tenants it shares the machine with."""
        entry = self._tenants.get(tenant)
        costs = [t.cost for t in self._tenants.values() if t.cost]
        cost = (entry.cost if entry and entry.cost else None) or (sum(costs) / len(costs) if costs else 0.1)
        backlogged = max(1, sum(1 for t in self._tenants.values() if t.waiting))
        return max(1, math.ceil((self.waiting(tenant) + 1) * cost * backlogged))

    # --------------------------------------------------------------------------------------------- batch

    def take(self, max_items: int, window_s: float, poll_s: float = 0.05) -> list[tuple[str, Item]]:
        """Wait up to `poll_s` for a first request, then up to `window_s` for company (or `max_items` in all),
        and return up to `max_items` (tenant, item) pairs in fair order; [] when nothing arrived."""
        with self._changed:
            if not self._total and not self._changed.wait_for(lambda: self._total > 0, poll_s):
                return []
            end = time.monotonic() + window_s
            while self._total < max_items and (remaining := end - time.monotonic()) > 0:
                self._changed.wait(remaining)
            return self._pick(max_items)

    def _pick(self, max_items: int) -> list[tuple[str, Item]]:
        clock = {name: t.charged for name, t in self._tenants.items() if t.waiting}
        known = [t.cost for t in self._tenants.values() if t.cost]
        default_cost = sum(known) / len(known) if known else 1.0
        recent = time.monotonic() - _ACTIVE_S
        active = [t for t in self._tenants.values() if t.cost and (t.waiting or t.last_put > recent)]
        light = [t.cost for t in active if len(t.waiting) <= 1]
        # With a light user about, a backlog's part of a batch costs one of its requests, so it waits little;
        # among backlogs only, a full batch of the lightest of them.
        budget = min(light) if light else max_items * min(t.cost for t in active) if active else math.inf
        picked, backlog_cost = [], 0.0
        while clock and len(picked) < max_items:
            # least charged first; on a tie, the tenant whose head request arrived first
            name = min(clock, key=lambda n: (clock[n], self._tenants[n].waiting[0][0]))
            entry = self._tenants[name]
            cost = entry.cost or default_cost
            if len(entry.waiting) > 1:  # a backlogged tenant: its part of the batch is bounded
                if backlog_cost and backlog_cost + cost > budget:
                    del clock[name]  # its turn comes first in a later batch
                    continue
                backlog_cost += cost
            picked.append((name, entry.waiting.popleft()[1]))
            self._total -= 1
            clock[name] += cost  # tentative: the measured charge follows the batch
            self._clock = max(self._clock, clock[name])
            if not entry.waiting:
                del clock[name]
        return picked

    def runs(self, picked: list[tuple[str, Item]]) -> list[list[tuple[str, Item]]]:
        """Split a picked batch into the passes to run, in order: the tenants with nothing more waiting (light
        users) before those with a backlog, and within each, cost classes, cheapest first (a tenant whose
        requests cost more than twice the cheapest of the class starts the next one; unmeasured tenants join
        the cheapest). A batch without both kinds and of one class stays one pass."""
        with self._changed:
            backlogged = {name for name, _ in picked if self.waiting(name)}
            cost = {name: self._tenants[name].cost if name in self._tenants else 0.0 for name, _ in picked}
        classes: list[list[tuple[str, Item]]] = []
        for group in ([n for n in cost if n not in backlogged], [n for n in cost if n in backlogged]):
            floor, first = 0.0, True
            for name in sorted(group, key=cost.get):
                if first or (floor and cost[name] > _CLASS_RATIO * floor):
                    classes.append([])
                    floor, first = cost[name], False
                floor = floor or cost[name]
                classes[-1] += [pair for pair in picked if pair[0] == name]
        return classes

    def charge(self, counts: dict[str, int], seconds: float) -> dict[str, float]:
        """Charge a batch's measured `seconds` to its tenants (`counts`: requests per tenant); returns the split."""
        with self._changed:
            entries = {name: self._tenants.setdefault(name, _Tenant()) for name in counts}
            known = [e.cost for e in entries.values() if e.cost]
            guess = sum(known) / len(known) if known else 1.0
            weights = {name: counts[name] * (entry.cost or guess) for name, entry in entries.items()}
            total = sum(weights.values()) or 1.0
            split = {name: seconds * weight / total for name, weight in weights.items()}
            for name, entry in entries.items():
                per_request = split[name] / counts[name]
                entry.charged += split[name]
                entry.cost = per_request if not entry.cost else \
                    (1 - _COST_SMOOTHING) * entry.cost + _COST_SMOOTHING * per_request
            return split

    def drain(self) -> list[Item]:
        """Remove and return every waiting item (shutdown)."""
        with self._changed:
            items = [item for t in self._tenants.values() for _, item in t.waiting]
            for t in self._tenants.values():
                t.waiting.clear()
            self._total = 0
            return items
