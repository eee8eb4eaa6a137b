"""Command line: ``python -m ditkern info | demo | bench | compare`` (also installed as ``ditkern``)."""

from __future__ import annotations

import argparse
import ast
import sys


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _kv(text: str) -> dict:
    """``"order=2,interval=3"`` -> ``{"order": 2, "interval": 3}`` (values as Python literals, else strings)."""
    out = {}
    for item in _csv(text):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected key=value pairs separated by commas, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def patch_options(args: argparse.Namespace) -> dict:
    """The ``ditkern.patch`` options that ``compare``'s flags name."""
    import ditkern  # noqa: PLC0415

    opts: dict = {}
    if args.no_fused_norms:
        opts["fused_norms"] = False
    if args.backend:
        opts["backend"] = args.backend
    if args.cache is not None:
        opts["cache"] = ditkern.TaylorCache(**_kv(args.cache))
    if args.quant is not None:  # a preset name ("int4", "w4a8"), or QuantConfig fields
        opts["quant"] = ditkern.QuantConfig(**_kv(args.quant)) if "=" in args.quant else args.quant
    if args.attention is not None:
        opts["attention"] = ditkern.WindowAttention(**_kv(args.attention))
    return opts


def parser() -> argparse.ArgumentParser:
    from ditkern.demo import DEFAULT_SETTINGS, DEMO_STEPS, SETTINGS  # noqa: PLC0415
    from ditkern.zoo import FAST_NAMES, NAMES as zoo_names  # noqa: PLC0415 (diffusers is imported on first load)

    p = argparse.ArgumentParser(prog="python -m ditkern", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{info,demo,bench,compare}")
    sub.add_parser("info", help="versions, GPU, and which backend runs each op (and why the others cannot)",
                   description="Versions, the GPU, and which backend runs each op (and why the others cannot).")
    demo = sub.add_parser(
        "demo", help="patch the reference pipelines with every setting, generate digits with and without, compare",
        description="The reference pipelines, unpatched beside every setting: patch report, fidelity/speed table, "
                    "a PNG of every setting's samples and a speed-vs-PSNR plot.")  # fmt: skip
    demo.add_argument("--out", default="out/ditkern_demo.png", help="where to write the PNG (default: %(default)s)")
    demo.add_argument("--settings", type=_csv, default=list(DEFAULT_SETTINGS),
                      help=f"comma-separated rows, of: {', '.join(f'{k} ({v})' for k, v in SETTINGS.items())} "
                           f"(default: {','.join(DEFAULT_SETTINGS)})")  # fmt: skip
    demo.add_argument("--seeds", type=int, default=10,
                      help="images per pipeline; image i shows digit i %% 10 (default: 10)")
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help="denoising steps (default: %(default)s)")
    demo.add_argument("--pipeline", type=_csv, help=f"comma-separated zoo pipelines, of: {', '.join(zoo_names)} "
                                                    f"(default: {','.join(FAST_NAMES)})")  # fmt: skip
    demo.add_argument("--quick", action="store_true", help="a tiny random model only (seconds; no reference models)")
    bench = sub.add_parser(
        "bench", help="benchmarks: `bench [ARGS]` = python -m bench.run, `bench e2e [ARGS]` = python -m bench.e2e",
        description="`python -m ditkern bench [ARGS]` runs the kernel suite (python -m bench.run ARGS); "
                    "`python -m ditkern bench e2e [ARGS]` the end-to-end transformer benchmark (python -m bench.e2e "
                    "ARGS). Both live in the source checkout's bench/ (run from the repository root); "
                    "`bench --help` / `bench e2e --help` list their options.",
        add_help=False)  # fmt: skip
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for bench.run, or e2e and bench.e2e's")
    cmp = sub.add_parser(
        "compare", help="one zoo pipeline, unpatched vs patched with any options: the fidelity table",
        description="Generate digits with a zoo pipeline unpatched, then patched with the options given, and print "
                    "the fidelity table (time, speedup, PSNR, max error, class accuracy) and the patch report.")
    cmp.add_argument("--pipeline", default="digits-flux", choices=zoo_names, help="(default: %(default)s)")
    cmp.add_argument("--seeds", type=int, default=10, help="images; image i shows digit i %% 10 (default: 10)")
    cmp.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's own, 12)")
    cmp.add_argument("--cache", metavar="K=V,...",
                     help="a Taylor cache: ditkern.TaylorCache fields, e.g. order=2,interval=3")
    cmp.add_argument("--quant", metavar="PRESET|K=V,...",
                     help="weight quantization: a preset (int4, fp4, fp6, w4a8, ...) or QuantConfig fields, e.g. "
                          "format=int4,group_size=32")  # fmt: skip
    cmp.add_argument("--attention", metavar="K=V,...",
                     help="window attention: ditkern.WindowAttention fields, e.g. window=5")
    cmp.add_argument("--backend", choices=["auto", "cuda", "triton", "torch"], help="force the fused ops' backend")
    cmp.add_argument("--no-fused-norms", action="store_true", help="leave the adaLN norms unfused")
    cmp.add_argument("--report", action="store_true", help="print the whole patch report, not only its summary")
    return p


def _bench(args: list[str]) -> int:
    try:
        if args[:1] == ["e2e"]:
            from bench.e2e import main as run  # noqa: PLC0415

            args = args[1:]
        else:
            from bench.run import main as run  # noqa: PLC0415
    except ImportError as exc:
        raise SystemExit(f"python -m ditkern bench: the benchmarks live in the source checkout's bench/ and are not "
                         f"installed with the package; run this from the repository root ({exc})") from exc
    return int(run(args) or 0)


def _compare(args: argparse.Namespace) -> int:
    from ditkern.zoo import fidelity, load  # noqa: PLC0415

    opts = patch_options(args)
    reports = []

    def apply(pipe):
        import ditkern  # noqa: PLC0415

        reports.append(ditkern.patch(pipe, **opts))

    def undo(pipe):
        import ditkern  # noqa: PLC0415

        ditkern.unpatch(pipe)

    given = {k: getattr(args, k) for k in ("cache", "quant", "attention", "backend") if getattr(args, k) is not None}
    setting = " ".join([*(f"{k}({v})" for k, v in given.items()), *(["no fused norms"] if args.no_fused_norms else [])])
    setting = setting or "lossless (defaults)"
    r = fidelity.compare(load(args.pipeline), range(args.seeds), apply=apply, undo=undo, setting=setting,
                         sampler=None if args.steps is None else {"num_inference_steps": args.steps})  # fmt: skip
    print(reports[0] if args.report else reports[0].summary())
    print(r)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after it, --help included, belongs to bench.run / bench.e2e
        return _bench(argv[1:])
    args = parser().parse_args(argv)
    if args.cmd == "info":
        from ditkern.info import info  # noqa: PLC0415

        info()
    elif args.cmd == "demo":
        from ditkern.demo import main as demo_main  # noqa: PLC0415

        demo_main(out=args.out, quick=args.quick, settings=args.settings, seeds=args.seeds, steps=args.steps,
                  pipelines=args.pipeline)  # fmt: skip
    elif args.cmd == "bench":
        return _bench(args.args)
    elif args.cmd == "compare":
        return _compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
