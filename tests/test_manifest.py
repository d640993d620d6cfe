from __future__ import annotations

import json

import pytest

from lightning_genesis_ckpt import CheckpointRecord, ManifestError
from lightning_genesis_ckpt.core.manifest import FORMAT_VERSION, Manifest
from lightning_genesis_ckpt.core.names import epoch_name, epoch_of_name, role_of_name
from lightning_genesis_ckpt.core.records import FileEntry, Stamp


def rec(name: str, seq: int, **kw) -> CheckpointRecord:
    return CheckpointRecord(
        name=name, role=role_of_name(name), size=10, checksum="crc32:00000000", created=1.0, seq=seq, **kw
    )


def test_roundtrip_keeps_every_field() -> None:
    m = Manifest().with_record(
        rec(
            "checkpoint_epoch_2.pth",
            3,
            epoch=2,
            global_step=20,
            metrics={"val_loss": 0.25},
            versions={"torch": "2.13.0"},
            monitor="val_loss",
        )
    )
    m = m.with_record(rec("best_model.pth", 4, epoch=2))
    back = Manifest.decode(m.encode(), "m.json")
    assert back == m
    assert back.next_seq == 5


def test_without_and_next_seq_never_reused() -> None:
    m = Manifest().with_record(rec("a.pth", 1)).with_record(rec("b.pth", 2))
    m2 = m.without(["b.pth"])
    assert list(m2.records) == ["a.pth"] and m2.next_seq == 3


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2", "not valid JSON"),
        (b'{"format": "something-else"}', "not a lightning-genesis-ckpt manifest"),
        (
            json.dumps({"format": "lightning-genesis-ckpt/manifest", "version": "1"}).encode(),
            "invalid format",
        ),
        (
            json.dumps(
                {"format": "lightning-genesis-ckpt/manifest", "version": 1, "checkpoints": [{"name": "x"}]}
            ).encode(),
            "malformed record",
        ),
    ],
)
def test_bad_manifests_raise_naming_the_file(data: bytes, match: str) -> None:
    with pytest.raises(ManifestError, match=match) as info:
        Manifest.decode(data, "dir/genesis_manifest.json")
    assert "dir/genesis_manifest.json" in str(info.value)
    assert not info.value.newer_format


def test_newer_version_is_flagged() -> None:
    data = json.dumps(
        {"format": "lightning-genesis-ckpt/manifest", "version": FORMAT_VERSION + 1, "checkpoints": []}
    ).encode()
    with pytest.raises(ManifestError, match="upgrade") as info:
        Manifest.decode(data, "m.json")
    assert info.value.newer_format


@pytest.mark.parametrize(
    ("name", "epoch", "role"),
    [
        ("checkpoint_epoch_0.pth", 0, "epoch"),
        ("checkpoint_epoch_123.pth", 123, "epoch"),
        ("checkpoint_epoch_x.pth", None, "manual"),
        ("checkpoint_epoch_1.pth.bak", None, "manual"),
        ("best_model.pth", None, "best"),
        ("interrupt_checkpoint.pth", None, "interrupt"),
    ],
)
def test_names(name: str, epoch: int | None, role: str) -> None:
    assert epoch_of_name(name) == epoch
    assert role_of_name(name) == role
    if epoch is not None:
        assert epoch_name(epoch) == name


def test_deletions_carry_what_they_deleted_and_clear_on_commit() -> None:
    m = (
        Manifest()
        .with_record(rec("a.pth", 1))
        .with_record(rec("b.pth", 2))
        .with_record(rec("best_model.pth", 3))
    )
    assert b"deleting" not in m.encode() and json.loads(m.encode())["version"] == 1  # written only when set
    m = m.without(["a.pth", "never-listed.pth"])
    assert m.deleting == {"a.pth": Stamp(10, "crc32:00000000")}
    doc = json.loads(m.encode())
    assert doc["version"] == FORMAT_VERSION and doc["deleting"] == {
        "a.pth": {"size": 10, "checksum": "crc32:00000000"}
    }
    assert Manifest.decode(m.encode(), "m.json") == m
    # Committing a name again ends its deletion; finished deletions leave the list.
    assert m.with_record(rec("a.pth", 5)).deleting == {}
    assert m.without(["b.pth"]).deleted(["a.pth", "b.pth"]).deleting == {}


def test_manifests_of_earlier_versions_are_read() -> None:
    # Version 2 listed deletions (and in-place replacements) by name only.
    old = _doc(version=2, checkpoints=[rec("a.pth", 1).to_json()], deleting=["b.pth"], replacing=["a.pth"])
    m = Manifest.decode(old, "m.json")
    assert (m.deleting, m.replacing) == ({"b.pth": None}, {"a.pth"})
    # and a directory being replaced with the record of its new tree, which only such a name may have.
    tree = rec("d.pth", 2, files={"shard.bin": FileEntry(3, "crc32:00000001")})
    doc = {
        "version": 2,
        "checkpoints": [tree.to_json()],
        "replacing": ["d.pth"],
        "incoming": [tree.to_json()],
    }
    assert Manifest.decode(_doc(**doc), "m.json").incoming == {"d.pth": tree}
    with pytest.raises(ManifestError, match="incoming record"):
        Manifest.decode(_doc(**{**doc, "replacing": []}), "m.json")


def test_non_finite_metrics_round_trip_as_strict_json() -> None:
    m = Manifest().with_record(
        rec("a.pth", 1, metrics={"loss": float("nan"), "up": float("inf"), "down": -float("inf")})
    )
    data = m.encode()
    doc = json.loads(data, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert doc["checkpoints"][0]["metrics"] == {"down": "-Infinity", "loss": "NaN", "up": "Infinity"}
    back = Manifest.decode(data, "m.json").records["a.pth"].metrics
    assert back["up"] == float("inf") and back["down"] == -float("inf") and back["loss"] != back["loss"]


def _doc(**extra: object) -> bytes:
    return json.dumps(
        {"format": "lightning-genesis-ckpt/manifest", "version": 1, "checkpoints": [], **extra}
    ).encode()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_doc(checkpoints=[rec("../up.pth", 1).to_json()]), "invalid file name '../up.pth'"),
        (_doc(checkpoints=[rec("genesis.lock", 1).to_json()]), "invalid file name 'genesis.lock'"),
        (_doc(checkpoints=[rec("a.pth", 1).to_json(), rec("a.pth", 2).to_json()]), "listed twice"),
        (_doc(deleting=["/etc/passwd"]), "invalid file name"),
        (_doc(replacing="best_model.pth"), "malformed record"),
    ],
)
def test_hostile_manifests_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(ManifestError, match=match) as info:
        Manifest.decode(data, "m.json")
    assert not info.value.newer_format  # so the store rebuilds from the files, with a warning
