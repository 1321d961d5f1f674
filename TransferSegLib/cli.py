"""The `transferseg` command.

Every subcommand is a thin adapter: it parses arguments, calls the library, and prints.
A :class:`TransferSegError` becomes one line on stderr and exit status 2, never a traceback.
The library's heavy modules (SimpleITK, scipy, torch, matplotlib) are imported inside the commands
that need them, so that `transferseg --help` and `--version` stay fast.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .atomic import check_output_folder
from .models import (DEFAULT_DETECTION_MODEL, DEFAULT_SEGMENTATION_MODEL, component_specs, compose_models,
                     list_models, method_of, model_dirs, read_card)
from .progress import CancelToken, Cancelled, one_line
from .volume import TransferSegError, roi_from_ras

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _say(text="", file=None, flush=True) -> None:
    """Print one line: a file name or a card's string in it cannot break it in two (nor forge a
    ``PROGRESS`` line), its control characters are shown escaped."""
    print(one_line(text), file=file if file is not None else sys.stdout, flush=flush)


def _cmd_info(args) -> int:
    # heavy: imported when the command runs (see the module docstring)
    from .io import load_volume

    volume = load_volume(args.input)
    summary = volume.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    k, j, i = summary["shape_kji"]
    sk, sj, si = summary["spacing_kji_mm"]
    ek, ej, ei = summary["extent_kji_mm"]
    _say(f"file:         {args.input}")
    _say(f"shape:        {i} × {j} × {k} voxels (i × j × k; array axes (k, j, i) = {k}, {j}, {i})")
    _say(f"spacing:      {si:g} × {sj:g} × {sk:g} mm (i × j × k)")
    _say(f"extent:       {ei:g} × {ej:g} × {ek:g} mm")
    _say(f"orientation:  {summary['orientation']}")
    _say("origin:       RAS ({:g}, {:g}, {:g}) mm".format(*summary["origin_ras_mm"]))
    _say(f"intensity:    {summary['intensity_min']:g} … {summary['intensity_max']:g} "
          f"(mean {summary['intensity_mean']:.4g})")
    _say(f"memory:       {summary['memory_mib']:.1f} MiB as float32")
    return 0


class _ProgressPrinter:
    """Renders ``(fraction, stage)`` as a tqdm bar, or as ``PROGRESS <0..1> <stage>`` lines for the Slicer module."""

    def __init__(self, lines: bool):
        self.lines, self.bar, self.stage = lines, None, None

    def __call__(self, fraction: float, stage: str) -> None:
        if self.lines:
            _say(f"PROGRESS {fraction:.4f} {stage}", flush=True)
            return
        if self.bar is None:
            self.bar = tqdm(total=1000, unit="‰", file=sys.stderr, leave=False, disable=not sys.stderr.isatty(),
                            bar_format="{desc:<16} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        if stage != self.stage:
            self.bar.set_description_str(one_line(stage))
            self.stage = stage
        self.bar.update(int(round(fraction * 1000)) - self.bar.n)

    def write(self, line: str) -> None:
        """Print a line on stdout without breaking the bar."""
        if self.bar is not None and not self.bar.disable:
            self.bar.write(one_line(line), file=sys.stdout)
        else:
            _say(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cancel_on_signals() -> CancelToken:
    """SIGINT / SIGTERM cancel the run between windows instead of killing it mid-write."""
    token = CancelToken()

    def handler(signum, frame):
        if token.cancelled:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        token.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return token


def _terminate_as_interrupt() -> None:
    """SIGTERM stops a command as Ctrl-C does (one line, exit 130, every atomic write undone) instead of
    killing it silently; commands that cancel between windows install their own handler over this one."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError, AttributeError):  # ValueError: not the main thread
        signal.signal(signal.SIGTERM, stop)


def _parse_box(text: str, name: str) -> tuple:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 6:
        raise TransferSegError(f"{name} needs six comma-separated numbers, e.g. 0,0,0,40,256,256; got {text!r}")
    return tuple(values)


# the task of the models each command runs
_TASK_OF_COMMAND = {"segment": "segmentation", "detect": "heatmap"}
_TASK_NAMES = {"segmentation": "a segmentation model", "heatmap": "a heatmap (lesion detection) model"}


def _check_model_task(command: str, model) -> None:
    """`segment` runs segmentation models, `detect` heatmap models: the other kind is refused from
    its card, before any volume is read or any model loaded."""
    card = read_card(model)
    task, wanted = card["task"], _TASK_OF_COMMAND[command]
    if task != wanted:
        other = next(c for c, t in _TASK_OF_COMMAND.items() if t == task)
        raise TransferSegError(f"model {card['name']} is {_TASK_NAMES[task]}, and `transferseg {command}` needs "
                               f"{_TASK_NAMES[wanted]}; use `transferseg {other}` for it")


def _cmd_segment(args) -> int:
    """One volume into -o as it is; a folder or several inputs (or any torchrun job): a batch.

    Checked first, before the model is even looked up (a wrong -o must not cost minutes): the
    cases' names, the output folder (for one volume, also that no file of the run would replace
    it; run_batch checks each case's folder so before any case runs), then the model's task."""
    # heavy: imported when the command runs (see the module docstring)
    from .batch import find_cases
    from .training.distributed import torchrun_world_size
    from .pipeline import output_names

    cases = find_cases(args.input)
    single = len(args.input) == 1 and [c.path for c in cases] == [Path(args.input[0]).expanduser()]
    one = single and torchrun_world_size() == 1
    output = check_output_folder(args.output, output_names(_TASK_OF_COMMAND[args.command]),
                                 input_path=args.input[0] if one else None)
    _check_model_task(args.command, args.model)
    return _segment_one(args, args.input[0], output) if one else _segment_batch(args, cases)


def _segment_one(args, source, output: Path) -> int:
    # heavy: imported when the command runs (see the module docstring)
    from .io import load_volume
    from .pipeline import check_writable, run
    from .provenance import command_line

    volume = load_volume(source)
    check_writable(volume)
    roi = None
    if args.roi is not None:
        roi = _parse_box(args.roi, "--roi")  # whole, finite voxel indices: checked by the pipeline
    elif args.roi_ras is not None:
        box = _parse_box(args.roi_ras, "--roi-ras")
        roi = roi_from_ras(volume, box[:3], box[3:])
    printer = _ProgressPrinter(args.progress_lines)
    try:
        result = run(volume, model=args.model, device=args.device, roi=roi, progress=printer,
                     cancel=_cancel_on_signals(), return_probabilities=False,
                     method_options={"fusion": getattr(args, "fusion", None)},
                     deterministic=getattr(args, "deterministic", False))
        result.provenance["command"] = command_line()
        result.write(output, input_path=source)
    finally:
        printer.close()
    for warning in result.warnings + result.fallbacks:
        _say(f"transferseg: warning: {warning}", file=sys.stderr)
    if result.task == "heatmap":
        _say(f"{len(result.detections)} detection(s)")
        for n, d in enumerate(result.detections[:10], 1):
            ras = ", ".join(f"{v:.1f}" for v in d.position_ras)
            _say(f"  {n:2d}. confidence {d.confidence:.3f} at IJK (k, j, i) {tuple(d.position_kji)}, RAS ({ras}) mm")
    else:
        for name, ml in result.volumes_ml().items():
            _say(f"{name}: {ml:.1f} mL")
        summary = result.method_summary
        if "share_views_differ" in summary:
            _say(f"views ({summary['fusion']} fusion): they disagree on {100 * summary['share_views_differ']:.1f} % "
                  f"of the segmentation (mean disagreement {summary['mean_disagreement']:.3f})")
    _say(f"device: {result.device}; " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    for name in result.outputs():
        _say(output / name)
    return 0


def _segment_batch(args, cases) -> int:
    """Every case to OUT/<case>, OUT/summary.csv; under torchrun each rank takes its share."""
    # heavy: imported when the command runs (see the module docstring)
    from .batch import SUMMARY_NAME, run_batch
    from .provenance import use_deterministic
    from .training.distributed import processes

    if args.roi is not None or args.roi_ras is not None:
        raise TransferSegError("--roi and --roi-ras apply to one volume; run the cases that need a box one by one")
    if args.deterministic:
        use_deterministic()
    cancel = _cancel_on_signals()
    with processes(args.device) as procs:
        printer = _ProgressPrinter(args.progress_lines) if procs.rank == 0 else None

        def done(row):
            if row["status"] == "ok":
                found = (f"{row['detections']} detection(s)" if "detections" in row else
                         ", ".join(f"{k[:-3]} {v:.1f} mL" for k, v in row.items() if k.endswith(" mL")))
                line = f"{row['case']}: ok in {row['seconds']:.1f} s; {found} -> {row['output']}"
            else:
                line = f"{row['case']}: failed: {row['error']}"
            if printer is not None:
                printer.write(line)
            else:
                _say(line, flush=True)

        try:
            rows = run_batch(cases, args.output, model=args.model, device=procs.device, progress=printer,
                             cancel=cancel, method_options={"fusion": getattr(args, "fusion", None)},
                             rank=procs.rank, world_size=procs.world, on_case=done)
        finally:
            if printer is not None:
                printer.close()
        failed = sum(row["status"] != "ok" for row in rows)
        if procs.rank == 0:
            summary = Path(args.output) / SUMMARY_NAME
            if failed:
                _say(f"{failed} of {len(rows)} cases failed; see {summary}", file=sys.stderr)
            else:
                _say(f"{len(rows)} case(s) done; see {summary}")
    return EXIT_USER_ERROR if failed else 0


def _cmd_train(args) -> int:
    # heavy: imported when the command runs (see the module docstring)
    from .training import load_config, train
    from .training.recipes import run_recipe

    config = load_config(args.config)
    printer = _ProgressPrinter(args.progress_lines)
    try:
        if "recipe" in config:
            card = run_recipe(config, args.output or Path("runs") / config["name"], progress=printer,
                              cancel=_cancel_on_signals(), max_steps=args.max_steps)
            result = f"model: {card}" if card else "stopped early; run the same command again to resume"
        else:
            result = train(config, args.output, progress=printer, cancel=_cancel_on_signals(),
                           max_steps=args.max_steps)
    finally:
        printer.close()
    print(result.summary() if hasattr(result, "summary") else result)
    return 0


def _cmd_evaluate(args) -> int:
    # heavy: imported when the command runs (see the module docstring)
    from .evaluation import evaluate, format_table

    printer = _ProgressPrinter(args.progress_lines)
    try:
        table = evaluate(args.model, args.data, device=args.device, csv_path=args.output,
                         progress=printer, cancel=_cancel_on_signals(), limit=args.limit)
    finally:
        printer.close()
    print(format_table(table))
    if args.output:
        _say(f"wrote {args.output}")
    return 0


def _cmd_models(args) -> int:
    cards = list_models()
    if args.json:
        print(json.dumps(cards, indent=2))
        return 0
    if not cards:
        _say("no models installed; looked in: " + ", ".join(str(d) for d in model_dirs()))
        return 0
    for card in cards:
        labels = ", ".join(seg["name"] for seg in card["labels"])
        parts = ", ".join(f"{name}: {spec['architecture']['name']} patch {spec['patch_size']}"
                          for name, spec in component_specs(card).items())
        spacing = card.get("working_spacing_mm")
        grid = f"working spacing {' × '.join(f'{v:g}' for v in spacing)} mm" if spacing else "runs on the input grid"
        _say(f"{card['name']}  v{card['version']}  {card['task']}  [{labels}]  {method_of(card)['name']} ({parts})  "
              f"{grid}")
        for key, value in (card.get("metrics") or {}).items():
            _say(f"    {key}: {value}")
        _say(f"    {card['_path']}")
    return 0


def _cmd_convert(args) -> int:
    """A 2D model → 3D (ACS, Mean-/Soft-ACS, 2.5D or I3D), weights kept; safetensors + its model card."""
    # heavy: imported when the command runs (see the module docstring)
    from .conversion import convert_from_source, save_converted

    config = json.loads(args.config) if args.config else None
    model, info = convert_from_source(args.source, to=args.to, num_classes=args.num_classes,
                                      weights_path=args.weights, architecture=args.architecture, config=config)
    card = save_converted(model, args.output, info)
    _say(f"converted {args.source} to {args.to}: {info['parameters_2d']:,} parameters in 2D, "
          f"{info['parameters_3d']:,} in 3D")
    _say(f"wrote {args.output} and {card}")
    return 0


def _cmd_compose(args) -> int:
    """Separately trained models → one composed model (one safetensors file, one sha256)."""
    components = {}
    for item in args.component:
        component, sep, model = item.partition("=")
        if not sep or not component or not model:
            raise TransferSegError(f"--component takes NAME=MODEL (e.g. axial=runs/a/model/a.json), not {item!r}")
        if component in components:
            raise TransferSegError(f"--component {component} is given twice")
        components[component] = model
    try:
        method_config = json.loads(args.method_config) if args.method_config else None
    except (ValueError, RecursionError) as e:  # RecursionError: lists thousands deep
        reason = getattr(e, "msg", None) or ("nested too deeply" if isinstance(e, RecursionError) else str(e))
        raise TransferSegError(f"--method-config is not valid JSON ({reason}): {args.method_config[:80]}") from None
    card_path = compose_models(components, args.output, name=args.name, method=args.method,
                               method_config=method_config, labels_from=args.labels_from, version=args.model_version)
    card = json.loads(card_path.read_text(encoding="utf-8"))
    _say(f"composed {card['name']} v{card['version']} ({card['method']['name']}, {card['task']}) from "
          f"{len(components)} model(s):")
    for component, source in card["training"]["composed_from"].items():
        spec = card["components"][component]
        _say(f"  {component}: {spec['architecture']['name']} from {source['model']} "
              f"(sha256 {source['sha256'][:12]}…)")
    _say(f"weights sha256 {card['weights']['sha256']}")
    _say(f"wrote {card_path.with_name(card['weights']['file'])} and {card_path}")
    return 0


def _cmd_phantom(args) -> int:
    # heavy: imported when the command runs (see the module docstring)
    from .phantoms import write_phantoms

    paths = write_phantoms(args.kind, args.output, seed=args.seed, count=args.count)
    for path in paths:
        _say(path)
    return 0


def _cmd_demo(args) -> int:
    """The main job end to end on phantoms (:func:`TransferSegLib.demo.run_demo`): a line per step as
    it ends, then the summary table and the output folder's layout."""
    # heavy: imported when the command runs (see the module docstring)
    from .demo import format_summary, run_demo

    printer = _ProgressPrinter(lines=False)

    def say(line: str) -> None:
        if printer.bar is not None:
            printer.bar.clear()
        print(line, flush=True)

    try:
        summary = run_demo(args.output, seed=args.seed, device=args.device, progress=printer,
                           cancel=_cancel_on_signals(), log=say)
    finally:
        printer.close()
    print()
    print(format_summary(summary))
    print(f"\nwrote {len(summary['files'])} files under {summary['output']}/:")
    for step, what in summary["layout"].items():
        print(f"  {step + '/':<11} {what}")
    print("  summary.txt, summary.json: this table and every number")
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a wrong argument is one line on stderr like every other error (not a usage block)."""

    def error(self, message):
        _say(f"transferseg: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _named(text: str) -> str:
    """A path argument: an empty one would silently mean the working folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names nothing; give a file or folder name")
    return text


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a volume's shape, spacing, orientation, intensity range and size")
    p.add_argument("input", type=_named, help="NIfTI / NRRD / MetaImage file or DICOM series folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_info)


def _add_run_arguments(p, default_model) -> None:
    """What `segment` and `detect` share: inputs, output folder, model, device, region of interest."""
    p.add_argument("input", nargs="+", type=_named,
                   help="NIfTI / NRRD / MetaImage file or DICOM series folder; or a folder "
                   "of them, or several: each case goes to OUTPUT/<case name>, with OUTPUT/summary.csv")
    p.add_argument("-o", "--output", required=True, type=_named, help="output folder (created if missing)")
    p.add_argument("--model", default=default_model, type=_named,
                   help=f"model name or path (default {default_model})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--roi", help="voxel box k0,j0,i0,k1,j1,i1 (array order, half-open)")
    p.add_argument("--roi-ras", help="RAS box x0,y0,z0,x1,y1,z1 in mm")
    p.add_argument("--progress-lines", action="store_true", help="print 'PROGRESS <0..1> <stage>' lines")
    p.add_argument("--deterministic", action="store_true",
                   help="fixed seeds and PyTorch's deterministic algorithms: the same input, model and machine "
                   "give byte-identical files (see docs/cli.md for what it costs)")
    p.set_defaults(func=_cmd_segment)


def _add_segment_and_detect(sub) -> None:
    p = sub.add_parser("segment", help="segment a volume; writes .seg.nrrd, label map, result.json, overview.png "
                       "(+ per-view predictions and their disagreement for a multi-view model)")
    _add_run_arguments(p, DEFAULT_SEGMENTATION_MODEL)
    p.add_argument("--fusion", choices=("vfn", "vfn-noimage", "majority", "staple"), default=None,
                   help="multi-view models: how the three views are fused (default: the model card's)")
    _add_run_arguments(sub.add_parser(
        "detect", help="lesion heatmap and detections (DBT); writes heatmap, detections.json/.csv, overview.png"),
        DEFAULT_DETECTION_MODEL)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a JSON config (resumes from the last checkpoint)")
    p.add_argument("config", type=_named, help="training config (JSON); see Resources/configs/")
    p.add_argument("-o", "--output", default=None, type=_named, help="run folder (default: runs/<name>)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (for a quick try)")
    p.add_argument("--progress-lines", action="store_true", help="print 'PROGRESS <0..1> <stage>' lines")
    p.set_defaults(func=_cmd_train)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a model on a labelled data folder (MSD, LiTS or phantoms)")
    p.add_argument("--model", required=True, type=_named, help="model name or path")
    p.add_argument("--data", required=True, type=_named,
                   help="data folder: MSD (dataset.json), LiTS or phantom layout")
    p.add_argument("-o", "--output", default=None, type=_named, help="CSV file for the metrics table")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N cases")
    p.add_argument("--progress-lines", action="store_true", help="print 'PROGRESS <0..1> <stage>' lines")
    p.set_defaults(func=_cmd_evaluate)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a 2D model to 3D (ACS, mean_acs, soft_acs, 2.5d, 3d), weights kept")
    p.add_argument("--from", dest="source", required=True,
                   help="torchvision:NAME, transferseg:NAME, or a 2D .safetensors checkpoint")
    p.add_argument("--to", default="acs", choices=["acs", "mean_acs", "soft_acs", "2.5d", "3d"],
                   help="conversion (default acs)")
    p.add_argument("-o", "--output", required=True, type=_named,
                   help="output .safetensors (its model card .json is written beside it)")
    p.add_argument("--weights", default=None, type=_named,
                   help="local 2D weights (.safetensors) for a torchvision: source")
    p.add_argument("--architecture", default=None, help="architecture of a .safetensors source without a card")
    p.add_argument("--config", default=None, help="JSON config of a transferseg: architecture")
    p.add_argument("--num-classes", type=int, default=None, help="classifier / output size")
    p.set_defaults(func=_cmd_convert)


def _add_compose(sub) -> None:
    p = sub.add_parser("compose", help="assemble separately trained models into one composed model "
                                       "(method + components, one weights file)")
    p.add_argument("-o", "--output", required=True, type=_named, help="output folder: NAME.safetensors + NAME.json")
    p.add_argument("--name", required=True, help="the composed model's name")
    p.add_argument("--method", required=True, help="how the components run together: single | multiview | cascade")
    p.add_argument("--component", action="append", required=True, metavar="NAME=MODEL",
                   help="a component and its model (name, card or weights path); repeat for each, "
                        "e.g. --component axial=runs/a/model/a.json")
    p.add_argument("--method-config", default=None,
                   help='the method\'s config as JSON, e.g. \'{"fusion": "majority"}\'')
    p.add_argument("--labels-from", default=None, help="component whose task and labels the model takes "
                                                       "(default: the first)")
    p.add_argument("--model-version", default="1.0.0", help="version written in the card (default 1.0.0)")
    p.set_defaults(func=_cmd_compose)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list installed models and their cards")
    p.add_argument("--json", action="store_true", help="print the cards as JSON")
    p.set_defaults(func=_cmd_models)


def _add_phantom(sub) -> None:
    p = sub.add_parser("phantom", help="write seed-deterministic synthetic volumes and a PNG gallery")
    p.add_argument("kind", choices=["ct", "dbt", "shapes"], help="CT abdomen, DBT breast, or ACS shapes")
    p.add_argument("-o", "--output", required=True, type=_named, help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--count", type=int, default=1, help="number of cases (default 1)")
    p.set_defaults(func=_cmd_phantom)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on phantoms: a clinical-grid CT through the default and the "
                       "multi-view model, DBT lesion detection and its FROC, scored against the phantoms' truth")
    p.add_argument("-o", "--output", default="demo-output", type=_named,
                   help="output folder (default demo-output)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="transferseg",
        description="2D-to-3D transfer segmentation (AH-Net, ACS, H-DenseUNet, VFN) for CT and DBT volumes.",
    )
    parser.add_argument("--version", action="version", version=f"transferseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    for add in (_add_info, _add_segment_and_detect, _add_train, _add_evaluate, _add_convert, _add_compose,
                _add_models, _add_phantom, _add_demo):  # in the order `--help` lists them
        add(sub)
    return parser


def main(argv=None) -> int:
    for stream in (sys.stdout, sys.stderr):  # "×", "…" must not crash a C/POSIX-locale terminal
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")
    _terminate_as_interrupt()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except Cancelled as e:
        _say(f"transferseg: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TransferSegError as e:
        _say(f"transferseg: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _say("transferseg: interrupted; no half-written file was kept (each output folder is complete or as it "
             "was before)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # disk full, permission denied, …: the system's reason and the file, no traceback
        where = f": {e.filename}" if e.filename else ""
        _say(f"transferseg: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
