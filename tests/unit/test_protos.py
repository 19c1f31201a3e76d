"""The committed gRPC stubs are what `make proto` makes of the .proto files today."""

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from expertmesh.api import protogen


def test_committed_stubs_match_the_protos(tmp_path):
    fresh = {p.name: p.read_text() for p in protogen.generate(tmp_path)}
    committed = {
        p.name: p.read_text()
        for p in protogen.STUBS_DIR.iterdir()
        if p.is_file() and p.name not in protogen.HAND_WRITTEN
    }
    assert sorted(committed) == sorted(fresh), "stub files differ from the protos': run `make proto`"
    for name, text in fresh.items():
        if committed[name] != text:
            diff = "".join(
                difflib.unified_diff(
                    committed[name].splitlines(True),
                    text.splitlines(True),
                    f"committed/{name}",
                    f"fresh/{name}",
                )
            )
            raise AssertionError(f"{name} is stale: run `make proto`\n{diff[:4000]}")


def test_stubs_import_from_their_package():
    from expertmesh.api.pb import generation_pb2, grpc_predict_v2_pb2

    # pickle finds a message's class by its __module__; Serve pickles every request it forwards.
    assert grpc_predict_v2_pb2.ModelInferRequest.__module__ == "expertmesh.api.pb.grpc_predict_v2_pb2"
    assert generation_pb2.GenerateRequest.__module__ == "expertmesh.api.pb.generation_pb2"
    assert generation_pb2.DESCRIPTOR.name == "expertmesh/v1/generation.proto"


PROTOBUF_7 = Path(__file__).resolve().parents[2] / ".tools" / "protobuf-7"


def test_stubs_run_on_protobuf_7_too():
    """The stubs are protobuf 6 gencode (the newest tritonclient needs protobuf < 7); protobuf 7's
    runtime accepts gencode of an older major, so users on either get the same messages. The
    SentencePiece model reader, the other protobuf module the platform loads, imports there too."""
    if not (PROTOBUF_7 / ".installed").exists():
        pytest.skip("protobuf 7 not installed at .tools/protobuf-7: run `make protobuf-7`")
    script = (
        "import google.protobuf as pb\n"
        "from expertmesh.api.pb import generation_pb2 as gen, generation_pb2_grpc\n"
        "from sentencepiece import sentencepiece_model_pb2\n"  # the Pangu tokenizer's reader
        "request = gen.GenerateRequest(model='m', text='hi', sampling=gen.SamplingParams(temperature=0.5))\n"
        "again = gen.GenerateRequest.FromString(request.SerializeToString())\n"
        "print(pb.__version__, again.sampling.temperature, again.WhichOneof('prompt'))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROTOBUF_7), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    version, temperature, prompt = done.stdout.split()
    assert version.startswith("7.") and (temperature, prompt) == ("0.5", "text")
