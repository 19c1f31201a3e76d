"""Generated gRPC stubs: do not edit. `make proto` regenerates them from ../protos (see ../protogen.py).

- ``grpc_predict_v2_pb2[_grpc]``: ``inference.GRPCInferenceService`` (KServe Open Inference Protocol v2).
- ``generation_pb2[_grpc]``: ``expertmesh.v1.Generation`` (streaming ``Generate``, ``ListModels``).

The OIP messages live in protobuf package ``inference``, as stock clients require; a process that
also imports ``tritonclient.grpc`` (which registers the same names) cannot import these stubs too.
"""
