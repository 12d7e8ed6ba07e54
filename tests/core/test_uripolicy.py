"""Model URIs in Kubernetes mode: no local files outside the roots, no internal hosts."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufaas.core.artifacts import ArtifactError, ArtifactStore
from gpufaas.core.uripolicy import UriNotAllowed, UriPolicy, is_internal_address


@pytest.mark.parametrize(
    ("address", "internal"),
    [
        ("127.0.0.1", True),
        ("169.254.169.254", True),
        ("::1", True),
        ("fe80::1", True),
        ("::ffff:169.254.169.254", True),
        ("0.0.0.0", True),
        ("10.0.0.5", False),
        ("192.168.1.10", False),
        ("93.184.216.34", False),
    ],
)
def test_internal_addresses(address: str, internal: bool) -> None:
    assert is_internal_address(address) is internal


def test_kubernetes_policy_blocks_metadata_and_loopback() -> None:
    policy = UriPolicy.for_kubernetes()
    for uri in (
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://localhost:8080/v2/repository/index",
        "https://[::1]/model.pt",
    ):
        with pytest.raises(UriNotAllowed):
            policy.check(uri)


def test_names_are_checked_by_every_address_they_resolve_to() -> None:
    answers = {"models.example": ["10.1.2.3"], "rebind.example": ["10.1.2.3", "169.254.169.254"]}
    policy = UriPolicy(block_internal_hosts=True, resolver=lambda host: answers[host])
    policy.check("https://models.example/m.pt")
    with pytest.raises(UriNotAllowed, match=r"169\.254\.169\.254"):
        policy.check("https://rebind.example/m.pt")


def test_s3_endpoint_is_checked() -> None:
    policy = UriPolicy.for_kubernetes()
    with pytest.raises(UriNotAllowed):
        policy.check("s3://models/m.pt", s3_endpoint="http://169.254.169.254")
    policy.check("s3://models/m.pt", s3_endpoint=None)


def test_file_uris_only_below_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "m.pt").write_bytes(b"x")
    policy = UriPolicy.for_kubernetes(file_roots=[root])
    policy.check(f"file://{root}/m.pt")
    for uri in ("file:///etc/passwd", f"file://{root}/../secret.pt"):
        with pytest.raises(UriNotAllowed, match="allowed root"):
            policy.check(uri)
    (root / "escape").symlink_to("/etc")
    with pytest.raises(UriNotAllowed):
        policy.check(f"file://{root}/escape/passwd")


def test_local_mode_policy_allows_everything(tmp_path: Path) -> None:
    UriPolicy().check("file:///etc/hostname")
    UriPolicy().check("http://127.0.0.1:9/m.pt")


def test_store_refuses_before_touching_the_network(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "cache", uri_policy=UriPolicy.for_kubernetes())
    with pytest.raises(ArtifactError, match="not allowed") as info:
        store.fetch("http://127.0.0.1:9/model.pt")
    assert "127.0.0.1" in str(info.value)
    with pytest.raises(ArtifactError, match="allowed root"):
        store.fetch("file:///etc/passwd")
