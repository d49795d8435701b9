"""``ccidemu serve``: the composition of the runtime (:mod:`vmc.runtime`) for many VMs.

Theory of operation
-------------------
One loop thread (:class:`vmc.runtime.loop.Loop`) owns everything that changes: the VMs
(:class:`vmc.runtime.endpoint.Vm`: a listener or connector, readers, one live channel), the
channels (:class:`vmc.runtime.channel.VscChannel`: the VSCard engine on a transport) and the
control server.  Other threads only post work to it:

* the card host's threads (:class:`vmc.runtime.cards.CardHost`: heavy emulated-card work in
  a low-priority pool, each blocking card in a thread of its own) post card answers;
* the opener pool opens cards and binds sockets for ``ctl attach``, ``ctl insert --card`` and
  ``ctl reload`` (opening a PIV card reads and checks key files), and resolves host names;
* the caller's thread (``ccidemu serve``'s main thread) waits, and turns SIGINT/SIGTERM into
  :meth:`Daemon.request_stop`, SIGHUP into :meth:`Daemon.request_reload`.

Start-up opens every VM's cards and binds every listen socket before anything is served, so
a bad ``--card``, an unusable state directory or a busy address is one clear error at once.
A card spec that names a set of readers (``pcsc:*``) opens no card: the set's
:class:`~vmc.runtime.pool.ReaderPool` (one per spec, shared by every VM naming it) gives each
host reader to one VM as it appears.  ``--compare SPEC`` wraps a VM's first card so that each
APDU also goes to that reference card (:mod:`vmc.backends.compare`).
Each VM's card state lives in its own state directory (``state_dir/<name>`` for a config
file's VMs), locked for the daemon's lifetime: two VMs, or two daemons, never write one state
file.  Stopping removes every card and reader from every guest (after the responses in
flight; stuck blocking cards are cancelled), then closes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ccidemu.card import Card, CardInserted, CardRemoved, ReaderEvents, ReaderSet
from ccidemu.cards import CardOptions, is_reader_set, open_card, open_reader_set
from ccidemu.errors import CcidemuError, ConfigError
from ccidemu.files import DirectoryLock, ensure_private_dir
from ccidemu.traces import TraceWriter
from vmc import systemd
from vmc.addr import UnixAddress, parse_address
from vmc.config import DEFAULT_CARD, DEFAULT_CONNECT, ServeConfig, VmConfig, load_config_file
from vmc.control import ControlError, check_control_path
from vmc.runtime.cards import CardHost, Reader
from vmc.runtime.channel import ChannelStats, VscChannel
from vmc.runtime.control import ControlServer, Reply, internal_error
from vmc.runtime.endpoint import Vm, bind_listen_socket, bind_unix
from vmc.runtime.loop import Loop
from vmc.runtime.pool import PoolMember, ReaderPool
from vmc.session import ApduDone
from vmc.spice import check_one_card
from vmc.touch import TouchButton

__all__ = ["DEFAULT_CARD", "DEFAULT_CONNECT", "Daemon", "ServeConfig"]

log = logging.getLogger(__name__)

#: Seconds to wait for responses in flight when VMs are removed at shutdown or detach.
SHUTDOWN_GRACE = 3.0
_COMMANDS = ("list", "stats", "insert", "remove", "touch", "attach", "detach", "reload")


@dataclass
class _Prepared:
    """A VM ready to start: its readers opened, its state locked, its sockets bound."""

    config: VmConfig
    readers: list[Reader]
    lock: DirectoryLock | None
    socks: list[Any] = field(default_factory=list)
    #: reader sets the VM's cards name (pcsc:*): spec, and a set object the daemon may use
    sets: list[tuple[str, ReaderSet]] = field(default_factory=list)

    def discard(self) -> None:
        listen = self.config.listen
        for sock in self.socks:
            if isinstance(listen, UnixAddress) and not systemd.is_passed(sock):
                with contextlib.suppress(OSError):
                    listen.path.unlink()  # we bound it: leave no socket file behind
            with contextlib.suppress(OSError):
                sock.close()
        if self.lock is not None:
            self.lock.release()


class Daemon:
    """``ccidemu serve`` in-process: :meth:`start`, then :meth:`serve_forever` (or run it in
    a thread and call :meth:`request_stop`)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.loop = Loop()
        self.host = CardHost(self.loop, timeout=config.card_timeout)
        self.stats = ChannelStats()
        self.resolver: Executor = ThreadPoolExecutor(max_workers=4,
                                                     thread_name_prefix="ccidemu-open")
        self.tracing = False
        self.vms: dict[str, Vm] = {}
        self.started_at = time.monotonic()
        self._ids = itertools.count(1)
        self._trace: TraceWriter | None = None
        self._pools: dict[str, ReaderPool] = {}  # reader-set spec -> its pool
        self._control: ControlServer | None = None
        self._control_path: Path | None = None
        self._file_vms: list[VmConfig] = []
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._started = False
        self._reload_pending = False
        self._closed = False
        self._sessions = 0
        self._sessions_total = 0
        self._bytes = [0, 0]  # of channels that ended: in, out

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Open cards, trace, listeners, control socket; start connecting.  ConfigError."""
        config = self.config
        if config.config_file is not None:
            settings, self._file_vms = load_config_file(config.config_file)
            self._apply_file_settings(settings)
        vms = self.config.command_line_vms() + self._file_vms
        if not vms:
            raise ConfigError("nothing to serve: give --connect, --listen or --config")
        _check_unique(vms)
        _raise_descriptor_limit(len(vms))
        if config.control is not None:
            check_control_path(config.control)
        prepared: list[_Prepared] = []
        try:
            if self.config.trace is not None:
                self._trace = TraceWriter(self.config.trace, source="ccidemu serve",
                                          secrets=self.config.trace_secrets)
                self.tracing = True
            for vm_config in vms:
                prepared.append(self._prepare(vm_config))
            control_sock = None
            if config.control is not None:
                control_sock = bind_unix(config.control.path)
                if not systemd.is_passed(control_sock):
                    self._control_path = config.control.path  # ours to remove at the end
            systemd.close_unused()
        except BaseException:
            for p in prepared:
                p.discard()
            if self._trace is not None:
                self._trace.close()
            raise
        self.loop.start()

        def begin() -> None:
            for p in prepared:
                self._start_vm(p)
            if control_sock is not None:
                self._control = ControlServer(self.loop, control_sock, config.control,
                                              self._handle)
                log.info("control socket on %s", config.control)

        self.loop.call_in_loop(begin)
        self._started = True
        if self._reload_pending:
            self.request_reload()

    def _apply_file_settings(self, settings: dict[str, Any]) -> None:
        config = self.config
        if "trace" in settings and config.trace is None:
            config.trace = settings["trace"]
        if settings.get("trace_secrets"):
            config.trace_secrets = True
        if "card_timeout" in settings and config.card_timeout == 30.0:  # not given on the CLI
            config.card_timeout = settings["card_timeout"]
            self.host.timeout = config.card_timeout

    def serve_forever(self) -> None:
        """Serve until :meth:`request_stop`, then stop in order (caller's thread)."""
        while not self._stop.wait(3600):
            pass
        self.close()

    def request_stop(self) -> None:
        """Stop serving (any thread, signal handlers too)."""
        self._stop.set()

    def request_reload(self) -> None:
        """Re-read the config file (SIGHUP); errors are logged, nothing changes on a bad file.

        Asked for while :meth:`start` runs, it happens right after start-up."""
        self._reload_pending = True
        if self.loop.running and self._started:
            self._reload_pending = False
            self.loop.call_soon(lambda: self._reload(_log_reply))

    def close(self) -> None:
        """Remove every card and reader (after responses in flight), close everything."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self.loop.running:
            with contextlib.suppress(TimeoutError):
                self.loop.call_in_loop(self._begin_shutdown)
            deadline = time.monotonic() + SHUTDOWN_GRACE
            while time.monotonic() < deadline:
                try:
                    if self.loop.call_in_loop(self._all_finished):
                        break
                except TimeoutError:
                    break
                time.sleep(0.01)
            with contextlib.suppress(TimeoutError):
                self.loop.call_in_loop(self._finish_all)
            for pool in list(self._pools.values()):  # its threads end; its cards let go
                pool.close()
            # let the last writes (CardRemove, ReaderRemove) go out
            deadline = time.monotonic() + SHUTDOWN_GRACE
            while time.monotonic() < deadline:
                try:
                    if self.loop.call_in_loop(self._all_written):
                        break
                except TimeoutError:
                    break
                time.sleep(0.01)
            self.loop.stop()
        self.host.close()
        self.resolver.shutdown(wait=False, cancel_futures=True)
        if self._trace is not None:
            self._trace.close()
            self._trace = None
        if self._control_path is not None:
            with contextlib.suppress(OSError):
                self._control_path.unlink()
        self._stopped.set()
        log.info("stopped")

    def _begin_shutdown(self) -> None:
        if self._control is not None:
            self._control.close()
        for vm in self.vms.values():
            self._retire(vm)

    def _retire(self, vm: Vm) -> None:
        """Shutting ``vm`` down: stuck blocking calls are cancelled, touch waits end."""
        vm.begin_shutdown()
        for reader in vm.readers:
            if reader.touch is not None:
                reader.touch.close()
            self.host.retire(reader)

    def _all_finished(self) -> bool:
        return all(vm.finished for vm in self.vms.values())

    def _finish_all(self) -> None:
        for vm in list(self.vms.values()):
            vm.finish()

    def _all_written(self) -> bool:
        return all(vm.channel is None or vm.channel.transport is None
                   or vm.channel.transport.closed for vm in self.vms.values())

    # ---------------------------------------------------------------- VMs

    def _prepare(self, config: VmConfig) -> _Prepared:
        """Lock the VM's state, open its cards, bind its listen sockets (any thread)."""
        lock = None
        try:
            if config.state_dir is not None and not config.read_only:
                ensure_private_dir(Path(config.state_dir), f"state directory of vm {config.name}")
                lock = DirectoryLock(Path(config.state_dir), f"vm {config.name}")
            elif config.state_dir is not None:
                if not Path(config.state_dir).is_dir():
                    raise ConfigError(f"vm {config.name}: --read-only state directory "
                                      f"{config.state_dir} does not exist")
                log.info("vm %s: read-only: card state is read from %s; PIN tries, keys "
                         "and objects the guest changes are not saved", config.name,
                         config.state_dir)
            if config.state_dir is not None and not config.read_only:
                specs = [s for s in config.cards if not s.startswith("test:")]
                twice = sorted({s for s in specs if specs.count(s) > 1})
                if twice:
                    raise ConfigError(
                        f"vm {config.name}: card {twice[0]} is given twice; both readers "
                        "would write one state file (give each its own card files)")
            if config.spice is not None:
                check_one_card(list(config.cards), f"vm {config.name}: a SPICE endpoint")
            readers: list[Reader] = []
            sets: list[tuple[str, ReaderSet]] = []
            options = config.card_options()
            for spec in config.cards:
                touch = None
                try:
                    if is_reader_set(spec):
                        sets.append((spec, open_reader_set(spec, options)))
                        continue
                    touch = config.touch.sensor()
                    card = open_card(spec, replace(options, touch=touch))
                except ConfigError as exc:
                    raise ConfigError(f"vm {config.name}: {exc}") from None
                # a card that reports its presence is empty until it says otherwise
                readers.append(Reader(len(readers), spec, card, touch=touch,
                                      present=not isinstance(card, ReaderEvents),
                                      owner=f"vm {config.name}"))
            if config.compare is not None:
                readers[:1] = [self._compared(config, readers)]
            prepared = _Prepared(config, readers, lock, sets=sets)
            if config.listen is not None:
                prepared.socks = bind_listen_socket(config)
            return prepared
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @staticmethod
    def _compared(config: VmConfig, readers: list[Reader]) -> Reader:
        """Reader 0 with its card wrapped for ``--compare`` (the reference card is opened in
        memory: it never writes state)."""
        from vmc.backends.compare import ComparingCard

        spec = config.compare
        assert spec is not None
        if not readers:
            raise ConfigError(f"vm {config.name}: --compare needs a card to compare (the VM's "
                              "first --card), not only a set of readers such as pcsc:*")
        if is_reader_set(spec) or spec in config.cards:
            raise ConfigError(f"vm {config.name}: --compare {spec}: give another card than the "
                              "VM's own, e.g. piv:DIR")
        try:
            reference = open_card(spec, CardOptions(read_only=True))
        except ConfigError as exc:
            raise ConfigError(f"vm {config.name}: --compare: {exc}") from None
        first = readers[0]
        return Reader(0, first.spec, ComparingCard(first.card, reference, spec), present=False,
                      touch=first.touch, owner=first.owner)

    def _start_vm(self, prepared: _Prepared) -> Vm:  # loop thread
        vm = Vm(prepared.config, next(self._ids), prepared.readers, self,
                state_lock=prepared.lock)
        self.vms[vm.name] = vm
        try:
            vm.start(prepared.socks)
        except BaseException:  # (a bug) nothing of the VM stays behind: its name, sockets, lock
            del self.vms[vm.name]
            vm.stop_accepting()
            prepared.discard()
            raise
        for spec, readers in prepared.sets:
            pool = self._pools.get(spec)
            if pool is None:
                pool = self._pools[spec] = ReaderPool(
                    self.loop, spec, readers, _vm_options, self._off_loop)
            pool.join(vm)
        return vm

    def _off_loop(self, work: Callable[[], None]) -> None:
        try:
            self.resolver.submit(work)
        except RuntimeError:  # shutting down: do it here
            work()

    def _detach(self, vm: Vm, then: Callable[[], None]) -> None:  # loop thread
        self._retire(vm)
        deadline = time.monotonic() + SHUTDOWN_GRACE

        def wait() -> None:
            if not vm.finished and time.monotonic() < deadline:
                self.loop.call_later(0.01, wait)
                return
            vm.finish()
            if self.vms.get(vm.name) is vm:
                del self.vms[vm.name]
            for pool in self._pools.values():  # its host readers go to the VMs left
                pool.leave(vm)
            log.info("vm %s: detached", vm.name)
            then()

        wait()

    def _in_pool(self, work: Callable[[], Any], done: Callable[[Any], None],
                 failed: Callable[[BaseException], None]) -> None:
        """Run ``work`` in the opener pool; ``done``/``failed`` in the loop thread."""
        def finished(future: Any) -> None:  # a pool thread
            self.loop.call_soon(lambda: apply(future))

        def apply(future: Any) -> None:  # the loop thread
            exc = future.exception()
            if exc is not None:
                failed(exc)
                return
            try:
                done(future.result())
            except Exception as error:  # a bug: the request is answered all the same
                failed(error)

        try:
            self.resolver.submit(work).add_done_callback(finished)
        except RuntimeError:
            failed(ConfigError("the daemon is stopping"))

    # ---------------------------------------------------------------- what VMs report

    def trace(self, vm: Vm, done: ApduDone) -> None:
        if self._trace is None:
            return
        compare = compare_error = None
        if done.reader < len(vm.readers):
            take = getattr(vm.readers[done.reader].card, "take", None)
            comparison = take(done.command) if callable(take) else None
            if comparison is not None and comparison.differs:
                compare, compare_error = comparison.reference, comparison.error
        self._trace.exchange(done.command, done.response, reader=done.reader, session=vm.id,
                             duration=done.duration, error=done.error,
                             compare=compare if compare_error is None else None,
                             compare_error=compare_error)

    def trace_power(self, vm: Vm, kind: str, reader: int, atr: bytes | None = None) -> None:
        """A power or presence event of a reader (the card really powered on, off, taken
        out or put in): in the trace, so that replaying it against a card resets alike."""
        if self._trace is not None:
            self._trace.power(kind, reader=reader, session=vm.id, atr=atr)

    def session_started(self, vm: Vm, channel: VscChannel) -> None:
        self._sessions += 1
        self._sessions_total += 1
        vm.throttle.log(time.monotonic(), logging.INFO, "vm %s: connected (%s %s, peer %s)",
                        vm.name, vm.config.mode, vm.config.address, channel.peer)

    def session_ended(self, vm: Vm, channel: VscChannel, exc: Exception | None) -> None:
        self._sessions -= 1
        if channel.transport is not None:
            self._bytes[0] += channel.transport.bytes_in
            self._bytes[1] += channel.transport.bytes_out
        why = ""
        if exc is not None:
            why = f": {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
        vm.throttle.log(time.monotonic(), logging.INFO, "vm %s: disconnected%s", vm.name, why)

    # ---------------------------------------------------------------- control

    def request(self, request: dict[str, Any], peer_uid: int | None = None,
                timeout: float = 30.0) -> Any:
        """One control request from another thread (tests, in process): its result, or
        ControlError with the reason."""
        done = threading.Event()
        box: list[dict[str, Any]] = []

        def reply(answer: dict[str, Any]) -> None:
            box.append(answer)
            done.set()

        def run() -> None:
            try:
                self._handle(request, peer_uid, reply)
            except (ValueError, CcidemuError) as exc:
                reply({"ok": False, "error": str(exc)})
            except Exception as exc:
                internal_error(exc, reply)

        self.loop.call_soon(run)
        if not done.wait(timeout):
            raise ControlError("the daemon did not answer")
        answer = box[0]
        if not answer.get("ok"):
            raise ControlError(str(answer.get("error")))
        return answer.get("result")

    def _handle(self, request: dict[str, Any], peer_uid: int | None, reply: Reply) -> None:
        """One control request (loop thread); ``reply`` now or later, exactly once."""
        def ok(result: Any) -> None:
            reply({"ok": True, "result": result})

        def error(exc: BaseException) -> None:
            if not isinstance(exc, ValueError | CcidemuError):
                internal_error(exc, reply)
                return
            reply({"ok": False, "error": str(exc)})

        cmd = request.get("cmd")
        if cmd == "list":
            ok([vm.describe() for vm in sorted(self.vms.values(), key=lambda v: v.id)])
        elif cmd == "stats":
            ok(self._stats())
        elif cmd in ("insert", "remove"):
            self._insert_remove(request, peer_uid, ok, error)
        elif cmd == "attach":
            self._attach(request, peer_uid, ok, error)
        elif cmd == "detach":
            vm = self._vm(request)
            self._detach(vm, lambda: ok({"detached": vm.name}))
        elif cmd == "touch":
            ok(self._touch(request))
        elif cmd == "reload":
            self._reload(reply)
        else:
            raise ValueError(f"unknown command {cmd!r} ({', '.join(_COMMANDS)})")

    def _stats(self) -> dict[str, Any]:
        bytes_in, bytes_out = self._bytes
        errors = self.stats.errors
        pending = 0
        for vm in self.vms.values():
            pending += len(vm.pending)
            if vm.channel is not None:
                errors += vm.channel.engine.errors
                if vm.channel.transport is not None:
                    bytes_in += vm.channel.transport.bytes_in
                    bytes_out += vm.channel.transport.bytes_out
        return {
            "vms": len(self.vms),
            "sessions": self._sessions,
            "sessions_total": self._sessions_total,
            "pending": pending,
            "apdus": self.stats.apdus,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "errors": errors,
            "uptime": round(time.monotonic() - self.started_at, 3),
            "trace": (None if self._trace is None else
                      self._trace.failed or f"{self._trace.records} records"),
        }

    def _vm(self, request: dict[str, Any]) -> Vm:
        name, sid = request.get("vm"), request.get("session")
        if name is not None:
            if not isinstance(name, str):
                raise ValueError("'vm' must be a VM name")
            vm = self.vms.get(name)
            if vm is None:
                raise ValueError(f"no vm {name!r}")
            return vm
        if isinstance(sid, bool) or not isinstance(sid, int):
            raise ValueError("give 'vm' (a name) or 'session' (an integer id, see list)")
        for vm in self.vms.values():
            if vm.id == sid:
                return vm
        raise ValueError(f"no session {sid}")

    def _check_spec(self, spec: Any, peer_uid: int | None, *, one_card: bool = False
                    ) -> str | None:
        if spec is None:
            return None
        if not isinstance(spec, str) or not spec:
            raise ValueError("'card' must be a card spec string")
        if one_card and is_reader_set(spec):
            raise ValueError(f"{spec} names every reader, not one card: give it to a VM "
                             "(--card, cards, ctl attach), not to one reader")
        served = {s for vm in self.vms.values() for s in vm.config.cards}
        served |= set(self.config.cards)
        if peer_uid is not None and peer_uid != os.geteuid() and spec not in served:
            raise ValueError(f"card spec {spec!r} is not one this daemon serves; only its own "
                             "user may insert other cards")
        return spec

    def _reader_of(self, request: dict[str, Any]) -> tuple[Vm, int]:
        """The VM and reader index a control request names (``reader`` defaults to 0)."""
        vm = self._vm(request)
        index = request.get("reader", 0)
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError("'reader' must be an integer reader index")
        if not 0 <= index < len(vm.readers):
            raise ValueError(f"vm {vm.name} has no reader {index}")
        return vm, index

    def _insert_remove(self, request: dict[str, Any], peer_uid: int | None,
                       ok: Callable[[Any], None], error: Callable[[BaseException], None]
                       ) -> None:
        vm, index = self._reader_of(request)
        reader = vm.readers[index]
        if request["cmd"] == "remove":
            if not reader.present:
                raise ValueError(f"reader {index} has no card")
            self.host.set_presence(reader, CardRemoved())
            self.trace_power(vm, "remove", index)
            ok(vm.describe())
            return
        if reader.present:
            raise ValueError(f"reader {index} already has a card")
        spec = self._check_spec(request.get("card"), peer_uid, one_card=True)
        if spec is None:
            self.host.set_presence(reader, CardInserted())
            self.trace_power(vm, "insert", index)
            ok(vm.describe())
            return

        def opened(card: Card) -> None:
            if reader.present or vm.closed:
                error(ValueError(f"reader {index} changed meanwhile; not inserted"))
                return
            self.host.retire(reader)
            reader.replace_card(spec, card)
            if vm.channel is not None:
                vm.channel.card_changed(reader)
            self.host.watch(reader)
            self.host.set_presence(reader, CardInserted())
            self.trace_power(vm, "insert", index)
            ok(vm.describe())

        # Opening may take long (a PIV card: tens of ms): never in the loop thread.
        options = replace(vm.config.card_options(), touch=reader.touch)
        self._in_pool(lambda: open_card(spec, options), opened, error)

    def _touch(self, request: dict[str, Any]) -> dict[str, Any]:
        """``ctl touch``: press the touch button of one reader."""
        vm, index = self._reader_of(request)
        button = vm.readers[index].touch
        if not isinstance(button, TouchButton):
            raise ValueError(f"vm {vm.name} reader {index} is touched {vm.config.touch}, not "
                             "by a button (serve --touch button, or touch = \"button\")")
        waiting = button.waiting
        button.press()
        log.info("vm %s reader %d: touched%s", vm.name, index,
                 "" if waiting else " (nothing was waiting: the next request takes it)")
        return {"vm": vm.name, "reader": index, "waiting": waiting}

    def _attach(self, request: dict[str, Any], peer_uid: int | None,
                ok: Callable[[Any], None], error: Callable[[BaseException], None]) -> None:
        name = request.get("vm")
        if not isinstance(name, str) or not name:
            raise ValueError("'vm' must name the VM to attach")
        if name in self.vms:
            raise ValueError(f"vm {name!r} exists already (detach it first)")
        cards = request.get("cards") or list(self.config.cards) or [DEFAULT_CARD]
        if not isinstance(cards, list) or not all(isinstance(c, str) for c in cards):
            raise ValueError("'cards' must be a list of card specs")
        for spec in cards:
            self._check_spec(spec, peer_uid)
        listen, connect = request.get("listen"), request.get("connect")
        if (listen is None) == (connect is None):
            raise ValueError("give exactly one of 'listen' or 'connect'")
        address = parse_address(str(listen if listen is not None else connect))
        base = self.config.card_options.state_dir
        state_dir = request.get("state_dir")
        if state_dir is not None and not isinstance(state_dir, str):
            raise ValueError("'state_dir' must be a path")
        config = VmConfig(
            name=name,
            listen=address if listen is not None else None,
            connect=address if connect is not None else None,
            cards=tuple(cards),
            state_dir=(Path(state_dir) if state_dir is not None
                       else Path(base) / name if base is not None else None),
            read_only=self.config.card_options.read_only,
            allow_remote=self.config.allow_remote,
            socket=self.config.socket,
            usb_ccid_workaround=self.config.usb_ccid_workaround,
            touch=self.config.touch,
            pcsc_exclusive=self.config.pcsc_exclusive,
            pcsc_allow=self.config.pcsc_allow,
            origin="ctl attach",
        )
        _check_unique([*(vm.config for vm in self.vms.values()), config])

        def started(prepared: _Prepared) -> None:
            if self._closed or name in self.vms:
                prepared.discard()
                error(ValueError(f"vm {name!r} was attached meanwhile"))
                return
            ok(self._start_vm(prepared).describe())

        self._in_pool(lambda: self._prepare(config), started, error)

    def _not_serving(self, name: str) -> bool:
        """VM ``name`` is not serving: not attached, or its SPICE link gave up."""
        vm = self.vms.get(name)
        return vm is None or (vm.spice is not None and vm.spice.fatal is not None)

    def _reload(self, reply: Reply) -> None:
        """Re-read the config file; touch only the VMs whose settings changed (loop thread)."""
        path = self.config.config_file
        if path is None:
            reply({"ok": False, "error": "no --config file to reload"})
            return
        try:
            _settings, new = load_config_file(path)
            others = [vm.config for vm in self.vms.values() if vm.config.origin != str(path)]
            _check_unique(others + new)
        except ConfigError as exc:
            log.error("reload: %s; nothing changed", exc)
            reply({"ok": False, "error": f"{exc}; nothing changed"})
            return
        systemd.notify("RELOADING=1")
        old = {c.name: c for c in self._file_vms}
        wanted = {c.name: c for c in new}
        # An unchanged VM that is not serving (detached by ctl, left detached by a failed
        # reload, or a SPICE endpoint that gave up) is started again: the file wants it.
        stopped = {n for n in wanted if n in old and wanted[n] == old[n] and self._not_serving(n)}
        gone = [n for n in old if n not in wanted or wanted[n] != old[n]
                or (n in stopped and n in self.vms)]
        added = [n for n in wanted if n not in old or wanted[n] != old[n] or n in stopped]
        self._file_vms = new
        summary: dict[str, Any] = {"detached": [], "attached": [], "unchanged": sorted(
            n for n in wanted if n in old and wanted[n] == old[n] and n not in stopped),
            "errors": []}
        steps = [("detach", n) for n in gone] + [("attach", n) for n in added]

        def step() -> None:
            if not steps:
                log.info("reload: %s", summary)
                systemd.notify(f"READY=1\nSTATUS=serving {len(self.vms)} VMs")
                reply({"ok": not summary["errors"], "result": summary,
                       "error": "; ".join(summary["errors"])})
                return
            action, name = steps.pop(0)
            if action == "detach":
                vm = self.vms.get(name)
                if vm is None:
                    step()
                    return
                summary["detached"].append(name)
                self._detach(vm, step)
                return
            config = wanted[name]

            def started(prepared: _Prepared) -> None:
                self._start_vm(prepared)
                summary["attached"].append(name)
                step()

            def failed(exc: BaseException) -> None:
                log.error("reload: vm %s: %s", name, exc)
                summary["errors"].append(f"vm {name}: {exc}")
                step()

            self._in_pool(lambda: self._prepare(config), started, failed)

        step()


def _vm_options(vm: PoolMember) -> CardOptions:
    assert isinstance(vm, Vm)
    return vm.config.card_options()


def _raise_descriptor_limit(vms: int) -> None:
    """Each VM needs a few descriptors (a listener, a connection, pending ones): raise the
    soft limit to the hard one, as servers do, and say so when even that looks short."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (OSError, ValueError):
        return
    if soft != resource.RLIM_INFINITY and soft < 4 * vms + 64:
        log.warning("%d VMs and only %d file descriptors (ulimit -n): VMs may be refused "
                    "connections under load", vms, soft)


def _log_reply(answer: dict[str, Any]) -> None:
    if answer.get("ok"):
        log.info("reload done: %s", answer.get("result"))


def _check_unique(vms: list[VmConfig]) -> None:
    """ConfigError naming both VMs when two share a name, an address or a state directory."""
    seen: dict[Any, str] = {}
    for vm in vms:
        keys: list[tuple[str, Any]] = [("name", vm.name), ("address", str(vm.address))]
        if vm.state_dir is not None and not vm.read_only:
            keys.append(("state directory", str(Path(vm.state_dir).resolve())))
        for kind, key in keys:
            other = seen.get((kind, key))
            if other is not None:
                what = {"name": "are both named", "address": "both use",
                        "state directory": "would both keep card state in"}[kind]
                raise ConfigError(f"vm {other} and vm {vm.name} {what} {key}")
            seen[(kind, key)] = vm.name

