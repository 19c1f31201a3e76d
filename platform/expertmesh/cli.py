"""Command line: `expertmesh make-checkpoint | generate | demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    from expertmesh.engine.llm import LLM
    from expertmesh.engine.sampling_params import SamplingParams

    llm = LLM(args.model, args.dtype)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    for out in llm.generate_stream([args.prompt], params):
        sys.stdout.write(out.outputs[0].delta_text)
        sys.stdout.flush()
        if out.finished:
            print(f"\n[finish_reason={out.outputs[0].finish_reason}, tokens={out.num_output_tokens}]")


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

    gen = sub.add_parser("generate", help="stream a completion from a checkpoint, in process")
    gen.add_argument("--model", required=True, type=Path)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ExpertMeshError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
