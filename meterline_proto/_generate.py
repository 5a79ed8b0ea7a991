"""Generate the Python stubs in this package from the contracts in ``proto/``.

Run ``python -m meterline_proto._generate`` after editing a ``.proto`` file; the test
``tests/unit/test_proto_stubs.py`` fails while the committed stubs are stale.

The contracts use buf-style packages (``meterline.usage.v1``); the stubs live under
``meterline_proto`` so that no importable top-level ``proto`` or ``meterline.usage``
package is created (``proto`` collides with the ``proto-plus`` distribution, and
``meterline`` is the composition root).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent / "proto"
_IMPORT = re.compile(r"^(from|import) meterline\.", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs for every contract below ``out_dir``; return the files written."""
    with tempfile.TemporaryDirectory() as tmp:
        bin_dir = str(Path(sys.executable).parent)
        env_path = os.environ.get("PATH", "")
        os.environ["PATH"] = bin_dir + os.pathsep + env_path
        try:
            args = [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"--python_out={tmp}",
                f"--mypy_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"--mypy_grpc_out={tmp}",
                *(str(p) for p in proto_files()),
            ]
            if protoc.main(args) != 0:
                raise SystemExit("protoc failed")
        finally:
            os.environ["PATH"] = env_path
        written: list[Path] = []
        src_root = Path(tmp) / "meterline"
        for src in sorted(src_root.rglob("*.py*")):
            rel = src.relative_to(src_root)
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            text = _IMPORT.sub(r"\1 meterline_proto.", src.read_text())
            dst.write_text(text)
            written.append(dst)
        for leaf in {p.parent for p in written}:
            for directory in (leaf, *leaf.parents):
                if directory == out_dir or not directory.is_relative_to(out_dir):
                    break
                (directory / "__init__.py").touch()
        return written


def main() -> None:
    for sub in ("usage", "agent"):
        shutil.rmtree(PACKAGE_DIR / sub, ignore_errors=True)
    for path in generate(PACKAGE_DIR):
        print(path.relative_to(PACKAGE_DIR.parent))


if __name__ == "__main__":
    main()
