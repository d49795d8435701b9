"""Readers that appear at run time (``pcsc:*``; vmc.runtime.pool) given to VMs, with a reader
set of toy readers: one VM takes every reader (a multi-reader peer sees them all), several VMs
take one each in order (fewest first, ties to the first VM), allow-lists, a detached VM's
readers going to the others, readers waiting for a VM that may have them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ccidemu.card import BuiltinTestCard, CardInserted, ReaderEvent, ReaderUnplugged
from ccidemu.cards import CardOptions, register_set
from ccidemu.errors import ConfigError
from tests.vmc.daemon_harness import RunningDaemon, free_port
from vmc.addr import parse_address
from vmc.config import ServeConfig, load_config_file
from vmc.control import ControlError
from vmc.fakeqemu import FakeQemu

H = bytes.fromhex


class ToyReaderCard(BuiltinTestCard):
    """A test card in a reader that reports itself (ReaderEvents): there at once."""

    blocking: ClassVar[bool] = True

    def __init__(self, reader: str) -> None:
        super().__init__(reader)
        self.reader = reader
        self.notify: Callable[[ReaderEvent], None] | None = None

    def watch(self, notify: Callable[[ReaderEvent], None]) -> None:
        self.notify = notify
        notify(CardInserted())

    def unwatch(self) -> None:
        self.notify = None


class ToySet:
    """A reader set whose readers the test plugs in."""

    instances: ClassVar[list[ToySet]] = []

    def __init__(self) -> None:
        self.names: list[str] = list(START)
        self.notify: Callable[[str], None] | None = None
        self.cards: dict[str, ToyReaderCard] = {}
        self.lock = threading.Lock()
        ToySet.instances.append(self)

    @property
    def name(self) -> str:
        return "toy readers"

    def watch(self, notify: Callable[[str], None]) -> None:
        self.notify = notify
        for name in self.names:
            notify(name)

    def unwatch(self) -> None:
        self.notify = None

    def open(self, reader: str, options: CardOptions) -> ToyReaderCard:
        kind = QuietReaderCard if reader.startswith("quiet") else ToyReaderCard
        card = self.cards[reader] = kind(reader)
        return card

    def spec_of(self, reader: str) -> str:
        return f"toy:{reader}"

    def plug(self, name: str) -> None:
        self.names.append(name)
        assert self.notify is not None
        self.notify(name)


START: list[str] = []


def open_toy_set(argument: str, options: CardOptions) -> ToySet:
    return ToySet()


@pytest.fixture
def toy() -> Iterator[None]:
    register_set("toy", "tests.backends.test_pool:open_toy_set")
    ToySet.instances.clear()
    yield
    START.clear()


def _daemon(**kw: Any) -> RunningDaemon:
    return RunningDaemon(ServeConfig(**kw))


def _addr() -> Any:
    return parse_address(f"tcp:127.0.0.1:{free_port()}")


def _specs(daemon: RunningDaemon) -> dict[str, list[str]]:
    return {vm["vm"]: [r["spec"] for r in vm["readers"]] for vm in daemon.request({"cmd": "list"})}


def _wait(daemon: RunningDaemon, want: dict[str, list[str]]) -> None:
    import time

    deadline = time.monotonic() + 30
    while _specs(daemon) != want:
        assert time.monotonic() < deadline, _specs(daemon)
        time.sleep(0.02)


@pytest.mark.usefixtures("toy")
def test_one_vm_gets_every_reader_and_those_plugged_in_later() -> None:
    START.extend(["a", "b"])
    address = _addr()
    daemon = _daemon(listen=[address], cards=["toy:*"])
    fake = FakeQemu.connect(address, multi_reader=True)
    try:
        assert fake.wait_readers(2, timeout=30) == [0, 1]
        assert fake.wait_card(1, timeout=30) == BuiltinTestCard.ATR
        assert fake.transmit(H("80E0000003010203"), 1, timeout=30) == H("010203 9000")
        (toy_set,) = ToySet.instances
        toy_set.plug("c")
        assert fake.wait_readers(3, timeout=30) == [0, 1, 2]
        fake.wait_card(2, timeout=30)
        assert _specs(daemon) == {"vm1": ["toy:a", "toy:b", "toy:c"]}
        # unplugged and plugged again: the same virtual reader (its card reports it)
        card = toy_set.cards["b"]
        assert card.notify is not None
        card.notify(ReaderUnplugged("pulled"))
        fake.wait_removed(1, timeout=30)
        card.notify(CardInserted())
        assert fake.wait_card(3, timeout=30) == BuiltinTestCard.ATR  # added again: id 3
        assert _specs(daemon) == {"vm1": ["toy:a", "toy:b", "toy:c"]}
    finally:
        fake.close()
        daemon.stop()


@pytest.mark.usefixtures("toy")
def test_many_vms_one_reader_each_in_order() -> None:
    START.extend(["a", "b", "c", "d"])
    daemon = _daemon(listen=[_addr(), _addr(), _addr()], cards=["toy:*"])
    try:
        _wait(daemon, {"vm1": ["toy:a", "toy:d"], "vm2": ["toy:b"], "vm3": ["toy:c"]})
        assert len(ToySet.instances) == 3  # each VM opened the set; one is used
        assert sum(1 for s in ToySet.instances if s.notify is not None) == 1
    finally:
        daemon.stop()


@pytest.mark.usefixtures("toy")
def test_allow_lists_detach_and_readers_that_wait(tmp_path: Path) -> None:
    START.extend(["a", "x1", "zz"])
    ports = [free_port() for _ in range(2)]
    config = tmp_path / "serve.toml"
    config.write_text(
        f'[vm.first]\nlisten = "tcp:127.0.0.1:{ports[0]}"\ncards = ["toy:*"]\n'
        'pcsc_allow = ["^x"]\n'
        f'[vm.second]\nlisten = "tcp:127.0.0.1:{ports[1]}"\ncards = ["toy:*"]\n'
        'pcsc_allow = ["^a$", "^x"]\n')
    daemon = _daemon(config_file=config, control=None)
    try:
        # a: only second may; x1: both (first has fewer); zz: nobody, it waits
        _wait(daemon, {"first": ["toy:x1"], "second": ["toy:a"]})
        daemon.request({"cmd": "detach", "vm": "first"})
        _wait(daemon, {"second": ["toy:a", "toy:x1"]})  # x1 moves to the VM left
        daemon.request({"cmd": "attach", "vm": "third", "listen": f"tcp:127.0.0.1:{free_port()}",
                        "cards": ["toy:*"]})
        _wait(daemon, {"second": ["toy:a", "toy:x1"], "third": ["toy:zz"]})  # it waited
        daemon.request({"cmd": "remove", "vm": "second", "reader": 0})
        with pytest.raises(ControlError, match="not to one reader"):
            daemon.request({"cmd": "insert", "vm": "second", "reader": 0, "card": "toy:*"})
    finally:
        daemon.stop()


def test_config_keys_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('[vm.a]\nlisten = "unix:/tmp/x.sock"\npcsc_allow = ["(unclosed"]\n')
    with pytest.raises(ConfigError, match=r"serve.toml:3: vm.a.pcsc_allow: .*not a regular"):
        load_config_file(config)
    config.write_text('[vm.a]\nlisten = "unix:/tmp/x.sock"\npcsc_allow = "^x"\n')
    with pytest.raises(ConfigError, match=r"serve.toml:3: vm.a.pcsc_allow: must be a list"):
        load_config_file(config)
    config.write_text('[vm.a]\nlisten = "unix:/tmp/x.sock"\ncompare = 3\n')
    with pytest.raises(ConfigError, match=r"serve.toml:3: vm.a.compare: must be a card spec"):
        load_config_file(config)
    config.write_text('[vm.a]\nlisten = "unix:/tmp/x.sock"\npcsc_exclusive = true\n'
                      'pcsc_allow = ["^Yubico"]\ncompare = "piv:"\n')
    (_, (vm,)) = load_config_file(config)
    assert vm.pcsc_exclusive and vm.pcsc_allow == ("^Yubico",) and vm.compare == "piv:"
    assert vm.card_options().allow_readers == ("^Yubico",) and vm.card_options().exclusive


@pytest.mark.usefixtures("toy")
def test_compare_needs_a_card_not_only_a_set() -> None:
    with pytest.raises(ConfigError, match="--compare needs a card"):
        _daemon(listen=[_addr()], cards=["toy:*"], compare="test:")
    with pytest.raises(ConfigError, match="give another card"):
        _daemon(listen=[_addr()], cards=["test:"], compare="test:")


class QuietReaderCard(ToyReaderCard):
    """Reports nothing until the test says so."""

    last: ClassVar[QuietReaderCard | None] = None

    def watch(self, notify: Callable[[ReaderEvent], None]) -> None:
        self.notify = notify
        QuietReaderCard.last = self


def open_quiet(argument: str, options: CardOptions) -> QuietReaderCard:
    return QuietReaderCard(argument)


def test_a_card_that_reports_its_presence_is_empty_until_it_does() -> None:
    from ccidemu.cards import register

    register("quiet", "tests.backends.test_pool:open_quiet")
    address = _addr()
    daemon = _daemon(listen=[address], cards=["quiet:r"])
    fake = FakeQemu.connect(address)
    try:
        fake.wait_handshake(timeout=30)
        listing = daemon.request({"cmd": "list"})
        _wait_for(lambda: daemon.request({"cmd": "list"})[0]["readers"][0]["reader_id"] == 0)
        assert not fake.card_present() and not listing[0]["readers"][0]["present"]
        card = QuietReaderCard.last
        assert card is not None and card.notify is not None
        card.notify(CardInserted())
        assert fake.wait_card(timeout=30) == BuiltinTestCard.ATR
    finally:
        fake.close()
        daemon.stop()


def _wait_for(predicate: Callable[[], bool]) -> None:
    import time

    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.usefixtures("toy")
def test_a_pool_reader_is_empty_until_its_card_says() -> None:
    START.append("quiet1")
    address = _addr()
    daemon = _daemon(listen=[address], cards=["toy:*"])
    fake = FakeQemu.connect(address, multi_reader=True)
    try:
        assert fake.wait_readers(1, timeout=30) == [0]
        _wait_for(lambda: daemon.request({"cmd": "list"})[0]["readers"][0]["reader_id"] == 0)
        assert not fake.card_present(0)
        card = ToySet.instances[0].cards["quiet1"]
        assert card.notify is not None
        card.notify(CardInserted())
        assert fake.wait_card(0, timeout=30) == BuiltinTestCard.ATR
    finally:
        fake.close()
        daemon.stop()
