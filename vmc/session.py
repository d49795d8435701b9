"""The VSCard session engine: one chardev connection to QEMU (or one SPICE smartcard channel).

Sans-I/O: bytes from the peer and card answers go in, bytes for the peer and card requests
come out; the current time is passed in as ``now`` (seconds, any monotonic clock).  The I/O
adapter is :mod:`vmc.daemon`.  Spec: libcacard ``vscard_common.h``; QEMU 7.2's behaviour as
recorded in docs/PROTOCOL.md, "VSCard".

Theory of operation
-------------------
We are the VSCard *client* (the card side, like libcacard's ``vscclient``); the peer is the
*host* (QEMU's ``ccid-card-passthru``).  A session:

1. :meth:`VscSession.start` queues our ``Init`` (reader id 0) and a :class:`PowerOn` request for
   every reader that holds a card, so that ATRs are ready early.
2. The first ``Init`` from the peer (QEMU's reply to ours, or the unsolicited one it sends as a
   chardev client) completes the handshake.  Every later ``Init`` is logged and ignored: QEMU
   replies once per Init we send, and the handshake must never run twice.
3. Readers are added one at a time: ``ReaderAdd``, then the answer ``Error(SUCCESS)`` whose
   ``reader_id`` *is* the id the host gave the reader.  Then its ATR is sent (card inserted),
   then the next reader is added.  A refusal (``CANNOT_ADD_MORE_READERS``: QEMU takes one
   reader per ``usb-ccid``) leaves that reader out; an ATR the host refuses (QEMU checks it)
   leaves the reader without a card, with a warning that says why.
4. The host acknowledges ReaderAdd, ReaderRemove, ATR and CardRemove with an ``Error`` each, in
   order, so the engine matches each incoming ``Error`` with the oldest unanswered one of those.
5. An ``APDU`` from the host is routed by reader id to its reader: a :class:`Transmit` request
   comes out; the answer goes back in through :meth:`transmit_done` (or :meth:`transmit_failed`,
   answered with ``Error(GENERAL_ERROR)``, which makes the guest's transmit fail at once).
   Exactly one APDU per reader is with the card; more are queued (bounded) in arrival order.
6. ``CardRemove`` is never sent while a response is owed: a removal asked for meanwhile waits
   until the response has been written (QEMU drops a response that follows a CardRemove).
7. ``Flush`` is answered with ``FlushComplete`` once the APDUs received before it have been
   answered (QEMU never sends Flush; libcacard answers it); an unknown type (or a message
   that only a client sends) with ``Error(GENERAL_ERROR)``.
8. A malformed stream (bad frame, over-long length) closes the session: a :class:`Closed`
   action comes out and every later input is ignored.  Peer input never raises.
9. :meth:`shutdown` removes every card and reader (CardRemove, ReaderRemove) after the responses
   in flight; :attr:`finished` turns true when nothing more is owed to the peer.

Readers are known by their *index* (their position in the reader list, stable from the start);
the host's reader id is learnt in step 3.  Requests carry a ``token`` so that an answer that
arrives after the card was removed (a slow blocking card) is recognised and dropped.

Readers can also come and go while the session runs (a host reader plugged in or pulled
out): :meth:`VscSession.add_reader` offers a new one, :meth:`~VscSession.unplug_reader` sends
CardRemove and ReaderRemove (after a response in flight), :meth:`~VscSession.replug_reader`
offers it again.

The engine never calls a card: it asks for card work with actions, and the adapter (the card
host of :mod:`vmc.runtime`) decides how to run it.  Log lines a peer can cause are rate
limited per session (:class:`vmc.throttle.LogThrottle`).

The hot path
------------
:meth:`VscSession.fast_reader` is an optional shortcut for the adapter: when a read holds
exactly one whole APDU frame for a reader marked inline (:meth:`~VscSession.set_inline`) and
nothing else is going on (nothing buffered, queued, in flight, owed or being removed; no
trace or debug logging), it names the reader; the adapter gets the card's answer at once and
:meth:`~VscSession.fast_answer` (or :meth:`~VscSession.fast_failed`) returns the bytes for the
peer: no action object, no output queue.  The result, output bytes and state alike, is the
same as :meth:`receive_data` followed by the ``Transmit`` -> :meth:`transmit_done` /
:meth:`transmit_failed` round (a test compares them).
"""

from __future__ import annotations

import enum
import logging
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ccidemu.atr import qemu_accepts
from ccidemu.errors import DecodeError
from ccidemu.redact import Redactor, redact_command
from ccidemu.trace import TRAFFIC, describe_exchange
from ccidemu.vsc import (
    READER_ID_UNDEFINED,
    ByteOrder,
    VscApdu,
    VscAtr,
    VscCardRemove,
    VscConnection,
    VscError,
    VscErrorCode,
    VscFlush,
    VscFlushComplete,
    VscInit,
    VscMessage,
    VscReaderAdd,
    VscReaderRemove,
    describe_vsc,
    encode_vsc,
    split_version,
)
from vmc.throttle import LogThrottle

__all__ = [
    "MAX_MESSAGE_LENGTH",
    "ApduDone",
    "Closed",
    "PowerOff",
    "PowerOn",
    "ReaderInfo",
    "ReaderState",
    "SessionAction",
    "Transmit",
    "VscSession",
]

log = logging.getLogger(__name__)

#: Largest VSCard payload accepted from a peer: an extended command APDU (4 header bytes,
#: 3 Lc bytes, 65,535 data bytes, 2 Le bytes; ISO/IEC 7816-3:2006 section 12.1.3).  Anything
#: longer closes the session before a byte of it is buffered.
MAX_MESSAGE_LENGTH = 4 + 3 + 65535 + 2

_OUR_INIT_READER_ID = 0  # docs/PROTOCOL.md, "VSCard": our Init carries reader id 0
#: A request token is a counter above the reader index: unique, and O(1) back to its reader.
_INDEX_BITS = 16
_INDEX_MASK = (1 << _INDEX_BITS) - 1
MAX_READERS = 1 << _INDEX_BITS


# --------------------------------------------------------------------------------------------
# Actions: what the engine asks of its adapter
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PowerOn:
    """Power the card of reader ``reader`` on; answer with power_on_done(token, atr)."""

    reader: int
    token: int


@dataclass(frozen=True, slots=True)
class PowerOff:
    """The card of reader ``reader`` was removed: power it off (no answer expected)."""

    reader: int


@dataclass(frozen=True, slots=True)
class Transmit:
    """Give ``apdu`` to the card of ``reader``; answer with transmit_done/transmit_failed."""

    reader: int
    apdu: bytes
    token: int


@dataclass(frozen=True, slots=True)
class ApduDone:
    """An exchange finished (for traces and statistics); ``response`` is b"" on error."""

    reader: int
    reader_id: int
    command: bytes
    response: bytes
    started: float
    duration: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Closed:
    """The session is over: close the connection.  ``error`` when the peer broke the protocol."""

    reason: str
    error: bool


SessionAction = PowerOn | PowerOff | Transmit | ApduDone | Closed


class ReaderState(enum.StrEnum):
    WAITING = "waiting"  # not offered to the host yet
    ADDING = "adding"  # ReaderAdd sent, answer pending
    ADDED = "added"
    REFUSED = "refused"  # the host said no (CANNOT_ADD_MORE_READERS, ...)
    REMOVED = "removed"  # ReaderRemove sent (shutdown)


@dataclass(frozen=True, slots=True)
class ReaderInfo:
    """A snapshot of one reader for listings."""

    index: int
    name: str
    state: ReaderState
    reader_id: int | None
    present: bool  # a card is in (or going into) the reader
    inserted: bool  # the host has the card's ATR
    busy: bool  # an APDU is with the card
    apdu_count: int


class _Ack(enum.Enum):
    """Messages the host answers with an Error, in order."""

    READER_ADD = "ReaderAdd"
    ATR = "ATR"
    CARD_REMOVE = "CardRemove"
    READER_REMOVE = "ReaderRemove"


class _Reader:
    __slots__ = (
        "apdu_count",
        "atr",
        "in_flight",
        "index",
        "inline",
        "inserted",
        "name",
        "queue",
        "reader_id",
        "redactor",
        "remove_after_flight",
        "started",
        "state",
        "token",
        "unplugged",
        "want_card",
    )

    def __init__(self, index: int, name: str, want_card: bool) -> None:
        self.index = index
        self.name = name
        self.state = ReaderState.WAITING
        self.reader_id: int | None = None
        self.want_card = want_card
        self.atr: bytes | None = None
        self.inserted = False
        self.token = 0
        self.in_flight: bytes | None = None
        self.started = 0.0
        self.queue: deque[bytes] = deque()
        self.remove_after_flight = False
        self.apdu_count = 0
        self.inline = False  # the adapter answers this reader's APDUs at once (fast path)
        self.redactor = Redactor()  # for log lines (traces have their own)
        self.unplugged = False  # unplug_reader: removed, offered again by replug_reader


class VscSession:
    """One VSCard connection with any number of readers (see the module docstring).

    ``readers``: one name per reader, in the order they are offered to the host.
    ``present``: which readers start with a card (default: all).
    ``label``: prefix for log lines (e.g. ``"session 3"``).
    ``report_exchanges``: emit :class:`ApduDone` actions (for traces).
    ``peer_init``: the peer answers our Init with its own (QEMU's chardev does).  False for a
    peer that never sends one (the SPICE server drops QEMU's Init): the handshake is done as
    soon as ours is queued, and readers are added at once.
    ``throttle``: the log rate limit to use (default: one of its own).
    """

    def __init__(
        self,
        readers: Sequence[str],
        *,
        present: Sequence[bool] | None = None,
        label: str = "session",
        byteorder: ByteOrder = "big",
        max_length: int = MAX_MESSAGE_LENGTH,
        max_queue: int = 16,
        report_exchanges: bool = True,
        peer_init: bool = True,
        throttle: LogThrottle | None = None,
    ) -> None:
        flags = list(present) if present is not None else [True] * len(readers)
        if len(flags) != len(readers):
            raise ValueError("present must have one flag per reader")
        self.label = label
        self._byteorder: ByteOrder = byteorder
        self._conn = VscConnection(byteorder, max_length)
        self._max_length = max_length
        # vscard_common.h VSCMsgHeader (u32 type, reader_id, length) for the APDU hot path;
        # the codec (ccidemu.vsc) does every other message.
        self._header = struct.Struct(">III" if byteorder == "big" else "<III")
        self._readers = [
            _Reader(i, name, flag)
            for i, (name, flag) in enumerate(zip(readers, flags, strict=True))
        ]
        self._flushes: deque[int] = deque()  # reader ids of Flushes waiting for responses
        self._by_id: dict[int, _Reader] = {}
        self._acks: deque[tuple[_Ack, _Reader]] = deque()
        self._actions: deque[SessionAction] = deque()
        self._out: list[bytes] = []
        self._max_queue = max_queue
        self._report = report_exchanges
        self._next_token = 1
        self._started = False
        self._peer_init = peer_init
        self._handshake_done = False
        self._adding: _Reader | None = None
        self._shutting_down = False
        self._closed: str | None = None
        self.apdus = 0
        self.errors = 0
        self._now = 0.0  # the time of the latest input, for the log throttle
        #: rate limit of the log lines a peer can cause (shared by a VM's connections)
        self._throttle = throttle if throttle is not None else LogThrottle(log, label)
        self._owns_throttle = throttle is None

    # ---------------------------------------------------------------- state

    @property
    def handshake_done(self) -> bool:
        return self._handshake_done

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def tracing(self) -> bool:
        """The adapter asked for :class:`ApduDone` actions (``report_exchanges``)."""
        return self._report

    @property
    def has_output(self) -> bool:
        """Bytes are queued for the peer (:meth:`data_to_send`)."""
        return bool(self._out)

    @property
    def close_reason(self) -> str | None:
        return self._closed

    @property
    def finished(self) -> bool:
        """After :meth:`shutdown`: nothing more is owed to the peer (or the session is closed)."""
        if self._closed is not None:
            return True
        return (
            self._shutting_down
            and self._adding is None
            and all(r.in_flight is None for r in self._readers)
        )

    def readers(self) -> list[ReaderInfo]:
        return [
            ReaderInfo(
                r.index, r.name, r.state, r.reader_id, r.want_card, r.inserted,
                r.in_flight is not None, r.apdu_count,
            )
            for r in self._readers
        ]

    # ---------------------------------------------------------------- I/O side

    def start(self, now: float) -> None:
        """Queue our Init and power on the cards.  Call once, before anything else."""
        if self._started:
            return
        self._started = True
        self._send(VscInit(_OUR_INIT_READER_ID))
        for reader in self._readers:
            if reader.want_card:
                self._power_on(reader)
        if not self._peer_init:
            self._handshake_done = True
            self._info("%s: handshake done (the peer sends no Init)", self.label)
            self._add_next_reader()

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Bytes from the peer.  Never raises: a broken stream becomes a :class:`Closed` action."""
        if self._closed is not None:
            return
        self._now = now
        conn = self._conn
        # Fast path: exactly one whole APDU frame and nothing buffered (one guest APDU per
        # read is the common case).  Same result as the general path below.
        if len(data) >= 12 and not conn.buffered and not conn.dead:
            type_, reader_id, length = self._header.unpack_from(data)
            if type_ == 7 and length + 12 == len(data) and length <= self._max_length:
                if self._traffic:
                    self._traffic_in(reader_id, data[12:])
                self._on_apdu_data(reader_id, bytes(data[12:]), now)
                return
        try:
            conn.receive_data(data)
            while True:
                msg = conn.next_event()
                if msg is None:
                    break
                if type(msg) is VscApdu:  # the hot path
                    if self._traffic:
                        self._traffic_in(msg.reader_id, msg.data)
                    self._on_apdu_data(msg.reader_id, msg.data, now)
                else:
                    self._on_message(msg, now)
                if self._closed is not None:
                    return
        except DecodeError as exc:
            self._close(f"malformed VSCard stream from the peer: {exc}", error=True)

    def next_action(self) -> SessionAction | None:
        """The next request for the adapter, or None."""
        return self._actions.popleft() if self._actions else None

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call (coalesced), possibly b""."""
        if not self._out:
            return b""
        out = self._out
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def connection_lost(self, reason: str = "peer closed the connection") -> None:
        """The transport is gone: stop everything (no Closed action: the adapter knows)."""
        if self._closed is None:
            self._closed = reason
            self._actions.clear()
            self._out.clear()

    def set_inline(self, index: int, inline: bool) -> None:
        """Whether the adapter answers reader ``index``'s APDUs at once (:meth:`fast_reader`)."""
        self._reader(index).inline = inline

    def fast_reader(self, data: bytes | bytearray | memoryview, nbytes: int) -> int:
        """The hot path (module docstring): ``data[:nbytes]`` is one read from the peer.

        Returns the index of the reader whose APDU it is when the read can take the hot path
        (the APDU is ``data[12:nbytes]``), else -1 (give the read to :meth:`receive_data`).
        Nothing changes here: follow with :meth:`fast_answer` or :meth:`fast_failed`.
        """
        if (
            nbytes < 12
            or self._closed is not None
            or self._shutting_down
            or self._report
            or self._out
            or self._flushes
            or self._conn.buffered  # (a dead stream has closed the session: _closed is set)
        ):
            return -1
        type_, reader_id, length = self._header.unpack_from(data)
        if type_ != 7 or length + 12 != nbytes or length > self._max_length:
            return -1
        reader = self._by_id.get(reader_id)
        if (
            reader is None
            or not reader.inline
            or reader.in_flight is not None
            or reader.queue
            or not reader.inserted
            or reader.remove_after_flight
            or log.isEnabledFor(logging.DEBUG)
        ):
            return -1
        return reader.index

    def _fast_start(self, index: int, command: bytes, now: float) -> _Reader:
        # _on_apdu_data / _start_apdu without the Transmit action
        reader = self._readers[index]
        reader.in_flight = command
        reader.started = now
        reader.apdu_count += 1
        self.apdus += 1
        self._token(reader)
        return reader

    def fast_answer(self, index: int, command: bytes, response: bytes, now: float) -> bytes:
        """The card answered the hot-path APDU ``command``: the frame for the peer."""
        reader = self._fast_start(index, command, now)
        # transmit_done + _after_flight for this case (nothing queued, no removal, no Flush)
        reader.in_flight = None
        reader_id = reader.reader_id
        assert reader_id is not None
        return self._header.pack(7, reader_id, len(response)) + response

    def fast_failed(self, index: int, command: bytes, reason: str, now: float) -> bytes:
        """The card could not answer the hot-path APDU: the bytes for the peer (an Error)."""
        reader = self._fast_start(index, command, now)
        self.transmit_failed(reader.token, reason, now)
        return self.data_to_send()

    # ---------------------------------------------------------------- card side

    def power_on_done(self, token: int, atr: bytes, now: float) -> None:
        reader = self._reader_for(token)
        if reader is None or not reader.want_card or reader.atr is not None:
            return
        reader.atr = bytes(atr)
        self._maybe_send_atr(reader)

    def power_on_failed(self, token: int, reason: str, now: float) -> None:
        reader = self._reader_for(token)
        if reader is None or not reader.want_card:
            return
        self.errors += 1
        log.error("%s: reader %d: card power-on failed: %s", self.label, reader.index, reason)
        reader.want_card = False

    def transmit_done(self, token: int, response: bytes, now: float) -> None:
        reader = self._in_flight_for(token)
        if reader is None:
            return
        command = reader.in_flight
        assert command is not None
        reader_id = reader.reader_id if reader.reader_id is not None else READER_ID_UNDEFINED
        self._out.append(self._header.pack(7, reader_id, len(response)) + response)
        if log.isEnabledFor(logging.DEBUG):
            shown = reader.redactor.exchange(command, response)
            log.debug(
                "%s: reader %d: %s (%.3f ms)", self.label, reader.index,
                describe_exchange(command, response, shown=shown), (now - reader.started) * 1000,
            )
            if log.isEnabledFor(TRAFFIC):
                log.log(TRAFFIC, "%s >> APDU reader=%d %s%s", self.label, reader_id,
                        shown.response.hex(), " [data redacted]" if shown.redacted else "")
        if self._report:
            self._actions.append(
                ApduDone(reader.index, reader_id, command, response, reader.started,
                         now - reader.started)
            )
        self._after_flight(reader, now)

    def transmit_failed(self, token: int, reason: str, now: float) -> None:
        reader = self._in_flight_for(token)
        if reader is None:
            return
        command = reader.in_flight
        assert command is not None
        self.errors += 1
        self._throttle.log(now, logging.ERROR, "%s: reader %d: card failed to answer: %s",
                           self.label, reader.index, reason)
        reader_id = reader.reader_id if reader.reader_id is not None else READER_ID_UNDEFINED
        self._send(VscError(reader_id, VscErrorCode.GENERAL_ERROR))
        if self._report:
            self._actions.append(
                ApduDone(reader.index, reader_id, command, b"", reader.started,
                         now - reader.started, reason)
            )
        self._after_flight(reader, now)

    # ---------------------------------------------------------------- control side

    def insert_card(self, index: int, now: float) -> None:
        """Insert the card of reader ``index`` (ValueError if there is one or no such reader)."""
        reader = self._reader(index)
        if self._shutting_down or self._closed is not None:
            raise ValueError("the session is shutting down")
        if reader.want_card:
            raise ValueError(f"reader {index} already has a card")
        reader.want_card = True
        if not reader.remove_after_flight:  # else: powered on once the removal has gone out
            self._power_on(reader)

    def remove_card(self, index: int, now: float) -> None:
        """Remove the card of reader ``index``; deferred while a response is owed."""
        reader = self._reader(index)
        if not reader.want_card:
            raise ValueError(f"reader {index} has no card")
        reader.want_card = False
        if reader.in_flight is not None:
            reader.remove_after_flight = True
        else:
            self._remove(reader)

    def shutdown(self, now: float) -> None:
        """Remove every card and reader (after the responses in flight); see :attr:`finished`."""
        if self._shutting_down or self._closed is not None:
            return
        self._shutting_down = True
        for reader in self._readers:
            reader.want_card = False
            if reader.in_flight is not None:
                reader.remove_after_flight = True
            else:
                self._remove(reader)

    def add_reader(self, name: str, present: bool, now: float) -> int:
        """Offer one more reader (a host reader plugged in); its index.  ValueError when the
        session is ending or has :data:`MAX_READERS`."""
        if self._shutting_down or self._closed is not None:
            raise ValueError("the session is shutting down")
        if len(self._readers) >= MAX_READERS:
            raise ValueError(f"a session takes at most {MAX_READERS} readers")
        reader = _Reader(len(self._readers), name, present)
        self._readers.append(reader)
        if present and self._started:
            self._power_on(reader)
        if self._handshake_done:
            self._add_next_reader()
        return reader.index

    def unplug_reader(self, index: int, now: float) -> None:
        """The reader is gone: CardRemove and ReaderRemove (after a response in flight)."""
        reader = self._reader(index)
        if reader.unplugged:
            return
        reader.unplugged = True
        reader.want_card = False
        if reader.in_flight is not None:
            reader.remove_after_flight = True
        else:
            self._remove(reader)

    def replug_reader(self, index: int, present: bool, now: float) -> None:
        """Offer an unplugged reader again (``present``: with a card in it)."""
        reader = self._reader(index)
        if not reader.unplugged:
            raise ValueError(f"reader {index} is not unplugged")
        if self._shutting_down or self._closed is not None:
            raise ValueError("the session is shutting down")
        if reader.state is ReaderState.ADDING or reader.remove_after_flight:
            raise ValueError(f"reader {index} is still being removed")
        reader.unplugged = False
        reader.state = ReaderState.WAITING
        reader.reader_id = None
        reader.want_card = present
        if present:
            self._power_on(reader)
        if self._handshake_done:
            self._add_next_reader()

    # ---------------------------------------------------------------- internals

    def _reader(self, index: int) -> _Reader:
        if not 0 <= index < len(self._readers):
            raise ValueError(f"no reader {index} (this session has {len(self._readers)})")
        return self._readers[index]

    def _reader_for(self, token: int) -> _Reader | None:
        # token = counter << 16 | index (see _token): O(1) whatever the reader count
        if not self._readers or token <= 0:
            return None
        index = token & _INDEX_MASK
        if index >= len(self._readers):
            return None
        reader = self._readers[index]
        return reader if reader.token == token else None

    def _in_flight_for(self, token: int) -> _Reader | None:
        reader = self._reader_for(token)
        if reader is None or reader.in_flight is None:
            return None
        return reader

    def _token(self, reader: _Reader) -> int:
        token = self._next_token << _INDEX_BITS | reader.index
        self._next_token += 1
        reader.token = token
        return token

    def _send(self, msg: VscMessage) -> None:
        data = encode_vsc(msg, self._byteorder)
        self._out.append(data)
        if log.isEnabledFor(TRAFFIC):
            log.log(TRAFFIC, "%s >> %s | %s", self.label, describe_vsc(msg, None), data.hex())

    def _close(self, reason: str, *, error: bool) -> None:
        if self._closed is not None:
            return
        self._closed = reason
        self.errors += error
        self._throttle.log(self._now, logging.ERROR if error else logging.INFO,
                           "%s: closing: %s", self.label, reason)
        self._actions.append(Closed(reason, error))

    def _power_on(self, reader: _Reader) -> None:
        reader.atr = None
        self._actions.append(PowerOn(reader.index, self._token(reader)))

    def _maybe_send_atr(self, reader: _Reader) -> None:
        if (
            reader.state is ReaderState.ADDED
            and reader.want_card
            and reader.atr is not None
            and not reader.inserted
            and not reader.remove_after_flight
        ):
            assert reader.reader_id is not None
            self._send(VscAtr(reader.reader_id, reader.atr))
            self._acks.append((_Ack.ATR, reader))
            reader.inserted = True

    def _remove(self, reader: _Reader) -> None:
        """Take the card out now (nothing in flight): CardRemove, refuse the queue, power off."""
        reader.remove_after_flight = False
        reader.token = 0  # a late power-on answer is dropped
        had_card = reader.atr is not None
        reader.atr = None
        if reader.inserted:
            assert reader.reader_id is not None
            reader.inserted = False
            self._send(VscCardRemove(reader.reader_id))
            self._acks.append((_Ack.CARD_REMOVE, reader))
            self._info("%s: reader %d: card removed", self.label, reader.index)
        while reader.queue:
            reader.queue.popleft()
            self._refuse(reader.reader_id, "no card in the reader")
        if had_card:
            self._actions.append(PowerOff(reader.index))
        if self._shutting_down or reader.unplugged:
            if reader.state is ReaderState.ADDED:
                assert reader.reader_id is not None
                self._send(VscReaderRemove(reader.reader_id))
                self._acks.append((_Ack.READER_REMOVE, reader))
                del self._by_id[reader.reader_id]
                reader.state = ReaderState.REMOVED
                self._info("%s: reader %d removed", self.label, reader.index)
            elif reader.state is ReaderState.WAITING:
                reader.state = ReaderState.REMOVED
            # ADDING: removed when the host's answer arrives (see _on_error)
            if not self._shutting_down:
                self._add_next_reader()  # (the reader being added may have been this one)
        elif reader.want_card:  # re-inserted while the removal waited
            self._power_on(reader)

    def _after_flight(self, reader: _Reader, now: float) -> None:
        reader.in_flight = None
        if reader.remove_after_flight:
            self._remove(reader)
        elif reader.queue:
            self._start_apdu(reader, reader.queue.popleft(), now)
        if self._flushes:
            self._maybe_flush_complete()

    def _maybe_flush_complete(self) -> None:
        if any(r.in_flight is not None for r in self._readers):  # only while a Flush waits
            return
        while self._flushes:
            self._send(VscFlushComplete(self._flushes.popleft()))

    def _start_apdu(self, reader: _Reader, command: bytes, now: float) -> None:
        reader.in_flight = command
        reader.started = now
        reader.apdu_count += 1
        self.apdus += 1
        self._actions.append(Transmit(reader.index, command, self._token(reader)))

    def _refuse(self, reader_id: int | None, why: str) -> None:
        rid = READER_ID_UNDEFINED if reader_id is None else reader_id
        self.errors += 1
        self._warn("%s: reader id %d: APDU refused: %s", self.label, rid, why)
        self._send(VscError(rid, VscErrorCode.GENERAL_ERROR))

    def _info(self, msg: str, *args: object) -> None:
        """An info line a peer can cause by reconnecting (rate limited like warnings)."""
        self._throttle.log(self._now, logging.INFO, msg, *args)

    def _warn(self, msg: str, *args: object) -> None:
        """A warning a peer can cause (rate limited per session)."""
        self._throttle.log(self._now, logging.WARNING, msg, *args)

    def flush_log(self) -> None:
        """Say how many log lines the rate limit suppressed (the session is ending); a shared
        limit is its owner's to flush."""
        if self._owns_throttle:
            self._throttle.flush()

    @property
    def _traffic(self) -> bool:
        return log.isEnabledFor(TRAFFIC)

    def _traffic_in(self, reader_id: int, data: bytes | bytearray | memoryview) -> None:
        shown, _ = redact_command(bytes(data))
        log.log(TRAFFIC, "%s << APDU reader=%d %s", self.label, reader_id, shown.hex())

    def _on_apdu_data(self, reader_id: int, data: bytes, now: float) -> None:
        reader = self._by_id.get(reader_id)
        if reader is None:
            self._refuse(reader_id, "unknown reader id")
        elif reader.in_flight is None and reader.inserted and not (
            reader.remove_after_flight or self._shutting_down
        ):
            self._start_apdu(reader, data, now)
        elif not reader.inserted or reader.remove_after_flight or self._shutting_down:
            self._refuse(reader_id, "no card in the reader")
        elif len(reader.queue) < self._max_queue:
            reader.queue.append(data)
        else:
            self._refuse(reader_id, "too many APDUs in flight")

    def _on_message(self, msg: VscMessage, now: float) -> None:
        if log.isEnabledFor(TRAFFIC):
            log.log(TRAFFIC, "%s << %s", self.label, describe_vsc(msg, None))
        if isinstance(msg, VscInit):
            self._on_init(msg)
        elif isinstance(msg, VscError):
            self._on_error(msg)
        elif isinstance(msg, VscFlush):
            # FlushComplete once every APDU received before the Flush has been answered.
            self._flushes.append(msg.reader_id)
            self._maybe_flush_complete()
        else:
            # Unknown types, and messages only a client sends (ReaderAdd, ATR, ...).
            self.errors += 1
            self._warn("%s: unexpected message from the peer: %s", self.label,
                       describe_vsc(msg))
            self._send(VscError(msg.reader_id, VscErrorCode.GENERAL_ERROR))

    def _on_init(self, msg: VscInit) -> None:
        if self._handshake_done:
            self._throttle.log(self._now, logging.DEBUG,
                               "%s: extra Init from the peer ignored", self.label)
            return
        self._handshake_done = True
        major, middle, minor = split_version(msg.version)
        if msg.version != VscInit(0).version:
            self._warn("%s: peer speaks VSCard %d.%d.%d; continuing", self.label, major,
                        middle, minor)
        self._info("%s: handshake done (peer VSCard %d.%d.%d)", self.label, major, middle, minor)
        if not self._shutting_down:
            self._add_next_reader()

    def _add_next_reader(self) -> None:
        if self._adding is not None or self._shutting_down:
            return
        for reader in self._readers:
            if reader.state is ReaderState.WAITING:
                reader.state = ReaderState.ADDING
                self._adding = reader
                self._send(VscReaderAdd.with_name(0, reader.name))
                self._acks.append((_Ack.READER_ADD, reader))
                return

    def _on_error(self, msg: VscError) -> None:
        code = msg.code
        if not self._acks:
            if code == VscErrorCode.SUCCESS:
                self._throttle.log(self._now, logging.DEBUG,
                               "%s: unsolicited Error(SUCCESS) ignored", self.label)
            else:
                self._warn("%s: peer reports error %s (reader id %d)", self.label,
                           _code_name(code), msg.reader_id)
            return
        kind, reader = self._acks.popleft()
        ok = code == VscErrorCode.SUCCESS
        if kind is _Ack.READER_ADD:
            self._adding = None
            if ok and msg.reader_id != READER_ID_UNDEFINED and msg.reader_id not in self._by_id:
                reader.reader_id = msg.reader_id
                self._by_id[msg.reader_id] = reader
                reader.state = ReaderState.ADDED
                self._info("%s: reader %d %r added with id %d", self.label, reader.index,
                         reader.name, msg.reader_id)
                if self._shutting_down or reader.unplugged:
                    self._remove(reader)
                else:
                    self._maybe_send_atr(reader)
            else:
                reader.state = ReaderState.REFUSED
                self.errors += 1
                self._warn("%s: peer refused reader %d %r: %s (reader id %d)", self.label,
                            reader.index, reader.name, _code_name(code), msg.reader_id)
            self._add_next_reader()
        elif kind is _Ack.ATR:
            if ok:
                self._info("%s: reader %d: card inserted, ATR %s", self.label, reader.index,
                         (reader.atr or b"").hex().upper())
            else:
                # QEMU's ccid-card-passthru checks the ATR and refuses one it cannot parse
                # (docs/PROTOCOL.md, "VSCard"): the guest sees no card in the reader.
                self.errors += 1
                reader.inserted = False
                atr = reader.atr or b""
                why = qemu_accepts(atr)
                self._warn("%s: reader %d: peer rejected the ATR %s: %s; the guest sees no "
                           "card%s", self.label, reader.index, atr.hex().upper(),
                           _code_name(code), f" (QEMU refuses it: {why})" if why else "")
        elif not ok:
            self.errors += 1
            self._warn("%s: reader %d: peer answered %s with %s", self.label, reader.index,
                        kind.value, _code_name(code))


def _exception_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _code_name(code: int) -> str:
    return code.name if isinstance(code, VscErrorCode) else f"code {code}"
