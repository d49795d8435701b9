"""Card profiles and state files of any shape give a ConfigError, never another exception.

A profile is written by a user and a state file may be damaged; either reaching the daemon
with the wrong types (a number where a string belongs, a table where a list does, nesting
deep enough to exhaust the parser) must end in one clear error naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccidemu.cards import cac_files, piv_files
from ccidemu.errors import ConfigError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

_FILES = ["9a.crt", "9a.key", "9c.crt", "9c.key", "missing.pem", "card.toml", ""]


def _toml_value(value: Any) -> str:
    """``value`` as a TOML inline value (tables inline, strings as JSON strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}"
                           for k, v in value.items()) + "}"


def _toml(profile: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(key)} = {_toml_value(value)}\n" for key, value in profile.items())


_scalars = st.one_of(
    st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(_FILES), st.sampled_from(["123456", "12345678", "00" * 24, "9a", "5fc105",
                                              "aes128", "3des", "yubikey5", "5.4.3", "never"]),
    st.text(max_size=12),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["cert", "key", "p12", "passphrase",
                                                             "pin_policy", "touch_policy",
                                                             "9a", "9c", "1", "2", "5fc105"]),
                                            inner, max_size=4)),
    max_leaves=8,
)

_PIV_KEYS = sorted(piv_files._PROFILE_KEYS)
_CAC_KEYS = sorted(cac_files._PROFILE_KEYS)


@pytest.fixture()
def card_dir(tmp_path: Path) -> Path:
    for name in ("9a.crt", "9a.key", "9c.crt", "9c.key"):
        shutil.copy(FIXTURES / "certs" / name, tmp_path / name)
    return tmp_path


def _check(load: Any, path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    try:
        load(path)
    except ConfigError as exc:
        # one line naming the profile or the file in its directory that was at fault
        assert "\n" not in str(exc)
        assert str(path.parent) in str(exc), str(exc)


_SETTINGS = settings(max_examples=300, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(st.dictionaries(st.sampled_from(_PIV_KEYS), _values, max_size=6))
def test_piv_profile_any_types(card_dir: Path, profile: dict[str, Any]) -> None:
    _check(piv_files.load_profile, card_dir / "fuzz.toml", _toml(profile))


@_SETTINGS
@given(st.dictionaries(st.sampled_from(_CAC_KEYS), _values, max_size=4))
def test_cac_profile_any_types(card_dir: Path, profile: dict[str, Any]) -> None:
    _check(cac_files.load_profile, card_dir / "fuzz.toml", _toml(profile))


@_SETTINGS
@given(st.dictionaries(st.sampled_from(["9a", "9c", "9d", "82", "zz"]),
                       st.dictionaries(st.sampled_from(sorted(piv_files._SLOT_KEYS)), _scalars,
                                       max_size=4), max_size=2))
def test_piv_slots_any_types(card_dir: Path, slots: dict[str, Any]) -> None:
    _check(piv_files.load_profile, card_dir / "fuzz.toml", _toml({"slots": slots}))


@pytest.mark.parametrize("load", [piv_files.load_profile, cac_files.load_profile])
def test_profile_nested_too_deeply(tmp_path: Path, load: Any) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("label = " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.toml"):
        load(path)


def _piv_store(tmp_path: Path) -> piv_files.StateStore:
    config = piv_files.load_config(str(FIXTURES / "certs"))
    return piv_files.StateStore(tmp_path / "piv.json", config.state, config.source)


def _cac_store(tmp_path: Path) -> cac_files.StateStore:
    config = cac_files.load_config(str(FIXTURES / "cac"))
    return cac_files.StateStore(tmp_path / "cac.json", config.state, config.source)


@pytest.mark.parametrize("store", [_piv_store, _cac_store])
def test_state_nested_too_deeply(tmp_path: Path, store: Any) -> None:
    states = tmp_path / "state"
    made = store(states)
    assert made.path is not None
    made.path.write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(ConfigError, match="corrupt"):
        made.load()


_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 2**33), st.text(max_size=8),
              st.sampled_from(["9a", "aes128", "00" * 24, "-----BEGIN"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["format", "pin", "puk", "pin_left", "puk_left",
                                        "pin_retries", "puk_retries", "management_key",
                                        "management_algorithm", "management_touch", "keys",
                                        "objects", "policies", "source"]),
                       _json_values, max_size=8),
       st.sampled_from([1, 2, 3]))
def test_piv_state_any_types(tmp_path: Path, data: dict[str, Any], form: int) -> None:
    made = _piv_store(tmp_path / "state")
    assert made.path is not None
    data.setdefault("format", form)
    made.path.write_text(json.dumps(data))
    try:
        made.load()
    except ConfigError as exc:
        assert "corrupt" in str(exc)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["format", "pin_retries", "pin_left", "source"]),
                       _json_values, max_size=4))
def test_cac_state_any_types(tmp_path: Path, data: dict[str, Any]) -> None:
    made = _cac_store(tmp_path / "state")
    assert made.path is not None
    made.path.write_text(json.dumps(data))
    try:
        made.load()
    except ConfigError as exc:
        assert "corrupt" in str(exc)
