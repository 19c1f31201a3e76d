"""Command line: `expertmesh serve | generate | make-checkpoint | demo | info`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from expertmesh.errors import ExpertMeshError

DEFAULT_DEMO_ARCH, DEFAULT_DEMO_SIZE = "pangu_pro_moe", "small"


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _make_checkpoint(args: argparse.Namespace) -> None:
    from expertmesh.model.checkpoint_maker import make_checkpoint

    out = make_checkpoint(
        args.arch, args.size, args.out, seed=args.seed, dtype=args.dtype, max_shard_size=args.max_shard_size
    )
    print(f"wrote {args.arch} ({args.size}) checkpoint to {out}")


def _generate(args: argparse.Namespace) -> None:
    from expertmesh.engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    if args.url:
        _generate_remote(args, params)
        return
    from expertmesh.engine.llm import LLM

    # The loading bar is for a person at a terminal: with stdout piped, rich wrote it (a stray
    # blank line) into the generated text that a script reads.
    llm = LLM(args.model, args.dtype, show_progress=sys.stdout.isatty())
    for out in llm.generate_stream([args.prompt], params):
        sys.stdout.write(out.outputs[0].delta_text)
        sys.stdout.flush()
        if out.finished:
            print(f"\n[finish_reason={out.outputs[0].finish_reason}, tokens={out.num_output_tokens}]")


def _generate_remote(args: argparse.Namespace, params) -> None:
    from expertmesh.api.http_client import stream_completion

    body = params.model_dump(
        include={"max_tokens", "temperature", "top_p", "top_k", "seed"}, exclude_none=True
    )
    finish = None
    try:
        for chunk in stream_completion(
            args.url, str(args.model), args.prompt, body, os.environ.get("EXPERTMESH_API_KEY")
        ):
            for choice in chunk.get("choices", []):
                sys.stdout.write(choice.get("text", ""))
                sys.stdout.flush()
                finish = choice.get("finish_reason") or finish
    except (RuntimeError, OSError) as exc:  # requests' errors are OSErrors
        raise ExpertMeshError(f"{args.url}: {exc}") from exc
    print(f"\n[finish_reason={finish}]")


def _serve(args: argparse.Namespace) -> None:
    from expertmesh.config import ServeConfig
    from expertmesh.serve.launcher import serve_forever, single_model_config

    if args.config:
        config = ServeConfig.from_yaml(args.config)
        if not config.models:  # an empty platform is for the operator's RayService, not one machine
            raise ExpertMeshError(f"{args.config}: no models to serve; list at least one under 'models:'")
    elif args.model:
        if not (args.model / "config.json").is_file():
            raise ExpertMeshError(
                f"{args.model}: no checkpoint there (make one with `expertmesh make-checkpoint`)"
            )
        config = single_model_config(args.model, args.name, args.expert_parallel, args.dtype)
    else:
        raise ExpertMeshError("give --config FILE or --model PATH")
    flags = {"http_port": args.http_port, "grpc_port": args.grpc_port, "api_key": args.api_key}
    # validated as a config file is (model_copy would take a 3-character key unchecked)
    config = ServeConfig.model_validate(config.model_dump() | {k: v for k, v in flags.items() if v})
    serve_forever(config, args.host, args.metrics_port)


def _demo(args: argparse.Namespace) -> None:
    from expertmesh.demo import run_demo
    from expertmesh.model.checkpoint_maker import make_checkpoint

    model = Path(args.model)
    if not (model / "config.json").is_file():
        print(
            f"no checkpoint at {model}: building the {DEFAULT_DEMO_ARCH} ({DEFAULT_DEMO_SIZE}) demo checkpoint"
        )
        make_checkpoint(DEFAULT_DEMO_ARCH, DEFAULT_DEMO_SIZE, model)
    run_demo(model, max_tokens=args.max_tokens, dtype=args.dtype)


def _info(args: argparse.Namespace) -> None:
    from expertmesh.kernels import DISABLE_ENV, buildable_levels, isa_level, native_kernels
    from expertmesh.kernels.isa import ISA_ENV, cpu_model, machine

    print(f"CPU: {cpu_model()} ({machine()}); kernel levels it runs: {', '.join(buildable_levels())}")
    level = isa_level()  # a level the CPU lacks is an error here too
    kernels = native_kernels()
    if kernels is None:
        print(f"native kernels: off ({DISABLE_ENV}=0, or they failed to build: see the warning above)")
    else:
        print(f"native kernels: built for {level} ({ISA_ENV}={os.environ.get(ISA_ENV, 'native')})")
    if args.model is None:
        return
    from expertmesh.engine.llm_engine import LLMEngine

    # the served engine's defaults: decode steps of up to max_num_seqs rows, prefill chunks of the token budget
    engine = LLMEngine.from_checkpoint(args.model, args.dtype, skip_tokenizer_init=True)
    cache = engine.cache.describe()
    print(
        f"KV cache: {cache['layout']} per layer, {cache['bytes_per_token']} bytes a token, "
        f"{cache['blocks']} blocks of {cache['block_size']}"
    )
    print(f"kernels the load-time guard chose for {args.model} ({engine.model.embed_tokens.weight.dtype}):")
    for line in engine.kernel_report or ["(none measured: torch's kernels only)"]:
        print(f"  {line}")


def build_parser() -> argparse.ArgumentParser:
    from expertmesh.model.checkpoint_maker import ARCHITECTURES, DTYPES, SIZES

    parser = argparse.ArgumentParser(prog="expertmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in a family's HF layout")
    mk.add_argument("--arch", choices=ARCHITECTURES, required=True)
    mk.add_argument("--size", choices=SIZES, default="tiny")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", choices=DTYPES, default="float32")
    mk.add_argument("--max-shard-size", type=_size, default=None, help="e.g. 100MB: split into shards")
    mk.add_argument("out", type=Path)
    mk.set_defaults(func=_make_checkpoint)

    srv = sub.add_parser("serve", help="start Ray here, deploy the models, serve the OpenAI HTTP API")
    srv.add_argument("--config", type=Path, help="serve config YAML (see deployments/serve/)")
    srv.add_argument("--model", type=Path, help="a checkpoint directory, served alone")
    srv.add_argument("--name", help="served model name (default: the directory name)")
    srv.add_argument(
        "--expert-parallel", type=int, default=0, metavar="N", help="expert pools, N replicas each"
    )
    srv.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    srv.add_argument("--http-port", type=int, default=None, help="default 8000, or the config's")
    srv.add_argument("--grpc-port", type=int, default=None, help="default 9000, or the config's")
    srv.add_argument(
        "--metrics-port", type=int, default=8080, help="Ray's metrics export port, which Prometheus scrapes"
    )
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument(
        "--api-key", default=os.environ.get("EXPERTMESH_API_KEY"), help="require this bearer key"
    )
    srv.set_defaults(func=_serve)

    gen = sub.add_parser(
        "generate", help="stream a completion: from a server (--url) or a checkpoint, in process"
    )
    gen.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (then --model is its name)")
    gen.add_argument(
        "--model", required=True, help="checkpoint directory, or the served model name with --url"
    )
    gen.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("prompt")
    gen.set_defaults(func=_generate)

    demo = sub.add_parser("demo", help="batch of sample prompts through the offline engine, streamed live")
    demo.add_argument(
        "--model", type=Path, default=Path("checkpoints") / f"{DEFAULT_DEMO_ARCH}-{DEFAULT_DEMO_SIZE}"
    )
    demo.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.set_defaults(func=_demo)

    info = sub.add_parser(
        "info",
        help="this CPU, the ISA level the kernels are built for, and (with --model) what the guard chose",
    )
    info.add_argument(
        "--model", type=Path, help="a checkpoint: time its ops, native against torch, as a load does"
    )
    info.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValidationError as exc:  # settings from the flags or a config file: one line per field
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or exc.title
            print(f"error: {where}: {error['msg']}", file=sys.stderr)
        return 2
    except (ExpertMeshError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
