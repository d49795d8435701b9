"""Fixtures for the QEMU end-to-end tests (see tests/e2e/guest.py for the guest itself).

- ``guest_image`` (session): the cached kernel + initramfs.  Fails naming what is missing when
  QEMU or the guest's packages are absent, unless ``--no-qemu`` / ``CCIDEMU_NO_QEMU=1``.
- ``e2e_dir`` (module): a short directory for unix sockets, logs, traces and pcaps.
- ``host_pcscd`` (module): a private pcscd with vpcd on the host (vmc.lab.pcscd), for the
  passthrough tests; needs the pcscd peers too (``--no-pcscd`` skips them).
- :func:`vmc.lab.guest.boot_guest` for module fixtures: each test module boots one guest
  (about 6 s under TCG) and its tests share it.  test_libvirt.py has its own ``libvirtd``
  fixture (a private libvirtd for the module, :mod:`vmc.lab.libvirt`).

On a failing test its module's directory is kept, and the tails of every guest's serial
console, QEMU's stderr (libvirt's domain log), the guest's pcscd log, the command channel,
``serve.log`` and the private libvirtd's own log are attached to the report.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.support import require_peers
from vmc.lab.guest import (
    GUEST_HOST_PACKAGES,
    GuestImage,
    SerialGuest,
    build_guest,
    missing_host_tools,
)
from vmc.lab.libvirt import PrivateLibvirtd
from vmc.lab.pcscd import PEER_PACKAGES, PcscdHarness, missing_peers
from vmc.lab.serve import ServeProcess

#: Modules with a failed test keep their e2e_dir (as does CCIDEMU_KEEP_E2E=1).
_FAILED_MODULES: set[str] = set()


@pytest.fixture(scope="session")
def guest_image(request: pytest.FixtureRequest) -> GuestImage:
    require_peers(request.config, "qemu", missing_host_tools(), GUEST_HOST_PACKAGES)
    return build_guest()


@pytest.fixture(scope="module")
def e2e_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes, so not pytest's long tmp_path.
    name = request.module.__name__.rsplit(".", 1)[-1]
    path = Path(tempfile.mkdtemp(prefix=f"ccidemu-{name}-"))
    yield path
    if os.environ.get("CCIDEMU_KEEP_E2E") or request.module.__name__ in _FAILED_MODULES:
        print(f"kept {path} (logs, traces, pcaps of {request.module.__name__})")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def host_pcscd(request: pytest.FixtureRequest) -> Iterator[PcscdHarness]:
    """A private pcscd with vpcd on the host (no bridge running), for passthrough tests."""
    require_peers(request.config, "pcscd", missing_peers(), PEER_PACKAGES)
    work = Path(tempfile.mkdtemp(prefix="ccidemu-e2e-pcscd-"))
    harness = PcscdHarness(work)
    harness.start_pcscd()
    try:
        yield harness
    finally:
        harness.stop_bridge()
        harness.stop_pcscd()
        shutil.rmtree(work, ignore_errors=True)



@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        module = getattr(item, "module", None)
        if module is not None:
            _FAILED_MODULES.add(module.__name__)
        funcargs = getattr(item, "funcargs", {})
        seen: set[int] = set()
        for value in funcargs.values():
            candidates = value if isinstance(value, tuple) else (
                value, getattr(value, "guest", None))  # e.g. an environment holding a guest
            for obj in candidates:
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
                if isinstance(obj, SerialGuest):
                    report.sections.append(("guest " + str(obj.workdir), obj.diagnostics()))
                elif isinstance(obj, PrivateLibvirtd):
                    report.sections.append(("libvirtd " + str(obj.root), obj.diagnostics()))
                elif isinstance(obj, ServeProcess):
                    report.sections.append(("ccidemu serve log tail", obj.log_tail(40)))
    return report
