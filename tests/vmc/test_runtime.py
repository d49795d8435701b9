"""Issue 8 proofs against the daemon: per-VM configuration and card state, attach/detach and
reload at run time, bounded logs and file-descriptor exhaustion (docs/DESIGN.md, "Runtime")."""

from __future__ import annotations

import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ccidemu.errors import ConfigError
from ccidemu.vsc import VscCardRemove, VscReaderRemove
from tests.support import wait_for
from tests.vmc.daemon_harness import RunningDaemon, echo, serve
from vmc.addr import UnixAddress
from vmc.config import load_config_file
from vmc.control import ControlError, control_request
from vmc.fakeqemu import FakeQemu, FakeQemuListener
from vmc.spice import SpiceTarget
from vmc.touch import TouchMode, TouchSetting

H = bytes.fromhex
REPO = Path(__file__).resolve().parents[2]
SELECT = H("00a4040009a00000030800001000")


def pin(value: bytes) -> bytes:
    return H("0020008008") + value.ljust(8, b"\xff")


def change_pin(old: bytes, new: bytes) -> bytes:
    return H("0024008010") + old.ljust(8, b"\xff") + new.ljust(8, b"\xff")


# --------------------------------------------------------------------------- config file


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_config_file_vms(tmp: Path) -> None:
    config = write(tmp / "serve.toml", f"""\
        state_dir = "state"
        [vm.alice]
        listen = "unix:{tmp}/alice.sock"
        cards = ["piv:", "test:"]
        socket_mode = "0660"
        [vm.bob]
        connect = "tcp:127.0.0.1:2002"
        state_dir = "/var/lib/bob"
        """)
    settings, vms = load_config_file(config)
    assert settings == {"state_dir": tmp / "state"}
    alice, bob = vms
    assert (alice.name, alice.mode, str(alice.address)) == ("alice", "listen",
                                                             f"unix:{tmp}/alice.sock")
    assert alice.cards == ("piv:", "test:") and alice.socket.mode == 0o660
    assert alice.state_dir == tmp / "state" / "alice"
    assert (bob.mode, str(bob.address), bob.cards) == ("connect", "tcp:127.0.0.1:2002",
                                                        ("piv:",))
    assert bob.state_dir == Path("/var/lib/bob")


def test_touch_in_the_config_file(tmp: Path) -> None:
    config = write(tmp / "serve.toml", """\
        touch = "delay:1.5"
        [vm.alice]
        listen = "unix:/run/a.sock"
        [vm.bob]
        listen = "unix:/run/b.sock"
        touch = "button"
        """)
    settings, (alice, bob) = load_config_file(config)
    assert settings["touch"] == TouchSetting(TouchMode.DELAY, 1.5)
    assert alice.touch == TouchSetting(TouchMode.DELAY, 1.5)  # the file's default
    assert bob.touch == TouchSetting(TouchMode.BUTTON, 15.0)


def test_spice_endpoints_in_the_config_file(tmp: Path) -> None:
    secret = tmp / "vm1.spicepw"
    secret.write_text("Pw-1\n")
    secret.chmod(0o600)
    config = write(tmp / "serve.toml", """\
        [vm.vm1]
        spice = "127.0.0.1:5930"
        spice_password_file = "vm1.spicepw"
        cards = ["cac:"]
        [vm.vm2]
        spice = "[::1]:5931"
        spice_tls_port = 5932
        spice_host_subject = "CN=my server"
        """)
    _, (vm1, vm2) = load_config_file(config)
    assert (vm1.mode, vm1.cards) == ("spice", ("cac:",))
    assert vm1.spice == SpiceTarget("127.0.0.1", 5930, password="Pw-1")  # path from the file's dir
    assert (vm2.mode, vm2.cards) == ("spice", ("piv:",))
    assert vm2.spice == SpiceTarget("::1", 5931, 5932, None, "CN=my server", "")
    assert "Pw-1" not in repr(vm1) and "Pw-1" not in str(vm1.spice)


BAD_FILES = [
    pytest.param('[vm.a]\nlisten = "unix:/x"\ncards = "piv:"\n', ":3: vm.a.cards: must be a list",
                 id="cards-not-a-list"),
    pytest.param('[vm.a]\nlisten = "unix:/x"\ncolour = 1\n', ":3: vm.a.colour: unknown setting",
                 id="unknown-key"),
    pytest.param('[vm.a]\nlisten = "unix:/x"\nconnect = "tcp:h:1"\n',
                 ":1: vm.a: give exactly one of listen, connect or spice", id="both"),
    pytest.param('[vm.a]\n\nlisten = "udp:1"\n', ":3: vm.a.listen: address 'udp:1'",
                 id="bad-address"),
    pytest.param('[vm.a]\nlisten = "unix:/x"\nsocket_mode = "rwx"\n',
                 ":3: vm.a.socket_mode: 'rwx' is not an octal mode", id="bad-mode"),
    pytest.param('[vm.a]\nlisten = "tcp:127.0.0.1:1"\nsocket_mode = "0660"\n',
                 ":3: vm.a.socket_mode: applies to unix listen sockets only", id="mode-on-tcp"),
    pytest.param('[vm.a]\nlisten = "unix:/x"\nsocket_group = "no-such-group-x"\n',
                 ":3: vm.a.socket_group: no group 'no-such-group-x'", id="no-group"),
    pytest.param('["vm"."a b"]\nlisten = "unix:/x"\n', ":1: vm.a b: a VM name is",
                 id="bad-name"),
    pytest.param('state_dir = 5\n', ":1: state_dir: must be a path string", id="state-dir-int"),
    pytest.param('[vm.a]\nlisten = "unix:/x"\nread_only = "yes"\n',
                 ":3: vm.a.read_only: must be true or false", id="bool"),
    pytest.param('touch = 5\n', ':1: touch: must be "auto"', id="touch-int"),
    pytest.param('[vm.a]\nlisten = "unix:/x"\ntouch = "press"\n',
                 ":3: vm.a.touch: touch mode 'press' is not auto", id="touch-mode"),
    pytest.param('[vm.a\nlisten = 1\n', "is not valid TOML", id="syntax"),
    pytest.param('[vm.a]\nspice = "h:1"\ncards = ["piv:", "cac:"]\n',
                 ":3: vm.a.cards: a SPICE session carries one reader", id="spice-two-cards"),
    pytest.param('[vm.a]\nlisten = "unix:/x"\nspice_tls_port = 5\n',
                 ":3: vm.a.spice_tls_port: applies to a spice endpoint only",
                 id="spice-on-listen"),
    pytest.param('[vm.a]\nspice = 5930\n', ":2: vm.a.spice: must be HOST:PORT", id="spice-int"),
    pytest.param('[vm.a]\nspice = "h:1"\nspice_tls_port = "x"\n',
                 ":3: vm.a.spice_tls_port: must be a port number", id="spice-tls-str"),
    pytest.param('[vm.a]\nspice = "h:1"\nspice_password_file = "/no/such/pw"\n',
                 ":3: vm.a.spice_password_file: cannot read the SPICE password file /no/such/pw",
                 id="spice-no-password-file"),
    pytest.param("x = " + "[" * 2000 + "]" * 2000 + "\n", "", id="deep"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_a_bad_config_file_is_one_error_naming_file_line_and_key(
    tmp: Path, text: str, message: str
) -> None:
    path = tmp / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_two_vms_cannot_share_a_state_directory_or_an_address(tmp: Path) -> None:
    shared = write(tmp / "shared.toml", f"""\
        [vm.a]
        listen = "unix:{tmp}/a.sock"
        state_dir = "{tmp}/st"
        [vm.b]
        listen = "unix:{tmp}/b.sock"
        state_dir = "{tmp}/st"
        """)
    with pytest.raises(ConfigError, match="vm a and vm b would both keep card state in"):
        serve(config_file=shared, cards=[])
    same = write(tmp / "same.toml", f"""\
        [vm.a]
        listen = "unix:{tmp}/a.sock"
        [vm.b]
        listen = "unix:{tmp}/a.sock"
        """)
    with pytest.raises(ConfigError, match="vm a and vm b both use unix:"):
        serve(config_file=same, cards=[])


def test_a_second_daemon_cannot_take_a_vms_state(tmp: Path, daemons: list[RunningDaemon]
                                                  ) -> None:
    state = tmp / "state"
    daemons.append(serve(listen=[UnixAddress(tmp / "a.sock")], cards=["piv:"],
                         card_options=_options(state)))
    with pytest.raises(ConfigError, match=r"in use by vm vm1 \(pid \d+\)"):
        serve(listen=[UnixAddress(tmp / "b.sock")], cards=["piv:"],
              card_options=_options(state))


def _options(state: Path) -> object:
    from ccidemu.cards import CardOptions

    return CardOptions(state_dir=state)


# --------------------------------------------------------------------------- card state


def two_vm_file(tmp: Path, state: Path) -> Path:
    return write(tmp / "serve.toml", f"""\
        state_dir = "{state}"
        [vm.alice]
        listen = "unix:{tmp}/alice.sock"
        cards = ["piv:"]
        [vm.bob]
        listen = "unix:{tmp}/bob.sock"
        cards = ["piv:"]
        """)


def test_two_vms_with_one_card_spec_keep_their_own_state_across_restarts(
    tmp: Path
) -> None:
    state = tmp / "state"
    config = two_vm_file(tmp, state)
    for round_ in range(2):
        d = serve(config_file=config, cards=[])
        try:
            alice, bob = UnixAddress(tmp / "alice.sock"), UnixAddress(tmp / "bob.sock")
            with FakeQemu.connect(alice) as fa, FakeQemu.connect(bob) as fb:
                fa.wait_card()
                fb.wait_card()
                for fake in (fa, fb):
                    assert fake.transmit(SELECT)[-2:] == H("9000")
                if round_ == 0:
                    assert fa.transmit(change_pin(b"123456", b"111111")) == H("9000")
                # alice has her new PIN, bob still the default, in both rounds
                assert fa.transmit(pin(b"111111")) == H("9000")
                assert fb.transmit(pin(b"123456")) == H("9000")
                assert fb.transmit(SELECT)[-2:] == H("9000")
                assert fb.transmit(pin(b"111111")) == H("63c2")
                assert fb.transmit(pin(b"123456")) == H("9000")  # counter back to 3
        finally:
            d.stop()
    assert sorted(p.name for p in state.iterdir()) == ["alice", "bob"]


def test_read_only_serves_the_saved_state_and_writes_nothing(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ccidemu.cards import CardOptions

    state = tmp / "state"
    config = two_vm_file(tmp, state)
    d = serve(config_file=config, cards=[])
    try:
        with FakeQemu.connect(UnixAddress(tmp / "alice.sock")) as fa:
            fa.wait_card()
            assert fa.transmit(SELECT)[-2:] == H("9000")
            assert fa.transmit(change_pin(b"123456", b"111111")) == H("9000")
    finally:
        d.stop()
    saved = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    addr = UnixAddress(tmp / "ro.sock")
    with caplog.at_level("INFO"):
        d = serve(listen=[addr], cards=["piv:"],
                  card_options=CardOptions(state_dir=state / "alice", read_only=True))
    try:
        assert any("read-only" in r.getMessage() and "not saved" in r.getMessage()
                   for r in caplog.records)
        with FakeQemu.connect(addr) as fake:
            fake.wait_card()
            assert fake.transmit(SELECT)[-2:] == H("9000")
            assert fake.transmit(pin(b"123456")) == H("63c2")  # alice's PIN is read ...
            assert fake.transmit(pin(b"111111")) == H("9000")
            assert fake.transmit(change_pin(b"111111", b"222222")) == H("9000")
    finally:
        d.stop()
    # ... and nothing the guest did was written, not even a lock file
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == saved
    with pytest.raises(ConfigError, match=r"--read-only state directory .* does not exist"):
        serve(listen=[addr], cards=["piv:"],
              card_options=CardOptions(state_dir=tmp / "nowhere", read_only=True))


@pytest.mark.parametrize("persist", [False, True], ids=["in-memory", "state-dir"])
def test_wrong_pins_across_reconnects_block_the_card(
    tmp: Path, daemons: list[RunningDaemon], persist: bool
) -> None:
    """A peer that reconnects after every wrong PIN does not get new tries."""
    addr = UnixAddress(tmp / "vm.sock")
    kw: dict[str, object] = {"card_options": _options(tmp / "state")} if persist else {}
    daemons.append(serve(listen=[addr], cards=["piv:"], **kw))
    answers = []
    for _ in range(4):
        with FakeQemu.connect(addr, timeout=30) as fake:
            fake.wait_card(timeout=30)
            fake.transmit(SELECT)
            answers.append(fake.transmit(pin(b"000000")))
    assert answers == [H("63c2"), H("63c1"), H("63c0"), H("6983")]
    with FakeQemu.connect(addr, timeout=30) as fake:
        fake.wait_card(timeout=30)
        fake.transmit(SELECT)
        assert fake.transmit(pin(b"123456")) == H("6983")  # blocked, right PIN or not


def test_concurrent_connections_do_not_multiply_pin_tries(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    addr = UnixAddress(tmp / "vm.sock")
    daemons.append(serve(listen=[addr], cards=["piv:"]))
    fakes = [FakeQemu.connect(addr) for _ in range(10)]
    try:
        served = []
        for fake in fakes:
            try:
                fake.wait_card(timeout=15)
            except Exception:
                continue
            served.append(fake)
        assert len(served) == 1  # one connection at a time
        fake = served[0]
        fake.transmit(SELECT)
        tries = [fake.transmit(pin(b"000000")) for _ in range(4)]
        assert tries == [H("63c2"), H("63c1"), H("63c0"), H("6983")]
    finally:
        for fake in fakes:
            fake.close()


# --------------------------------------------------------------------------- attach/detach


def test_attach_and_detach_at_run_time(tmp: Path, daemons: list[RunningDaemon]) -> None:
    ctl = UnixAddress(tmp / "ctl.sock")
    d = serve(listen=[UnixAddress(tmp / "vm1.sock")], control=ctl)
    daemons.append(d)
    late = UnixAddress(tmp / "late.sock")
    vm = control_request(ctl, {"cmd": "attach", "vm": "late", "listen": str(late),
                               "cards": ["test:late"]})
    assert vm["vm"] == "late" and vm["listening"] and not vm["connected"]
    with pytest.raises(ControlError, match="exists already"):
        control_request(ctl, {"cmd": "attach", "vm": "late", "listen": str(late)})
    with pytest.raises(ControlError, match="both use"):
        control_request(ctl, {"cmd": "attach", "vm": "other", "listen": str(late)})
    with FakeQemu.connect(late) as fake:
        fake.wait_card()
        echo(fake, b"attached")
        listing = {v["vm"]: v for v in control_request(ctl, {"cmd": "list"})}
        assert set(listing) == {"vm1", "late"} and listing["late"]["connected"]
        assert listing["late"]["readers"][0]["card"] == "built-in test card (late)"
        assert control_request(ctl, {"cmd": "detach", "vm": "late"}) == {"detached": "late"}
        fake.wait_closed(timeout=30)
        kinds = [type(m) for m in fake.received]
        assert VscCardRemove in kinds and VscReaderRemove in kinds
    assert not late.path.exists()
    assert [v["vm"] for v in control_request(ctl, {"cmd": "list"})] == ["vm1"]
    # connect mode too, attached before QEMU is there
    qemu_addr = UnixAddress(tmp / "qemu.sock")
    control_request(ctl, {"cmd": "attach", "vm": "c", "connect": str(qemu_addr)})
    with FakeQemuListener(qemu_addr) as qemu, qemu.accept(timeout=30) as fake:
        fake.wait_card()
        echo(fake, b"connected")


def test_ctl_command_line_attach_detach(tmp: Path, daemons: list[RunningDaemon]) -> None:
    ctl = UnixAddress(tmp / "ctl.sock")
    daemons.append(serve(listen=[UnixAddress(tmp / "vm1.sock")], control=ctl))
    late = tmp / "late.sock"

    def ctl_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vmc", "ctl", "--control", str(ctl), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=60)

    attached = ctl_run("attach", "late", "--listen", f"unix:{late}", "--card", "test:")
    assert attached.returncode == 0, attached.stderr
    assert "late" in attached.stdout and "(listening)" in attached.stdout
    listing = ctl_run("list")
    assert listing.stdout.count("\n") == 3 and "vm1" in listing.stdout
    assert ctl_run("detach", "late").stdout.strip() == "detached late"
    missing = ctl_run("detach", "late")
    assert missing.returncode == 1 and "no vm 'late'" in missing.stderr
    as_json = ctl_run("--json", "detach", "late")
    assert as_json.returncode == 1 and '"ok": false' in as_json.stdout


# --------------------------------------------------------------------------- reload


def test_reload_touches_only_the_vms_that_changed(tmp: Path) -> None:
    ctl = UnixAddress(tmp / "ctl.sock")
    base = f"""\
        [vm.stays]
        listen = "unix:{tmp}/stays.sock"
        cards = ["test:stays"]
        [vm.goes]
        listen = "unix:{tmp}/goes.sock"
        cards = ["test:goes"]
        [vm.changes]
        listen = "unix:{tmp}/changes.sock"
        cards = ["test:old"]
        """
    config = write(tmp / "serve.toml", base)
    d = serve(config_file=config, cards=[], control=ctl)
    try:
        stays = FakeQemu.connect(UnixAddress(tmp / "stays.sock"))
        goes = FakeQemu.connect(UnixAddress(tmp / "goes.sock"))
        changes = FakeQemu.connect(UnixAddress(tmp / "changes.sock"))
        for fake in (stays, goes, changes):
            fake.wait_card()
        echo(stays, b"before")
        write(config, base.replace('[vm.goes]\n        listen = "unix:' + str(tmp)
                                   + '/goes.sock"\n        cards = ["test:goes"]\n', "")
              .replace("test:old", "test:new")
              + f'        [vm.new]\n        listen = "unix:{tmp}/new.sock"\n')
        result = control_request(ctl, {"cmd": "reload"})
        assert result == {"detached": ["goes", "changes"], "attached": ["changes", "new"],
                          "unchanged": ["stays"], "errors": []}
        goes.wait_closed(timeout=30)
        changes.wait_closed(timeout=30)
        assert VscReaderRemove in [type(m) for m in goes.received]
        echo(stays, b"untouched")  # the same connection, never interrupted
        assert not stays.closed
        with FakeQemu.connect(UnixAddress(tmp / "changes.sock")) as fake:
            fake.wait_card()
            names = {v["vm"]: v for v in control_request(ctl, {"cmd": "list"})}
            assert names["changes"]["readers"][0]["card"] == "built-in test card (new)"
        assert set(names) == {"stays", "changes", "new"}
        # a broken file changes nothing, and the daemon keeps running
        config.write_text(config.read_text() + "[vm.bad]\ncards = 1\n")
        with pytest.raises(ControlError, match=r"serve.toml:\d+: vm.bad.*nothing changed"):
            control_request(ctl, {"cmd": "reload"})
        echo(stays, b"still")
        assert {v["vm"] for v in control_request(ctl, {"cmd": "list"})} == set(names)
        stays.close()
    finally:
        d.stop()


def test_reload_starts_again_a_file_vm_that_is_not_serving(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VM of the file that was detached, or whose SPICE endpoint gave up, comes back at
    reload although its settings did not change; a serving one is left alone."""
    from tests.spice_fake import FakeSpiceServer, FakeSpiceSocketServer
    from vmc.runtime import spice_link

    monkeypatch.setattr(spice_link, "PASSWORD_GRACE", 0.3)
    ctl = UnixAddress(tmp / "ctl.sock")
    secret = tmp / "pw"
    secret.write_text("right-pw\n")
    secret.chmod(0o600)
    fake_spice = FakeSpiceServer(password=b"old-pw")  # the VM's password is not ours yet
    with FakeSpiceSocketServer(fake_spice) as srv:
        config = write(tmp / "serve.toml", f"""\
            [vm.stays]
            listen = "unix:{tmp}/stays.sock"
            cards = ["test:"]
            [vm.detached]
            listen = "unix:{tmp}/detached.sock"
            cards = ["test:"]
            [vm.spice]
            spice = "127.0.0.1:{srv.port}"
            spice_password_file = "pw"
            """)
        d = serve(config_file=config, cards=[], control=ctl)
        try:
            stays = FakeQemu.connect(UnixAddress(tmp / "stays.sock"))
            stays.wait_card()

            def spice_vm() -> dict[str, object]:
                listing: list[dict[str, object]] = control_request(ctl, {"cmd": "list"})
                return {str(v["vm"]): v for v in listing}["spice"]

            deadline = time.monotonic() + 30
            while not _gave_up(d, "spice"):  # refused, retried in the grace, then given up
                assert time.monotonic() < deadline, spice_vm()
                time.sleep(0.05)
            assert len(srv.threads) >= 2 and "password" in str(spice_vm()["waiting"])
            assert control_request(ctl, {"cmd": "detach", "vm": "detached"}) == {
                "detached": "detached"}
            fake_spice.password = b"right-pw"  # the VM's password fixed (virsh domsetpassword)
            result = control_request(ctl, {"cmd": "reload"})
            assert result == {"detached": ["spice"], "attached": ["detached", "spice"],
                              "unchanged": ["stays"], "errors": []}
            wait_for(lambda: bool(spice_vm()["connected"]), "the SPICE VM back")
            with FakeQemu.connect(UnixAddress(tmp / "detached.sock")) as fake:
                fake.wait_card()
                echo(fake, b"back")
            echo(stays, b"untouched")
            assert not stays.closed
            # Now every VM serves: a reload touches nothing.
            assert control_request(ctl, {"cmd": "reload"}) == {
                "detached": [], "attached": [], "errors": [],
                "unchanged": ["detached", "spice", "stays"]}
            stays.close()
        finally:
            d.stop()


def _gave_up(d: RunningDaemon, name: str) -> bool:
    vm = d.daemon.vms.get(name)
    return vm is not None and vm.spice is not None and vm.spice.fatal is not None


def test_sighup_reloads_the_real_daemon(tmp: Path) -> None:
    ctl = tmp / "ctl.sock"
    config = write(tmp / "serve.toml", f'[vm.a]\nlisten = "unix:{tmp}/a.sock"\n'
                   'cards = ["test:"]\n')
    log = tmp / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vmc", "serve", "--config", str(config),
                                 "--control", f"unix:{ctl}"], cwd=REPO, stdout=out, stderr=out)
    try:
        wait_for(lambda: ctl.exists(), "the control socket")
        config.write_text(config.read_text() + f'[vm.b]\nlisten = "unix:{tmp}/b.sock"\n'
                          'cards = ["test:"]\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: (tmp / "b.sock").exists(), "vm b after SIGHUP")
        with FakeQemu.connect(UnixAddress(tmp / "b.sock")) as fake:
            fake.wait_card()
            echo(fake, b"b")
        config.write_text("not toml [[[")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "nothing changed" in log.read_text(), "the reload error in the log")
        assert proc.poll() is None
        assert {v["vm"] for v in control_request(UnixAddress(ctl), {"cmd": "list"})} == {"a",
                                                                                        "b"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "Traceback" not in log.read_text()


# --------------------------------------------------------------------------- bounded logs


def test_a_flood_of_malformed_input_produces_a_bounded_log(tmp: Path) -> None:
    """10,000 malformed frames: unknown messages on one session, and over-long headers on
    5,000 connections; the log stays small and the daemon serves on."""
    addr, abuse = tmp / "vm.sock", tmp / "abuse.sock"
    log = tmp / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmc", "-v", "serve", "--listen", f"unix:{addr}", "--listen",
             f"unix:{abuse}", "--card", "test:", "--control", "none"],
            cwd=REPO, stdout=out, stderr=out)
    try:
        wait_for(lambda: abuse.exists(), "the daemon")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(abuse))
            init = struct.pack(">III", 1, 0xFFFFFFFF, 12) + b"VSCD" + struct.pack(">II", 2, 0)
            s.sendall(init + struct.pack(">III", 99, 0, 0) * 5000)
            time.sleep(0.5)
        for _ in range(5000):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(abuse))
                s.sendall(struct.pack(">III", 7, 0, 0xFFFFFFF0))
                s.settimeout(30)
                while s.recv(4096):  # until the daemon closes this connection
                    pass
        with FakeQemu.connect(UnixAddress(addr)) as fake:
            fake.wait_card(timeout=30)
            echo(fake, b"alive")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    lines = log.read_text().splitlines()
    assert len(lines) < 400, f"{len(lines)} log lines"
    assert any("suppressed (rate limit)" in line for line in lines)
    assert any("malformed VSCard stream" in line for line in lines)


def test_running_out_of_file_descriptors_is_survived_and_logged_sparingly(
    tmp: Path
) -> None:
    """A daemon limited to 64 descriptors, 20 VMs; an abuser opens connections (kept open,
    never a handshake) to all of them: accepting pauses, the connected VM is served all
    along, the log grows by a bounded amount, and accepting resumes afterwards."""
    addr = tmp / "vm.sock"
    abuse = [tmp / f"abuse{i}.sock" for i in range(20)]
    log = tmp / "serve.log"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    argv = [sys.executable, "-m", "vmc", "serve", "--listen", f"unix:{addr}"]
    for path in abuse:
        argv += ["--listen", f"unix:{path}"]
    with log.open("wb") as out:
        proc = subprocess.Popen([*argv, "--card", "test:", "--control", "none"], cwd=REPO,
                                stdout=out, stderr=out, preexec_fn=limit)
    held: list[socket.socket] = []
    try:
        wait_for(lambda: all(p.exists() for p in abuse), "the daemon")
        good = FakeQemu.connect(UnixAddress(addr))
        good.wait_card()
        for path in abuse:  # 8 pending per VM x 20 VMs: far past the daemon's 64
            for _ in range(8):
                s = socket.socket(socket.AF_UNIX)
                s.setblocking(False)
                try:
                    s.connect(str(path))
                except OSError:
                    s.close()
                    break
                held.append(s)
        wait_for(lambda: "cannot accept" in log.read_text(), "the daemon to run out")
        deadline = time.monotonic() + 3
        n = 0
        while time.monotonic() < deadline:  # the connected VM is served all along
            echo(good, n.to_bytes(4, "big"), timeout=10)
            n += 1
        assert n > 20
        size = log.stat().st_size
        time.sleep(1)
        assert log.stat().st_size - size < 4096  # no log storm while descriptors are out
        for s in held:
            s.close()
        held.clear()
        wait_for(lambda: _connects(UnixAddress(abuse[0])), "accepting again")
        good.close()
    finally:
        for s in held:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    text = log.read_text()
    assert "pausing new connections on every listener" in text
    assert text.count("cannot accept") < 15  # one line per pause, pauses growing to 5 s
    assert "Traceback" not in text


def _connects(addr: UnixAddress) -> bool:
    try:
        with FakeQemu.connect(addr, timeout=5) as fake:
            fake.wait_card(timeout=5)
            return True
    except Exception:
        return False


def test_the_unix_listen_socket_gets_the_asked_mode_and_group(
    tmp: Path, daemons: list[RunningDaemon]
) -> None:
    from vmc.config import SocketOptions

    addr = UnixAddress(tmp / "vm.sock")
    group = os.getgid()
    daemons.append(serve(listen=[addr], socket=SocketOptions(group=group, mode=0o660)))
    st = addr.path.stat()
    assert (st.st_mode & 0o777, st.st_gid) == (0o660, group)
