"""What ``ccidemu serve`` serves: global options and one :class:`VmConfig` per VM.

VMs come from the command line (each ``--connect``/``--listen`` is a VM with every
``--card``) and from a TOML file (``--config FILE``, re-read by ``ctl reload`` and SIGHUP)::

    state_dir = "/var/lib/ccidemu"        # each VM's card state under state_dir/<name>
    trace = "/var/log/ccidemu/apdu.jsonl" # optional, as --trace
    [vm.alice]
    listen = "unix:/run/ccidemu/alice.sock"
    cards = ["piv:/etc/ccidemu/alice"]
    socket_group = "kvm"                  # unix listen socket: owner, group, mode
    socket_mode = "0660"
    [vm.bob]
    connect = "tcp:127.0.0.1:2002"
    cards = ["piv:/etc/ccidemu/test-card"]

Every key is documented in docs/CONFIG.md.  A bad file is one :class:`ConfigError` naming the
file, the line and the key.
"""

from __future__ import annotations

import grp
import pwd
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ccidemu.cards import CardOptions
from ccidemu.errors import ConfigError
from vmc.addr import Address, UnixAddress, parse_address
from vmc.spice import SPICE_OPTION_KEYS, SpiceTarget, parse_spice_address, read_password_file
from vmc.touch import TouchSetting, parse_touch

__all__ = [
    "DEFAULT_CARD",
    "DEFAULT_CONNECT",
    "ServeConfig",
    "SocketOptions",
    "VmConfig",
    "load_config_file",
    "parse_socket_mode",
]

#: The card every reader gets when no ``--card`` is given.
DEFAULT_CARD = "piv:"
#: Where to connect when neither ``--connect`` nor ``--listen`` is given (QEMU docs' port).
DEFAULT_CONNECT = "tcp:127.0.0.1:2001"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_GLOBAL_KEYS = {"state_dir", "trace", "trace_secrets", "read_only", "allow_remote",
                "card_timeout", "touch", "vm"}
_VM_KEYS = {"listen", "connect", "spice", "cards", "state_dir", "read_only", "allow_remote",
            "touch",
            "socket_owner", "socket_group", "socket_mode", "usb_ccid_workaround",
            "pcsc_exclusive", "pcsc_allow", "compare", *SPICE_OPTION_KEYS}
_SPICE_KEYS = set(SPICE_OPTION_KEYS)


@dataclass(frozen=True)
class SocketOptions:
    """Who may connect to a unix listen socket: ``chown``/``chmod`` after it is made.

    QEMU started by libvirt runs as ``libvirt-qemu:kvm``: it cannot open a 0600 socket of
    root's (docs/DEPLOY.md); ``socket_group="kvm"`` with mode 0660 lets it in.
    """

    owner: int | None = None  # uid
    group: int | None = None  # gid
    mode: int = 0o600


@dataclass(frozen=True)
class VmConfig:
    """One VM: where its chardev is, its cards, where its card state lives."""

    name: str
    connect: Address | None = None
    listen: Address | None = None
    spice: SpiceTarget | None = None  # the VM's SPICE server (vmc/runtime/spice_link.py)
    cards: tuple[str, ...] = (DEFAULT_CARD,)
    state_dir: Path | None = None  # this VM's own directory (never shared with another VM)
    read_only: bool = False
    allow_remote: bool = False
    socket: SocketOptions = field(default_factory=SocketOptions)
    #: split answers QEMU 7.2's usb-ccid loses or refuses (vmc.runtime.shaping)
    usb_ccid_workaround: bool = True
    touch: TouchSetting = field(default_factory=TouchSetting)  # each reader its own sensor
    #: pcsc: cards hold their reader exclusively
    pcsc_exclusive: bool = False
    #: pcsc: the readers this VM may get (regular expressions searched in the names)
    pcsc_allow: tuple[str, ...] = ()
    #: a reference card every APDU of reader 0 also goes to (vmc.backends.compare)
    compare: str | None = None
    origin: str = "command line"  # "FILE" for VMs from the config file, "ctl attach"

    @property
    def address(self) -> Address | SpiceTarget:
        address = self.listen or self.connect or self.spice
        assert address is not None
        return address

    @property
    def mode(self) -> str:
        return "listen" if self.listen else "connect" if self.connect else "spice"

    def card_options(self) -> CardOptions:
        return CardOptions(state_dir=self.state_dir, read_only=self.read_only,
                           exclusive=self.pcsc_exclusive, allow_readers=self.pcsc_allow)


@dataclass
class ServeConfig:
    """Everything ``ccidemu serve`` was asked to do.

    ``connect``/``listen``/``cards``/``card_options`` are the command line's VMs (one per
    address, each with every card); ``config_file`` adds the VMs of a TOML file.
    """

    connect: list[Address] = field(default_factory=list)
    listen: list[Address] = field(default_factory=list)
    cards: list[str] = field(default_factory=lambda: [DEFAULT_CARD])
    control: UnixAddress | None = None
    trace: Path | None = None
    trace_secrets: bool = False
    allow_remote: bool = False  # --listen beyond loopback
    card_options: CardOptions = field(default_factory=CardOptions)
    socket: SocketOptions = field(default_factory=SocketOptions)
    config_file: Path | None = None
    card_timeout: float = 30.0
    usb_ccid_workaround: bool = True
    touch: TouchSetting = field(default_factory=TouchSetting)  # --touch
    spice: SpiceTarget | None = None  # --spice: one more VM, on a SPICE server
    pcsc_exclusive: bool = False
    pcsc_allow: tuple[str, ...] = ()
    compare: str | None = None
    #: the config file's VMs as last loaded (set by load_config_file / the daemon)
    file_vms: list[VmConfig] = field(default_factory=list)

    def command_line_vms(self) -> list[VmConfig]:
        """One VM per ``--connect``/``--listen``, named vm1, vm2, ... in that order.

        With one VM its state is ``--state-dir`` itself (as before VMs had names); with
        several, each has ``--state-dir/<its address>`` (stable when the order changes).
        """
        endpoints: list[tuple[str, Address | SpiceTarget]] = [
            ("connect", a) for a in self.connect]
        endpoints += [("listen", a) for a in self.listen]
        if self.spice is not None:
            endpoints.append(("spice", self.spice))
        vms = []
        base = self.card_options.state_dir
        for n, (mode, address) in enumerate(endpoints, 1):
            state_dir = base
            if base is not None and len(endpoints) > 1:
                state_dir = Path(base) / _safe_name(f"{mode}-{address}")
            vms.append(VmConfig(
                name=f"vm{n}",
                connect=address if mode == "connect" else None,  # type: ignore[arg-type]
                listen=address if mode == "listen" else None,  # type: ignore[arg-type]
                spice=address if isinstance(address, SpiceTarget) else None,
                cards=tuple(self.cards) or (DEFAULT_CARD,),
                state_dir=state_dir,
                read_only=self.card_options.read_only,
                allow_remote=self.allow_remote,
                socket=self.socket,
                usb_ccid_workaround=self.usb_ccid_workaround,
                touch=self.touch,
                pcsc_exclusive=self.pcsc_exclusive,
                pcsc_allow=self.pcsc_allow,
                compare=self.compare,
            ))
        return vms

    def all_vms(self) -> list[VmConfig]:
        return self.command_line_vms() + list(self.file_vms)


def check_patterns(patterns: object, what: str = "pcsc_allow") -> tuple[str, ...]:
    """A list of regular expressions (reader names); ConfigError naming the bad one."""
    if not isinstance(patterns, list | tuple) or not all(
            isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"{what} must be a list of regular expressions, e.g. [\"^Yubico\"]")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{what}: {pattern!r} is not a regular expression ({exc})"
                              ) from None
    return tuple(patterns)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:120] or "vm"


def parse_socket_mode(value: object, what: str = "socket mode") -> int:
    """``"0660"`` or ``"660"`` (octal text), or an int (the mode itself, e.g. ``0o660``);
    ConfigError unless it is 0000 to 0777."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an octal string such as \"0660\"")
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise ConfigError(f"{what} {value!r} is not an octal mode such as 0660") from None
    elif isinstance(value, int):
        mode = value
    else:
        raise ConfigError(f"{what} must be an octal string such as \"0660\"")
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{what} {value!r} is not a file mode (0000 to 0777)")
    return mode


def parse_owner(value: object, what: str = "socket owner") -> int:
    """A user name or uid; ConfigError naming it when there is no such user."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value:
        if value.isdigit():
            return int(value)
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            raise ConfigError(f"{what}: no user {value!r} on this host") from None
    raise ConfigError(f"{what} must be a user name or uid")


def parse_group(value: object, what: str = "socket group") -> int:
    """A group name or gid; ConfigError naming it when there is no such group."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value:
        if value.isdigit():
            return int(value)
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise ConfigError(f"{what}: no group {value!r} on this host") from None
    raise ConfigError(f"{what} must be a group name or gid")


# --------------------------------------------------------------------------- the TOML file


class _Source:
    """The file's text, to point errors at the line of a key."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, table: tuple[str, ...], key: str | None) -> int | None:
        start = 0
        if table:
            pattern = re.compile(
                r"^\s*\[\s*" + r"\s*\.\s*".join(rf'(?:"{re.escape(t)}"|{re.escape(t)})'
                                                for t in table) + r"\s*\]")
            for i, line in enumerate(self.lines):
                if pattern.match(line):
                    start = i
                    break
            else:
                return None
            if key is None:
                return start + 1
        key_re = re.compile(rf'^\s*(?:"{re.escape(key or "")}"|{re.escape(key or "")})\s*=')
        for i in range(start + (1 if table else 0), len(self.lines)):
            line = self.lines[i]
            if table and line.lstrip().startswith("["):
                break
            if not table and line.lstrip().startswith("["):
                break
            if key_re.match(line):
                return i + 1
        return start + 1 if table else None

    def error(self, table: tuple[str, ...], key: str | None, message: str) -> ConfigError:
        line = self.line_of(table, key)
        where = f"{self.path}:{line}" if line else str(self.path)
        name = ".".join(table) + (f".{key}" if key and table else key or "")
        return ConfigError(f"{where}: {name}: {message}")


def load_config_file(path: Path) -> tuple[dict[str, Any], list[VmConfig]]:
    """The global settings and the VMs of a config file.  ConfigError naming file, line, key.

    The global settings come back as keyword arguments for :class:`ServeConfig` fields
    (``state_dir``, ``trace``, ...); only the keys the file sets.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply") from None
    source = _Source(path, text)
    base = path.parent
    unknown = sorted(set(data) - _GLOBAL_KEYS)
    if unknown:
        raise source.error((), unknown[0], f"unknown setting (known: "
                           f"{', '.join(sorted(_GLOBAL_KEYS))})")
    settings: dict[str, Any] = {}
    state_dir: Path | None = None
    if "state_dir" in data:
        state_dir = _path(source, (), "state_dir", data["state_dir"], base)
    if "trace" in data:
        settings["trace"] = _path(source, (), "trace", data["trace"], base)
    for key in ("trace_secrets", "read_only", "allow_remote"):
        if key in data:
            settings[key] = _bool(source, (), key, data[key])
    if "card_timeout" in data:
        value = data["card_timeout"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
            raise source.error((), "card_timeout", "must be a number of seconds (0-3600)")
        settings["card_timeout"] = float(value)
    vms_table = data.get("vm", {})
    if not isinstance(vms_table, dict):
        raise source.error((), "vm", "must be tables [vm.NAME]")
    if "touch" in data:
        settings["touch"] = _touch(source, (), data["touch"])
    vms = []
    defaults: dict[str, Any] = {key: settings.get(key, False)
                                for key in ("read_only", "allow_remote")}
    defaults["touch"] = settings.get("touch", TouchSetting())
    for name, table in vms_table.items():
        vms.append(_vm(source, name, table, base, state_dir, defaults))
    if state_dir is not None:
        settings["state_dir"] = state_dir
    return settings, vms


def _touch(source: _Source, where: tuple[str, ...], value: Any) -> TouchSetting:
    if not isinstance(value, str):
        raise source.error(where, "touch", 'must be "auto", "delay:SECONDS" or '
                           '"button[:TIMEOUT]"')
    try:
        return parse_touch(value)
    except ConfigError as exc:
        raise source.error(where, "touch", str(exc)) from None


def _vm(source: _Source, name: str, table: Any, base: Path, state_dir: Path | None,
        defaults: dict[str, Any]) -> VmConfig:
    where = ("vm", name)
    if not _NAME_RE.match(name):
        raise source.error(where, None, "a VM name is 1-64 letters, digits, '_', '.' or '-'")
    if not isinstance(table, dict):
        raise source.error(("vm",), name, "must be a table [vm.NAME]")
    unknown = sorted(set(table) - _VM_KEYS)
    if unknown:
        raise source.error(where, unknown[0],
                           f"unknown setting (known: {', '.join(sorted(_VM_KEYS))})")
    addresses = {key: table[key] for key in ("listen", "connect", "spice") if key in table}
    if len(addresses) != 1:
        raise source.error(where, None, "give exactly one of listen, connect or spice")
    (mode, text), = addresses.items()
    cards = table.get("cards", [DEFAULT_CARD])
    if (not isinstance(cards, list) or not cards
            or not all(isinstance(c, str) and c for c in cards)):
        raise source.error(where, "cards", 'must be a list of card specs, e.g. ["piv:DIR"]')
    spice = None
    address: Address | None = None
    if mode == "spice":
        spice = _spice_target(source, where, table, text, base)
        if len(cards) != 1:
            raise source.error(where, "cards", "a SPICE session carries one reader: give one "
                               "card (docs/PROTOCOL.md, \"SPICE\")")
    else:
        given = sorted(_SPICE_KEYS & set(table))
        if given:
            raise source.error(where, given[0], "applies to a spice endpoint only")
        if not isinstance(text, str):
            raise source.error(where, mode,
                               "must be an address string: unix:PATH or tcp:HOST:PORT")
        try:
            address = parse_address(text)
        except ConfigError as exc:
            raise source.error(where, mode, str(exc)) from None
        if isinstance(address, UnixAddress) and not address.path.is_absolute():
            address = UnixAddress(base / address.path)
    own_state = (_path(source, where, "state_dir", table["state_dir"], base)
                 if "state_dir" in table else
                 (state_dir / name if state_dir is not None else None))
    options = SocketOptions()
    parsers = (("socket_mode", "mode", parse_socket_mode), ("socket_owner", "owner", parse_owner),
               ("socket_group", "group", parse_group))
    for key, attribute, parse in parsers:
        if key in table:
            try:
                options = replace(options, **{attribute: parse(table[key], key)})
            except ConfigError as exc:
                message = str(exc).removeprefix(f"{key}: ").removeprefix(f"{key} ")
                raise source.error(where, key, message) from None
            if mode != "listen" or not isinstance(address, UnixAddress):
                raise source.error(where, key, "applies to unix listen sockets only")
    return VmConfig(
        name=name,
        connect=address if mode == "connect" else None,
        listen=address if mode == "listen" else None,
        spice=spice,
        cards=tuple(cards),
        state_dir=own_state,
        read_only=(_bool(source, where, "read_only", table["read_only"])
                   if "read_only" in table else defaults["read_only"]),
        allow_remote=(_bool(source, where, "allow_remote", table["allow_remote"])
                      if "allow_remote" in table else defaults["allow_remote"]),
        socket=options,
        usb_ccid_workaround=(_bool(source, where, "usb_ccid_workaround",
                                   table["usb_ccid_workaround"])
                             if "usb_ccid_workaround" in table else True),
        touch=(_touch(source, where, table["touch"]) if "touch" in table
               else defaults["touch"]),
        pcsc_exclusive=(_bool(source, where, "pcsc_exclusive", table["pcsc_exclusive"])
                        if "pcsc_exclusive" in table else False),
        pcsc_allow=_patterns(source, where, table),
        compare=_compare(source, where, table),
        origin=str(source.path),
    )


def _spice_target(source: _Source, where: tuple[str, ...], table: dict[str, Any], text: Any,
                  base: Path) -> SpiceTarget:
    if not isinstance(text, str):
        raise source.error(where, "spice", "must be HOST:PORT")
    try:
        host, port = parse_spice_address(text)
    except ConfigError as exc:
        raise source.error(where, "spice", str(exc)) from None
    tls_port = table.get("spice_tls_port")
    if tls_port is not None and (isinstance(tls_port, bool) or not isinstance(tls_port, int)):
        raise source.error(where, "spice_tls_port", "must be a port number")
    ca_file = (_path(source, where, "spice_ca_file", table["spice_ca_file"], base)
               if "spice_ca_file" in table else None)
    subject = table.get("spice_host_subject")
    if subject is not None and not isinstance(subject, str):
        raise source.error(where, "spice_host_subject", "must be a subject string")
    password = ""
    if "spice_password_file" in table:
        password_file = _path(source, where, "spice_password_file",
                              table["spice_password_file"], base)
        try:
            password = read_password_file(password_file)
        except ConfigError as exc:
            raise source.error(where, "spice_password_file", str(exc)) from None
    try:
        return SpiceTarget(host, port, tls_port, ca_file, subject, password)
    except ConfigError as exc:
        raise source.error(where, "spice", str(exc)) from None


def _patterns(source: _Source, where: tuple[str, ...], table: dict[str, Any]
              ) -> tuple[str, ...]:
    if "pcsc_allow" not in table:
        return ()
    try:
        return check_patterns(table["pcsc_allow"], "pcsc_allow")
    except ConfigError as exc:
        raise source.error(where, "pcsc_allow", str(exc).removeprefix("pcsc_allow")
                           .lstrip(": ")) from None


def _compare(source: _Source, where: tuple[str, ...], table: dict[str, Any]) -> str | None:
    if "compare" not in table:
        return None
    value = table["compare"]
    if not isinstance(value, str) or ":" not in value:
        raise source.error(where, "compare", 'must be a card spec, e.g. "piv:DIR"')
    return value


def _path(source: _Source, table: tuple[str, ...], key: str, value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise source.error(table, key, "must be a path string")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _bool(source: _Source, table: tuple[str, ...], key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise source.error(table, key, "must be true or false")
    return value

