"""The committed gRPC stubs are what `make proto` makes of the .proto files today."""

import difflib

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
