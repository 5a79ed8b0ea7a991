"""The committed stubs in meterline_proto/ are exactly what proto/ generates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from meterline_proto import _generate


def test_committed_stubs_match_the_contracts(tmp_path: Path) -> None:
    fresh = {p.relative_to(tmp_path): p.read_text() for p in _generate.generate(tmp_path)}
    assert fresh, "the generator wrote nothing"
    committed_dir = _generate.PACKAGE_DIR
    stale = [
        str(rel)
        for rel, text in fresh.items()
        if not (committed_dir / rel).is_file() or (committed_dir / rel).read_text() != text
    ]
    assert not stale, f"stale stubs (run `make proto`): {stale}"


def test_no_importable_top_level_proto_package() -> None:
    # `proto` is taken by the proto-plus distribution; ours must never shadow it.
    spec = importlib.util.find_spec("proto")
    assert spec is None or "meterline" not in str(spec.origin)
