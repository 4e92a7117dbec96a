"""The signing key ring: generated once, private, never a default, rotatable."""

from __future__ import annotations

import base64
import os
import secrets
import stat
from pathlib import Path

import pytest

from wardgate.errors import ConfigError
from wardgate.keys import KEYS_ENV, key_id, load_key_ring, rotate_key_file


def test_generated_on_first_start_with_mode_0600_and_reused(tmp_path: Path) -> None:
    ring = load_key_ring(tmp_path, environ={})
    path = tmp_path / "keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(ring.active_key) == 32
    again = load_key_ring(tmp_path, environ={})
    assert again.active_key == ring.active_key
    assert again.server_id == ring.server_id


def test_two_data_dirs_never_share_a_key(tmp_path: Path) -> None:
    a = load_key_ring(tmp_path / "a", environ={})
    b = load_key_ring(tmp_path / "b", environ={})
    assert a.active_key != b.active_key
    assert a.server_id != b.server_id


def test_key_material_never_in_repr(tmp_path: Path) -> None:
    ring = load_key_ring(tmp_path, environ={})
    text = repr(ring) + str(ring)
    assert base64.urlsafe_b64encode(ring.active_key).decode().rstrip("=") not in text
    assert ring.active_key.hex() not in text


def test_world_readable_key_file_is_refused(tmp_path: Path) -> None:
    load_key_ring(tmp_path, environ={})
    os.chmod(tmp_path / "keys.json", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_key_ring(tmp_path, environ={})


def test_corrupt_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"{not json")
    os.close(fd)
    with pytest.raises(ConfigError, match="not a valid wardgate key file"):
        load_key_ring(tmp_path, environ={})


def test_rotation_keeps_old_keys_for_verification(tmp_path: Path) -> None:
    first = load_key_ring(tmp_path, environ={})
    rotated = rotate_key_file(tmp_path)
    assert rotated.active_kid != first.active_kid
    assert rotated.keys[first.active_kid] == first.active_key
    assert load_key_ring(tmp_path, environ={}).active_kid == rotated.active_kid


def test_keys_from_env_shared_by_instances(tmp_path: Path) -> None:
    k1, k2 = secrets.token_bytes(32), secrets.token_bytes(32)
    env = {KEYS_ENV: ",".join(base64.urlsafe_b64encode(k).decode() for k in (k1, k2))}
    a = load_key_ring(tmp_path / "a", environ=env)
    b = load_key_ring(tmp_path / "b", environ=env)
    assert a == b
    assert a.active_kid == key_id(k1)
    assert set(a.keys) == {key_id(k1), key_id(k2)}
    assert not (tmp_path / "a" / "keys.json").exists()


@pytest.mark.parametrize("value", ["short", base64.urlsafe_b64encode(b"x" * 16).decode(), "!!!"])
def test_weak_or_bad_env_keys_are_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=KEYS_ENV):
        load_key_ring(tmp_path, environ={KEYS_ENV: value})
