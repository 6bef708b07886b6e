"""`slimrarts` command line: run (prune), train, cell-search (DARTS cell), export, report, info.

`run`, `train` and `cell-search` also run over several processes: `torchrun --nproc_per_node=N -m slimrarts run
<recipe>` (every process runs the command on its share of each batch; rank 0 alone prints and writes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .errors import EXIT_CODES, InputError, SlimrartsError, describe_os_error

__all__ = ["main"]


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a recipe YAML file (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.epochs=5 (repeatable; values are YAML)")
    p.add_argument("--out", help="run folder (default: runs/<recipe name>/<timestamp>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--force", action="store_true", help="delete an existing run in --out and start again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs and tables still print)")


def _load(args):
    from .recipe import load_recipe

    return load_recipe(args.recipe, args.overrides)


def _run_dir(args, recipe, sections: tuple[str, ...]) -> Path:
    """The run folder, checked (not yet created or cleared: that happens once the recipe, model and data passed
    their checks). Under torchrun the processes join their group here; rank 0 names and checks the folder."""
    from .commands.width import start_processes
    from .engine import dist
    from .engine.rundir import check_run_dir, default_run_dir

    if args.resume and not args.out:
        raise InputError("--resume needs --out: the run folder to continue")
    start_processes(recipe, sections)
    return dist.from_main(lambda: check_run_dir(Path(args.out) if args.out else default_run_dir(recipe.name),
                                                resume=args.resume, force=args.force))


def _is_cell_recipe(path: str) -> bool:
    from .recipe import is_cell_recipe

    return is_cell_recipe(path)


def _cell_overrides(overrides: list[str]) -> tuple[list[str], str | None]:
    """`model.genotype=<file>` (the issue's spelling) is the cell recipe's `train.genotype`."""
    out, genotype = [], None
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "model.genotype":
            genotype = value.strip()
        else:
            out.append(item)
    return out, genotype


def cmd_cell_search(args) -> int:
    """Search a DARTS cell (topology) with a cell recipe; writes the genotype, α per epoch and cell drawings."""
    from .commands import search_command

    if not _is_cell_recipe(args.recipe):
        raise InputError(f"{args.recipe} is not a cell-search recipe (it has no 'net' section); prune widths with "
                         "`slimrarts run`")
    return search_command(args.recipe, args.overrides, out=args.out, resume=args.resume, force=args.force,
                          progress=not args.no_progress)


def cmd_train(args) -> int:
    """Train the recipe's model on its data with its `train` section (a baseline, or a cell recipe's eval net)."""
    from rich.table import Table

    if _is_cell_recipe(args.recipe):
        from .commands import train_command

        overrides, genotype = _cell_overrides(args.overrides)
        return train_command(args.recipe, overrides, out=args.out, resume=args.resume, force=args.force,
                             progress=not args.no_progress, genotype=genotype)

    from .commands.width import train_recipe
    from .engine import console
    from .metrics import format_count
    from .report import format_metric, metric_label

    recipe = _load(args)
    run_dir = _run_dir(args, recipe, ("train",))
    console.print(f"[bold]run folder[/] {run_dir}")
    report = train_recipe(recipe, run_dir, resume=args.resume, force=args.force, progress=not args.no_progress)
    params, macs = report["params"], report["macs"]
    t = Table(title=f"slimrarts train · {recipe.model.name} · {report['data']['dataset']}")
    metric = report.get("metric", "acc")
    for col in (f"{metric_label(metric)} (final epoch)", "params", "MACs / image", "epochs", "train time",
                "images/s"):
        t.add_column(col, justify="right")
    t.add_row(format_metric(metric, report["test_metric"]), format_count(params), format_count(macs),
              str(recipe.train.epochs),
              f"{report['train_s']:.1f} s", f"{report['images_per_s']:.0f}")
    console.print(t)
    return 0


def cmd_run(args) -> int:
    """Run the pruning pipeline of a recipe: search, select, remove, fine-tune."""
    from .commands.width import prune_recipe
    from .engine import console
    from .report import summary_table

    recipe = _load(args)
    run_dir = _run_dir(args, recipe, ("search", "finetune"))
    console.print(f"[bold]run folder[/] {run_dir}")
    report = prune_recipe(recipe, run_dir, resume=args.resume, force=args.force, progress=not args.no_progress)
    console.print(summary_table(report))
    return 0


def cmd_report(args) -> int:
    """Compare run folders in one table (Markdown), optionally with plots."""
    from ._io import atomic_write
    from .engine import console
    from .engine.rundir import MARKER
    from .runs import compare_runs

    md = Path(args.md) if args.md else None
    if md is not None and md.exists() and (md.parent / MARKER).is_file():
        raise InputError(f"--md {md} is a file of a run folder slimrarts made; write the table elsewhere")
    text = compare_runs([Path(p) for p in args.runs], plot=args.plot)
    console.print(text, markup=False, highlight=False)
    if md is not None:
        atomic_write(md, text + "\n")
    return 0


def cmd_export(args) -> int:
    """Export a run's slim model as ONNX or a PyTorch 2 program, checked against PyTorch (recorded in export.json)."""
    from .commands.export import export_run
    from .engine import console

    r = export_run(args.target, format=args.format, out=args.out, dynamic_batch=args.dynamic_batch,
                   batch_size=args.batch_size, int8=args.int8, calibration=args.calibration,
                   calibration_method=args.calibration_method, activations=args.activations)
    how = f"opset {r['opset']}, {r['exporter']}" if r["opset"] else r["exporter"]
    batch = f"dynamic batch, checked at {r['batch_sizes']}" if r["dynamic_batch"] else f"batch {r['traced_batch']}"
    lines = [f"wrote {r['file']} ({r['format']}, {how}, {batch})", f"checked against PyTorch on {r['inputs']}",
             f"max |Δ| {r['max_abs_diff']:.3g} <= tolerance {r['tolerance']:.3g} (atol {r['atol']:g} + rtol "
             f"{r['rtol']:g} × max|output|) in {r['runtime']}"]
    if "int8" in r:
        q, acc = r["int8"], r["int8"]["accuracy"]
        lines.append(f"wrote {q['file']} (int8 QDQ, {q['activation_type']} activations, per-channel "
                     f"{q['per_channel']}, reduce_range {q['reduce_range']}, {q['calibration_method']} calibration "
                     f"on {q['calibration_images']} training images)")
        for kind, agree in q["activation_choice"].items():
            lines.append(f"  {kind} activations: relative |Δ| to fp32 {agree['relative_error']:.3g}"
                         + (f", top-1 agreement {100 * agree['top1_agreement']:.1f}%" if "top1_agreement" in agree
                            else "") + " on the calibration images")
        lines.append(f"test accuracy in onnxruntime: fp32 {100 * acc['fp32']['acc']:.2f}% → int8 "
                     f"{100 * acc['int8']['acc']:.2f}% ({acc['int8']['images']} images)")
        for run in q["latency"]["runs"]:
            lines.append(f"batch {run['batch']}: fp32 {run['fp32_s'] * 1e3:.3g} ms → int8 {run['int8_s'] * 1e3:.3g} ms "
                         f"(×{run['speedup']:.2f})")
    if "recorded_in" in r:
        lines.append(f"recorded in {r['recorded_in']}")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_info(args) -> int:
    """Versions, devices, registered models and methods."""
    import platform

    import timm
    import torch
    import torch_pruning
    import torchvision

    from .engine import console
    from .methods import get_method, list_methods
    from .models import list_models
    from .timing import device_name
    from .version import __version__

    console.print(f"slimrarts {__version__} · python {platform.python_version()} · torch {torch.__version__} · "
                  f"torchvision {torchvision.__version__} · timm {timm.__version__} · torch-pruning "
                  f"{torch_pruning.__version__}")
    cuda = device_name("cuda:0") if torch.cuda.is_available() else "none"
    console.print(f"CUDA device: {cuda} · CPU threads: {torch.get_num_threads()}")
    console.print("zoo models: " + ", ".join(list_models()))
    for name in list_methods():
        m = get_method(name)
        needs = (f"{m.passes} passes/iteration, {'two nets' if m.two_nets else 'one net'}, {m.data} data"
                 if m.trains else "one-shot scores, no training")
        console.print(f"{m.kind} [bold]{name}[/]: {needs} — {m.source}")
    return 0


def main(argv: list[str] | None = None) -> int:
    codes = "\n".join(f"  {code:>3}  {what}" for code, what in EXIT_CODES.items())
    parser = argparse.ArgumentParser(prog="slimrarts", description=__doc__, epilog=f"exit codes:\n{codes}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help=cmd_train.__doc__)
    _add_run_args(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("run", help=cmd_run.__doc__)
    _add_run_args(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("cell-search", help=cmd_cell_search.__doc__)
    _add_run_args(p)
    p.set_defaults(fn=cmd_cell_search)
    p = sub.add_parser("report", help=cmd_report.__doc__)
    p.add_argument("runs", nargs="+", help="run folders holding report.json")
    p.add_argument("--md", help="also write the Markdown table to this file")
    p.add_argument("--plot", action="store_true", help="write widths and α-histogram PNGs (needs matplotlib)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("export", help=cmd_export.__doc__)
    p.add_argument("target", help="a run folder holding slim.pt, or a slim.pt")
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx",
                   help="onnx (checked in onnxruntime; needs the deploy extra) or pt2 (torch.export; loads with torch "
                        "alone); default onnx")
    p.add_argument("--out", help="the file to write (default: slim.onnx / slim.pt2 beside slim.pt)")
    p.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch axis, checked at two batch sizes")
    p.add_argument("--batch-size", type=int, default=1,
                   help="the batch size exported (fixed) or first checked (dynamic); default 1")
    p.add_argument("--int8", action="store_true",
                   help="also write <out>.int8.onnx: onnxruntime static int8 (QDQ) quantization, with fp32 and int8 "
                        "test accuracy and latency")
    p.add_argument("--calibration", type=int, default=256, help="training images to calibrate int8 on; default 256")
    p.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="how the calibration estimates activation ranges; default minmax")
    p.add_argument("--activations", choices=("auto", "int8", "uint8"), default="auto",
                   help="int8 activations signed (S8S8), unsigned (U8S8), or auto: both tried, the one closer to fp32 "
                        "on the calibration images kept; default auto")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("info", help=cmd_info.__doc__)
    p.set_defaults(fn=cmd_info)
    args = parser.parse_args(argv)
    from .engine import dist

    t0 = time.perf_counter()
    fn = args.fn
    if dist.launched():
        fn = _as_rank(fn)
    try:
        with _sigterm_interrupts():
            code = fn(args)
        dist.shutdown()  # all ranks finished: leave the group together
        return code
    except SlimrartsError as err:
        if os.environ.get("SLIMRARTS_DEBUG"):
            raise
        word = "error" if err.exit_code == 2 else "stopped"
        print(f"slimrarts {args.command}: {word}: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # the disk or the file system (ENOSPC, EROFS, a folder that is a file): not a bug
        if os.environ.get("SLIMRARTS_DEBUG"):
            raise
        print(f"slimrarts {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # out of memory (CUDA's OutOfMemoryError, or the CPU allocator's) is the batch
        if not _out_of_memory(err) or os.environ.get("SLIMRARTS_DEBUG"):
            raise
        print(f"slimrarts {args.command}: error: out of memory ({str(err).splitlines()[0][:200]}); lower "
              "data.batch_size (--set data.batch_size=<smaller>) and continue with --resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slimrarts {args.command}: interrupted after {time.perf_counter() - t0:.0f} s; "
              "continue with --resume --out <run folder>", file=sys.stderr)
        return 130
    # anything else is a bug: Python prints its traceback and exits 1


@contextlib.contextmanager
def _sigterm_interrupts():
    """While the command runs, SIGTERM (a scheduler's stop, `kill`, torchrun stopping its workers) ends it as
    Ctrl-C does: the current epoch is abandoned, the last checkpoint stays and the exit code is 130."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _out_of_memory(err: RuntimeError) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def _as_rank(fn):
    """`fn` as one rank of a torchrun group: only rank 0 prints, collective failures become `dist.PeerError`, and
    an unexpected error is recorded for torchrun's failure summary (torch.distributed.elastic's `record`)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from .engine import console, dist

    if os.environ.get("RANK", "0") != "0":
        console.quiet = True

    def run(args) -> int:
        with dist.peer_errors():
            return fn(args)

    return record(run)


if __name__ == "__main__":
    sys.exit(main())
