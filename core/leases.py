"""Leases: which worker does what, when several daemons share one database.

Several ``scaiwave serve`` processes (*workers*) with one server name, key
and database serve any request; some work must still be done by one of them
at a time:

- delivery to a peer (``peer:<server>``): one transaction in flight per peer,
  in queue order, is only possible if one worker sends to that peer;
- the singleton jobs (``job:timers``: the yearly key rotation and the
  expiry of the shared replay window);
- a pull of a room (``pull:<room_id>``: a catch-up or an admin's backfill),
  so that a gap seen by two workers is filled once.

Each is a *lease*: a row ``(name, owner, expires_at)`` in the shared
database. A worker holds a lease from a successful conditional write until
``expires_at`` (minus a safety margin); it renews what it holds every third
of the lease's length. A worker that dies stops renewing: once its leases
expire, any other worker takes them over (*failover*). No advisory lock and
no server clock are needed: the conditional writes are plain portable SQL
(see ``shell/store/lease_rows.py``), and time is each worker's clock passed
in as integer milliseconds (clocks must agree to well within the margin;
NTP does).

:class:`Leases` is one worker's machine, driven the quinn-proto way:

- :meth:`Leases.want` ``(names, now)`` -- the work this worker sees (peers
  with queued items, say): returns the :class:`Claim` effects to try;
- :meth:`Leases.handle_claim` -- the outcome of a claim (taken or not, and
  the row that holds it);
- :meth:`Leases.poll_timeout` / :meth:`Leases.handle_timeout` -- when to
  renew, and the :class:`Renew` to carry out;
- :meth:`Leases.handle_renewed` -- the lease table as read after a renewal:
  what we still hold, what others hold;
- :meth:`Leases.release` -- give a lease up (:class:`Release`: a finished
  pull, a clean shutdown);
- :meth:`Leases.holds` -- whether this worker may do the work now.

Rules, all here:

- **One holder.** A claim is written only if the lease is free, stale
  (``expires_at <= now``: its holder is presumed dead) or already ours; a
  renewal only where we are still the owner. So two workers never both
  believe they hold a lease at one time, as long as their clocks agree to
  within :attr:`Leases.margin_ms`: a holder stops doing the work
  ``margin_ms`` before its lease expires unless it renewed first.
- **No lost work.** A lease whose holder stopped renewing is stale after at
  most ``lease_ms``; the next worker that wants it takes it.
- **Spread.** A worker takes a wanted lease at once while it holds fewer
  than its share (wanted names over live workers, rounded up; a worker is
  live while its ``worker:<owner>`` lease is); past its share it leaves the
  lease to a worker with room, unless nobody took it within
  :attr:`Leases.grace_ms` (no name waits for ever). A worker holding more
  than its share while another holds less gives the difference up
  (:meth:`Leases.surplus`): a worker that starts later gets its share.
"""

from __future__ import annotations

from dataclasses import dataclass

from .codes import LocalProtocolError

__all__ = [
    "Claim",
    "LeaseRow",
    "Leases",
    "Release",
    "Renew",
    "TIMERS",
    "DEFAULT_LEASE_MS",
    "peer_lease",
    "pull_lease",
    "worker_lease",
]

#: A lease lasts this long without a renewal (10 s): a dead worker's peers go
#: to another worker within it. Short enough for a quick failover, long
#: enough that a worker busy for a few seconds (a long fsync) keeps its work.
DEFAULT_LEASE_MS = 10_000

#: The singleton jobs' lease: the yearly key rotation, the replay window's expiry.
TIMERS = "job:timers"


def peer_lease(peer: str) -> str:
    """The lease of delivery to ``peer``."""
    return f"peer:{peer}"


def pull_lease(room_id: str) -> str:
    """The lease of a pull (catch-up or backfill) of ``room_id``."""
    return f"pull:{room_id}"


def worker_lease(owner: str) -> str:
    """The lease that says worker ``owner`` is alive (held for its lifetime)."""
    return f"worker:{owner}"


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """One row of the shared lease table."""

    name: str
    owner: str
    expires_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    """Take ``name`` for ``owner`` until ``expires_at``, only if its row is
    missing, stale (``expires_at <= now``) or already ``owner``'s; then answer
    :meth:`Leases.handle_claim` with whether it was written."""

    name: str
    owner: str
    expires_at: int
    now: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Renew:
    """Set ``expires_at`` on every lease of ``owner`` named in ``names`` (only
    where ``owner`` still holds it), then read the whole table back for
    :meth:`Leases.handle_renewed`."""

    owner: str
    names: tuple[str, ...]
    expires_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """Delete lease ``name`` where ``owner`` holds it."""

    name: str
    owner: str


class Leases:
    """One worker's leases (see the module doc). ``owner``: this worker's
    unique id; ``lease_ms``: how long a lease lasts without renewal."""

    def __init__(self, owner: str, *, lease_ms: int = DEFAULT_LEASE_MS) -> None:
        if not owner or lease_ms < 3:
            raise LocalProtocolError("a worker needs an id and a lease of at least 3 ms")
        self.owner = owner
        self.lease_ms = lease_ms
        #: Renew this often; stop working this long before expiry without a renewal.
        self.renew_ms = lease_ms // 3
        self.margin_ms = lease_ms // 3
        #: A wanted name nobody took for this long is taken past one's share.
        self.grace_ms = lease_ms // 3
        self._held: dict[str, int] = {}  # name -> expires_at, as last written by us
        self._others: dict[str, LeaseRow] = {}  # other owners' rows, as last read
        self._waiting: dict[str, int] = {}  # wanted name -> when first seen free and not taken by us
        self._next_renew: int | None = None

    # -- questions -------------------------------------------------------------------

    def holds(self, name: str, now: int) -> bool:
        """Whether this worker may do ``name``'s work at ``now``."""
        expires = self._held.get(name)
        return expires is not None and now < expires - self.margin_ms

    def held(self) -> tuple[str, ...]:
        """Every lease this worker holds (or is renewing), sorted."""
        return tuple(sorted(self._held))

    def holder(self, name: str, now: int) -> str | None:
        """Who holds ``name`` at ``now`` as far as this worker knows (None: nobody live)."""
        if self.holds(name, now):
            return self.owner
        row = self._others.get(name)
        return row.owner if row is not None and not self.stale(row, now) else None

    @staticmethod
    def stale(row: LeaseRow, now: int) -> bool:
        """Whether the holder of ``row`` is presumed dead at ``now``."""
        return row.expires_at <= now

    def live_workers(self, now: int) -> int:
        """Workers alive as far as this worker knows (itself included)."""
        others = {r.owner for r in self._others.values() if r.name.startswith("worker:") and not self.stale(r, now)}
        return len(others - {self.owner}) + 1

    # -- inputs and effects ----------------------------------------------------------

    def want(self, names: list[str] | tuple[str, ...] | set[str], now: int, *, spread: bool = True) -> list[Claim]:
        """The claims to try for ``names``, work this worker sees to be done.
        Names this worker holds, and names a live other worker holds, are not
        claimed. With ``spread``, at most this worker's share is claimed at once
        (see the module doc); a name left for others longer than ``grace_ms``
        is claimed anyway."""
        names = sorted(set(names))
        free = [n for n in names if n not in self._held and self.holder(n, now) is None]
        for name in list(self._waiting):
            if name not in free:
                del self._waiting[name]
        if not free:
            return []
        room = len(free)
        if spread:
            share = -(-len(names) // self.live_workers(now))
            mine = sum(1 for n in names if n in self._held)
            room = max(0, share - mine)
        claims = []
        for name in free:
            since = self._waiting.setdefault(name, now)
            if room > 0 or now - since >= self.grace_ms:
                room -= 1
                claims.append(self.claim(name, now))
        return claims

    def surplus(self, names: list[str] | tuple[str, ...] | set[str], now: int) -> list[str]:
        """Leases among ``names`` this worker should give up so that the live
        workers share them (a worker that started later, or came back, gets
        its share): those held beyond this worker's share, while some other
        live worker holds fewer than its share. Never one of them otherwise,
        so two workers never hand a lease back and forth."""
        names = sorted(set(names))
        live = self.live_workers(now)
        if live == 1 or not names:
            return []
        share = -(-len(names) // live)
        mine = [n for n in names if n in self._held]
        if len(mine) <= share:
            return []
        workers = {r.owner for r in self._others.values() if r.name.startswith("worker:") and not self.stale(r, now)}
        held = {owner: 0 for owner in workers - {self.owner}}
        wanted = set(names)
        for row in self._others.values():
            if row.name in wanted and row.owner in held and not self.stale(row, now):
                held[row.owner] += 1
        room = sum(max(0, share - count) for count in held.values())
        return mine[len(mine) - min(room, len(mine) - share):]

    def claim(self, name: str, now: int) -> Claim:
        """The claim of ``name`` (for a job this worker must run itself)."""
        return Claim(name=name, owner=self.owner, expires_at=now + self.lease_ms, now=now)

    def handle_claim(self, claim: Claim, taken: bool, row: LeaseRow | None) -> None:
        """The outcome of ``claim``: ``taken`` if the conditional write
        happened; ``row``: the lease's row as read after it (None: none)."""
        if claim.owner != self.owner:
            raise LocalProtocolError(f"claim of {claim.owner}, not {self.owner}")
        self._waiting.pop(claim.name, None)
        if taken:
            self._held[claim.name] = claim.expires_at
            self._others.pop(claim.name, None)
            if self._next_renew is None:
                self._next_renew = claim.now + self.renew_ms
            return
        self._held.pop(claim.name, None)
        if row is not None and row.owner != self.owner:
            self._others[claim.name] = row

    def poll_timeout(self) -> int | None:
        """When to call :meth:`handle_timeout` next (None: nothing is held)."""
        return self._next_renew if self._held else None

    def handle_timeout(self, now: int) -> Renew | None:
        """The renewal due at ``now``, if any."""
        if not self._held or self._next_renew is None or now < self._next_renew:
            return None
        return self.renewal(now)

    def renewal(self, now: int) -> Renew:
        """A renewal of everything held, due or not (a refresh of the table)."""
        return Renew(owner=self.owner, names=tuple(sorted(self._held)), expires_at=now + self.lease_ms)

    def handle_renewed(self, renew: Renew, rows: list[LeaseRow], now: int) -> tuple[str, ...]:
        """``rows``: the whole lease table as read after ``renew`` was carried
        out. Returns the names this worker no longer holds (lost to another
        worker, or released meanwhile): their work must stop."""
        table = {r.name: r for r in rows}
        lost = []
        for name in renew.names:
            row = table.get(name)
            if row is not None and row.owner == self.owner:
                self._held[name] = row.expires_at
            elif name in self._held:
                del self._held[name]
                lost.append(name)
        self._others = {n: r for n, r in table.items() if r.owner != self.owner}
        self._next_renew = now + self.renew_ms
        return tuple(lost)

    def observe(self, rows: list[LeaseRow]) -> None:
        """Other workers' rows as read (to know who holds what) without a renewal."""
        self._others = {r.name: r for r in rows if r.owner != self.owner}

    def release(self, name: str) -> Release | None:
        """Give ``name`` up (None if not held)."""
        if self._held.pop(name, None) is None:
            return None
        return Release(name=name, owner=self.owner)

    def release_all(self) -> list[Release]:
        """Give everything up (a clean shutdown: others take over at once)."""
        return [r for r in (self.release(n) for n in self.held()) if r is not None]
