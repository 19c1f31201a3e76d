"""The gRPC layer's pure parts: tensors, parameters, API keys and the status of each error."""

import pickle

import grpc
import pytest
from ray.exceptions import RayTaskError

from expertmesh.api.grpc_service import (
    GrpcAbort,
    api_key_accepted,
    decode_bytes_tensor,
    encode_bytes_tensor,
    sampling_params_from_infer,
    sampling_params_from_proto,
    status_for,
    text_input,
)
from expertmesh.api.pb import generation_pb2 as gen
from expertmesh.api.pb import grpc_predict_v2_pb2 as oip
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.errors import EngineDeadError, InvalidRequestError, ModelNotFoundError, QueueFullError


def request_with(*elements: bytes, raw: bool = False, shape=(1,), datatype="BYTES") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="text_input", datatype=datatype, shape=list(shape))
    if raw:
        request.raw_input_contents.append(encode_bytes_tensor(elements))
    else:
        tensor.contents.bytes_contents.extend(elements)
    return request


def params(**values) -> dict[str, oip.InferParameter]:
    out = {}
    for name, (kind, value) in values.items():
        p = oip.InferParameter()
        setattr(p, f"{kind}_param", value)
        out[name] = p
    return out


def invalid_argument(call, *args) -> str:
    with pytest.raises(GrpcAbort) as caught:
        call(*args)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.details


# --- tensors ------------------------------------------------------------------------------------


def test_bytes_tensors_round_trip():
    items = [b"", b"hello", "naïve ✓".encode()]
    assert decode_bytes_tensor(encode_bytes_tensor(items), "x") == items
    raw = encode_bytes_tensor([b"hello"])
    assert "input 'x'" in invalid_argument(decode_bytes_tensor, raw[:-1], "x")
    assert "4-byte length" in invalid_argument(decode_bytes_tensor, raw + b"\x01", "x")


def test_text_input_from_contents_or_raw():
    assert text_input(request_with(b"def f():")) == ("def f():", [1])
    assert text_input(request_with(b"def f():", raw=True, shape=(1, 1))) == ("def f():", [1, 1])


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (request_with(b"a", b"b"), "must hold 1 element"),
        (request_with(b"a", shape=(1, 2)), "must have shape [1] or [1, 1]"),
        (request_with(b"a", datatype="INT32"), "must have datatype BYTES, got 'INT32'"),
        (request_with(b"\xff\xfe"), "not valid UTF-8"),
        (oip.ModelInferRequest(model_name="m"), "missing input 'text_input'"),
    ],
)
def test_bad_text_inputs_name_the_input(request_, expected):
    details = invalid_argument(text_input, request_)
    assert expected in details and "'text_input'" in details


def test_raw_and_typed_contents_together_are_refused():
    both = request_with(b"a")
    both.raw_input_contents.append(encode_bytes_tensor([b"a"]))
    assert "both contents and raw_input_contents" in invalid_argument(text_input, both)
    twice = request_with(b"a", raw=True)
    twice.raw_input_contents.append(b"")
    assert "raw_input_contents has 2 entries" in invalid_argument(text_input, twice)


# --- parameters ---------------------------------------------------------------------------------


def test_infer_parameters_of_any_kind_convert():
    got = sampling_params_from_infer(
        params(
            max_tokens=("int64", 7),
            temperature=("string", "0.7"),  # what tritonclient can send for a float
            top_p=("double", 0.9),
            top_k=("uint64", 5),
            ignore_eos=("bool", True),
            stop=("string", '["\\n\\n", "END"]'),
            stop_token_ids=("int64", 2),
            priority=("uint64", 1),  # Triton's own; ignored
        )
    )
    assert got == SamplingParams(
        max_tokens=7,
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        ignore_eos=True,
        stop=["\n\n", "END"],
        stop_token_ids=[2],
    )
    assert sampling_params_from_infer(params(stop=("string", "[x"))).stop == ["[x"]
    assert sampling_params_from_infer(params(stop_token_ids=("string", "[1, 2]"))).stop_token_ids == [1, 2]


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"top_p": ("double", 2.0)}, "'top_p'"),
        ({"temperature": ("string", "warm")}, "'temperature'"),
        ({"max_tokens": ("int64", 0)}, "'max_tokens'"),
        ({"temprature": ("double", 0.5)}, "'temprature'"),
    ],
)
def test_bad_infer_parameters_name_the_parameter(values, named):
    with pytest.raises(InvalidRequestError, match=f"invalid sampling parameter {named}"):
        sampling_params_from_infer(params(**values))


def test_parameter_without_value_or_with_bad_list_is_refused():
    assert "parameter 'top_k' has no value" in invalid_argument(
        sampling_params_from_infer, {"top_k": oip.InferParameter()}
    )
    assert "JSON list" in invalid_argument(
        sampling_params_from_infer, params(stop_token_ids=("string", "1,2"))
    )


def test_generate_sampling_keeps_the_defaults_of_unset_fields():
    assert sampling_params_from_proto(gen.SamplingParams()) == SamplingParams()
    got = sampling_params_from_proto(gen.SamplingParams(max_tokens=3, temperature=0, top_k=0, stop=["x"]))
    assert got == SamplingParams(max_tokens=3, temperature=0.0, top_k=0, stop=["x"])
    with pytest.raises(InvalidRequestError, match="invalid sampling parameter 'max_tokens'"):
        sampling_params_from_proto(gen.SamplingParams(max_tokens=0))


# --- access and errors --------------------------------------------------------------------------


def test_api_key():
    key = "s3cret-key"
    assert api_key_accepted([], None)
    assert api_key_accepted([("authorization", f"Bearer {key}")], key)
    assert api_key_accepted([("Authorization", f"bearer {key}".encode())], key)
    assert not api_key_accepted([], key)
    assert not api_key_accepted([("authorization", "Bearer wrong")], key)
    assert not api_key_accepted([("authorization", key)], key)  # the scheme is required


def test_status_of_each_error():
    assert status_for(ModelNotFoundError("model 'x' is not served"))[0] == grpc.StatusCode.NOT_FOUND
    assert status_for(QueueFullError("full"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(InvalidRequestError("too long")) == (grpc.StatusCode.INVALID_ARGUMENT, "too long")
    assert status_for(EngineDeadError("dead"))[0] == grpc.StatusCode.UNAVAILABLE
    code, details = status_for(RuntimeError("secret internals"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in details and "RuntimeError" in details
    assert status_for(GrpcAbort(grpc.StatusCode.UNAUTHENTICATED, "no key")) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "no key",
    )


def test_an_engine_replicas_error_answers_with_its_message_not_the_remote_traceback():
    cause = InvalidRequestError("prompt has 5000 tokens but max_model_len is 2048")
    remote = RayTaskError(
        "generate", "Traceback (most recent call last):\n  ...", cause
    ).as_instanceof_cause()
    assert status_for(remote) == (grpc.StatusCode.INVALID_ARGUMENT, str(cause))


def test_grpc_abort_survives_pickling():
    again = pickle.loads(pickle.dumps(GrpcAbort(grpc.StatusCode.NOT_FOUND, "gone")))
    assert (again.code, again.details) == (grpc.StatusCode.NOT_FOUND, "gone")
