"""Generate the committed gRPC stubs (``expertmesh/api/pb/``) from the .proto files in ``api/protos/``.

``make proto`` runs ``python -m expertmesh.api.protogen``; ``tests/unit/test_protos.py`` regenerates
into a temporary directory and fails when the committed stubs differ. grpcio-tools (a dev extra,
pinned in constraints.txt because its protoc version is written into the stubs) does the work.

protoc writes module paths after the proto paths (``import grpc_predict_v2_pb2``, ``from
expertmesh.v1 import generation_pb2``, and the same names as the messages' ``__module__``, which pickle
needs); the stubs live flat in one package, so those are rewritten to ``expertmesh.api.pb``. The .proto paths themselves stay as they are: they are the names the
descriptors are registered under, which gRPC reflection shows to clients.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTOS_DIR = Path(__file__).parent / "protos"
STUBS_DIR = Path(__file__).parent / "pb"
STUBS_PACKAGE = "expertmesh.api.pb"
PROTOS = ("grpc_predict_v2.proto", "expertmesh/v1/generation.proto")
HAND_WRITTEN = ("__init__.py",)  # in STUBS_DIR but not generated


def _module(proto: str) -> tuple[str, str]:
    """``expertmesh/v1/generation.proto`` -> (``expertmesh.v1``, ``generation_pb2``)."""
    parent, _, name = proto.removesuffix(".proto").rpartition("/")
    return parent.replace("/", "."), f"{name}_pb2"


def _rewrite_module_paths(text: str) -> str:
    for proto in PROTOS:
        package, module = _module(proto)
        pattern = rf"^from {re.escape(package)} import {module}\b" if package else rf"^import {module}\b"
        text = re.sub(pattern, f"from {STUBS_PACKAGE} import {module}", text, flags=re.MULTILINE)
        # The messages' __module__, by which pickle finds their classes (Serve pickles requests).
        dotted = f"{package}.{module}" if package else module
        text = text.replace(
            f"(DESCRIPTOR, '{dotted}', _globals)", f"(DESCRIPTOR, '{STUBS_PACKAGE}.{module}', _globals)"
        )
    return text


def generate(out_dir: Path) -> list[Path]:
    """Write every stub into ``out_dir`` (flat); return their paths, sorted."""
    from grpc_tools import protoc  # dev-only dependency: imported when generating, never at run time

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTOS_DIR}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(PROTOS_DIR / p) for p in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(PROTOS)} (see its message above)")
        for path in sorted(Path(tmp).rglob("*.py*")):
            target = out_dir / path.name
            target.write_text(_rewrite_module_paths(path.read_text()))
            written.append(target)
    return sorted(written)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        for old in STUBS_DIR.iterdir():
            if old.is_file() and old.name not in HAND_WRITTEN:
                old.unlink()
        for path in fresh:
            shutil.copyfile(path, STUBS_DIR / path.name)
    print(f"wrote {len(fresh)} stubs to {STUBS_DIR}", file=sys.stderr)


if __name__ == "__main__":
    main()
