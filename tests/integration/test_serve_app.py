"""The Serve application on a real in-process Ray: colocated and disaggregated give the same tokens."""

import socket
from pathlib import Path

import pytest
import ray
from ray import serve

from expertmesh.config import ServeConfig, traffic_table
from expertmesh.engine.llm import LLM
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.serve.app import APP_NAME, deploy

PROMPTS = ["def main():", "import os\nimport sys", "class Pool:"]
GREEDY = dict(max_tokens=10, temperature=0, ignore_eos=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_serve():
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


EXAMPLES = Path(__file__).resolve().parents[2] / "deployments" / "serve"


def example_model(file: str, name: str, source: Path) -> dict:
    """A model of an example config (deployments/serve/), pointed at the tiny checkpoint."""
    (model,) = ServeConfig.from_yaml(EXAMPLES / file).model_dump(mode="json")["models"]
    model["name"] = name
    for revision in model["revisions"]:
        revision["source"] = str(source)
    return model


@pytest.fixture(scope="module")
def app(ray_serve, pangu_tiny):
    config = ServeConfig.parse(
        {
            "models": [
                example_model("colocated.yaml", "colocated", pangu_tiny),
                example_model("disaggregated.yaml", "disaggregated", pangu_tiny),
                {
                    "name": "two-revisions",
                    "revisions": [
                        {"name": "v1", "source": str(pangu_tiny)},
                        {"name": "v2", "source": str(pangu_tiny)},
                    ],
                    "traffic": {"v1": 100, "v2": 0},
                },
            ]
        }
    )
    deploy(config)  # declaratively, as a RayService's serveConfigV2 is applied
    return config, serve.get_app_handle(APP_NAME), ray_serve


def generate(handle, model, prompt):
    stream = handle.options(stream=True, method_name="generate").remote(model, prompt, GREEDY)
    outs = list(stream)
    assert outs[-1].finished
    return outs[-1].outputs[0].token_ids


def test_colocated_and_disaggregated_give_the_offline_engines_tokens(app, pangu_tiny):
    _, handle, _ = app
    offline = LLM(pangu_tiny, show_progress=False).generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)
    for prompt, want in zip(PROMPTS, offline, strict=True):
        assert generate(handle, "colocated", prompt) == want.outputs[0].token_ids
        assert generate(handle, "disaggregated", prompt) == want.outputs[0].token_ids


def test_each_expert_pool_is_its_own_deployment(app):
    status = serve.status().applications[APP_NAME].deployments
    pools = sorted(name for name in status if name.startswith("experts-disaggregated"))
    assert pools == [f"experts-disaggregated-v1-g{g}" for g in range(4)]  # tiny pangu: 4 MoGE groups
    assert all(status[name].status == "HEALTHY" for name in status)


def test_traffic_shift_is_a_reconfigure_not_a_restart(app):
    config, handle, _ = app
    before = {rev: handle.engine_info.remote("two-revisions", rev).result()["pid"] for rev in ("v1", "v2")}
    assert {handle.revision_for.remote("two-revisions", d / 10).result() for d in range(10)} == {"v1"}
    shifted = config.model_copy(deep=True)
    shifted.models[2].traffic = {"v1": 0, "v2": 100}
    deploy(shifted)
    assert traffic_table(shifted)["two-revisions"] == {"v1": 0, "v2": 100}
    assert {handle.revision_for.remote("two-revisions", d / 10).result() for d in range(10)} == {"v2"}
    after = {rev: handle.engine_info.remote("two-revisions", rev).result()["pid"] for rev in ("v1", "v2")}
    assert after == before  # the engines' processes were not restarted


def test_unknown_model_is_named(app):
    _, handle, _ = app
    with pytest.raises(Exception, match="model 'nope' is not served here; available models: 'colocated'"):
        handle.revision_for.remote("nope").result()


def test_openai_client_through_the_serve_http_proxy(app, pangu_tiny):
    openai = pytest.importorskip("openai")
    _, _, url = app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == ["colocated", "disaggregated", "two-revisions"]
    offline = LLM(pangu_tiny, show_progress=False).generate(
        PROMPTS[:1], SamplingParams(**GREEDY), use_tqdm=False
    )
    for model in ("colocated", "disaggregated"):
        reply = client.completions.create(
            model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        assert reply.choices[0].text == offline[0].outputs[0].text
        streamed = "".join(
            chunk.choices[0].text
            for chunk in client.completions.create(
                model=model,
                prompt=PROMPTS[0],
                max_tokens=10,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            if chunk.choices
        )
        assert streamed == offline[0].outputs[0].text
    with pytest.raises(openai.NotFoundError, match="'nope' is not served"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
