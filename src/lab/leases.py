"""Who may use which worker right now: the pool's new experiments, and confirmation runs that borrow a second one.

A worker's slot (its device, runner and worktree) runs one thing at a time. The pool hands a free worker
to a new experiment; an experiment that must run two things at once (the paired confirmation: the
best and the candidate side by side) borrows a second worker, and borrowers go first: while one waits,
the pool starts no new experiment. A worker whose experiment is blocked waiting for the advance lock
(a would-be keep queued behind another's confirmation) runs nothing, so it may be borrowed too; its
experiment takes it back before it runs anything again. Borrowers hold the advance lock, and every
lent worker comes back before that lock is released, so a worker waiting for it is never still lent
when its experiment gets it. A pool of one has nothing to lend: its pairs run back to back.

Usage: leases = Leases(workers); w = leases.take(prefer); leases.release(w)        (the pool)
       with leases.borrow(owner) as other: ...     (other: a Worker, or None when there is none to lend)
       with leases.waiting(w): lock.acquire()     (w may be lent while its experiment waits)
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:
    from src.lab.workers import Worker


class Leases:
    def __init__(self, workers: list["Worker"]):
        self.workers = list(workers)
        self.cond = threading.Condition()
        self.free: list["Worker"] = list(workers)  # no experiment on it
        self.idle: set[int] = set()  # id(worker): its experiment waits (for the advance lock); lendable
        self.lent: dict[int, bool] = {}  # id(worker) -> it was free when lent (it goes back to the free list)
        self.wanted = 0  # borrowers waiting: no new experiment starts meanwhile
        self.closed = False

    def take(self, prefer: Optional[int] = None) -> Optional["Worker"]:
        """A free worker for a new experiment (worker index `prefer` if free), or None (none free, or a borrower
        waits and goes first)."""
        with self.cond:
            if not self.free or self.wanted:
                return None
            w = next((x for x in self.free if prefer is not None and x.index == prefer), self.free[0])
            self.free.remove(w)
            return w

    def release(self, w: "Worker") -> None:
        """w's experiment is over: it is free."""
        with self.cond:
            self.free.append(w)
            self.cond.notify_all()

    def close(self) -> None:
        """The pool stops: borrowers stop waiting (their pairs run back to back on their own worker)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    @contextmanager
    def borrow(self, owner: "Worker") -> Iterator[Optional["Worker"]]:
        """A second worker beside `owner` for as long as the block runs; None when the pool has no other worker
        (a pool of one) or stops while waiting."""
        others = [w for w in self.workers if w is not owner]
        if not others:
            yield None
            return
        with self.cond:
            self.wanted += 1
            try:
                while True:
                    w = next((x for x in self.free if x is not owner), None) or \
                        next((x for x in others if id(x) in self.idle and id(x) not in self.lent), None)
                    if w is not None or self.closed:
                        break
                    self.cond.wait(timeout=1.0)
            finally:
                self.wanted -= 1
            if w is not None:
                was_free = w in self.free
                if was_free:
                    self.free.remove(w)
                self.lent[id(w)] = was_free
        try:
            yield w
        finally:
            if w is not None:
                with self.cond:
                    if self.lent.pop(id(w)):
                        self.free.append(w)
                    self.cond.notify_all()

    @contextmanager
    def waiting(self, w: "Worker") -> Iterator[None]:
        """w's experiment blocks inside this block: w may be lent meanwhile; on the way out, w is back."""
        with self.cond:
            self.idle.add(id(w))
            self.cond.notify_all()
        try:
            yield
        finally:
            with self.cond:
                self.idle.discard(id(w))
                while id(w) in self.lent:
                    self.cond.wait(timeout=1.0)
