"""Readers that appear at run time (``pcsc:*``), each given to one VM.

A :class:`~ccidemu.card.ReaderSet` reports the host readers it has (those present at start,
then each one plugged in later).  The :class:`ReaderPool` of that set (one per set spec, for
the whole daemon) gives each reader to exactly one of the VMs whose cards name the set:

1. the candidates are the VMs that name the set, are not stopping, and whose allow-list
   (``--pcsc-allow`` / ``pcsc_allow``) admits the reader's name;
2. the reader goes to the candidate with the fewest readers from this set; ties go to the VM
   that joined first (command line, then config file, then ``ctl attach``, in order);
3. it becomes one more virtual reader of that VM (:meth:`vmc.runtime.endpoint.Vm.add_reader`)
   and stays there: unplugged and plugged again, it is the same virtual reader (its card
   reports the changes itself);
4. when its VM is detached, the reader is given again by rule 2 to the VMs left; with no
   candidate it waits for one (a VM attached later gets the waiting readers it admits).

So one VM naming ``pcsc:*`` gets every reader as its own virtual reader (a peer that takes
several readers per connection, like SPICE, sees them all), and N QEMU endpoints naming
``pcsc:*`` get one reader each, in order (QEMU's ccid-card-passthru takes one reader per
usb-ccid device: a VM's second reader is refused by QEMU, and the pool says so in the log).
Loop thread only, but for :meth:`ReaderPool.start`'s callback, which posts to the loop.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from functools import partial
from typing import Protocol

from ccidemu.card import Card, ReaderSet
from ccidemu.cards import CardOptions
from vmc.runtime.cards import Reader
from vmc.runtime.loop import Loop

__all__ = ["PoolMember", "ReaderPool"]

log = logging.getLogger(__name__)


class PoolMember(Protocol):
    """What the pool needs of a VM (a :class:`vmc.runtime.endpoint.Vm` is one)."""

    name: str
    closed: bool
    readers: list[Reader]

    def add_reader(self, reader: Reader) -> None: ...


class ReaderPool:
    """One reader set and the VMs that share its readers (module docstring)."""

    def __init__(self, loop: Loop, spec: str, readers: ReaderSet,
                 options_of: Callable[[PoolMember], CardOptions],
                 off_loop: Callable[[Callable[[], None]], None]) -> None:
        self.loop = loop
        self.spec = spec
        self._off_loop = off_loop  # closing a card may block: never in the loop thread
        self.set = readers
        self._options_of = options_of
        self.members: list[PoolMember] = []
        self.owner: dict[str, PoolMember] = {}  # reader name -> the VM that has it
        self.cards: dict[str, Card] = {}
        self.waiting: list[str] = []  # readers no VM may take now
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self.set.watch(lambda name: self.loop.call_soon(lambda: self._appeared(name)))

    def close(self) -> None:
        """Stop the set and close its cards (the daemon's end; blocks a little)."""
        with contextlib.suppress(Exception):
            self.set.unwatch()
        for card in list(self.cards.values()):
            _close(card)
        self.cards.clear()

    # ---------------------------------------------------------------- members

    def join(self, vm: PoolMember) -> None:
        """A VM naming the set started: it may take the readers waiting for one."""
        if vm in self.members:
            return
        self.members.append(vm)
        self.start()
        for name in list(self.waiting):
            if self._allowed(vm, name):
                self.waiting.remove(name)
                self._give(name, vm)

    def leave(self, vm: PoolMember) -> None:
        """A VM was detached (its readers retired): its pool readers go to others."""
        if vm not in self.members:
            return
        self.members.remove(vm)
        for name in [n for n, owner in self.owner.items() if owner is vm]:
            del self.owner[name]
            card = self.cards.pop(name, None)
            if card is not None:
                self._off_loop(partial(_close, card))
            self._appeared(name)

    def readers_of(self, vm: PoolMember) -> list[str]:
        return sorted(n for n, owner in self.owner.items() if owner is vm)

    # ---------------------------------------------------------------- giving

    def _allowed(self, vm: PoolMember, name: str) -> bool:
        return _admits(self._options_of(vm).allow_readers, name)

    def _appeared(self, name: str) -> None:
        if name in self.owner or name in self.waiting:
            return
        candidates = [vm for vm in self.members if not vm.closed and self._allowed(vm, name)]
        if not candidates:
            log.info("%s: reader %r waits for a VM that may have it", self.spec, name)
            self.waiting.append(name)
            return
        counts = {id(vm): len(self.readers_of(vm)) for vm in candidates}
        vm = min(candidates, key=lambda v: counts[id(v)])  # min keeps the first of equals
        self._give(name, vm)

    def _give(self, name: str, vm: PoolMember) -> None:
        card = self.set.open(name, self._options_of(vm))
        spec = self.set.spec_of(name)
        reader = Reader(len(vm.readers), spec, card, present=False)  # until its card says
        self.owner[name] = vm
        self.cards[name] = card
        others = len(self.readers_of(vm)) - 1
        log.info("vm %s: reader %d is %s (from %s)", vm.name, reader.index, spec, self.spec)
        if others:
            log.warning("vm %s now has %d readers from %s: QEMU's ccid-card-passthru takes "
                        "one reader per usb-ccid device and refuses the others; give the VM "
                        "one endpoint (--listen/--connect, each its own usb-ccid) per reader "
                        "(docs/DESIGN.md, \"Real cards\")", vm.name, others + 1, self.spec)
        vm.add_reader(reader)


def _admits(patterns: tuple[str, ...], name: str) -> bool:
    return not patterns or any(re.search(p, name) for p in patterns)


def _close(card: Card) -> None:
    close = getattr(card, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()
