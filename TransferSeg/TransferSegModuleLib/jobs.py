"""Running a model in a child process (``transferseg segment`` / ``detect``) and importing what it
wrote, a file at a time: :class:`SegmentJob` and :class:`ResultImport`; the status line of a finished run."""
from __future__ import annotations

import functools
import json
import locale
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import slicer

from TransferSegLib.models import find_model, method_of
from TransferSegLib.volume import TransferSegError
from .devices import child_python
from .results import (INPUT_ROLE, detection_rows, link_companions, report_rows, run_report, segment_rows,
                      write_points_into, write_segments_into)
from .scene import check_input_node, grid_of, remove_nodes
from .voxels import BackgroundCall, NodeVoxels, read_heatmap_output, read_scalar_output, read_view_labels, write_input

if TYPE_CHECKING:  # the logic starts jobs; a job only calls back into it
    from .logic import TransferSegLogic

VIEW_NAMES = ("axial", "coronal", "sagittal")
#: colour maps, first one present in the scene wins (the desktop loads the file-based ones)
DISAGREEMENT_COLORS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeIron",
                       "vtkMRMLColorTableNodeRainbow")
HEATMAP_COLORS = ("vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeIron")
FUSIONS = ("vfn", "vfn-noimage", "majority", "staple")
#: ``transferseg`` exit status for a cancelled run (SIGINT/SIGTERM handled between windows)
EXIT_INTERRUPTED = 130


def parse_progress_line(line: str):
    """``"PROGRESS 0.4200 inference"`` → ``(0.42, "inference")``; any other line → None."""
    parts = line.strip().split(" ", 2)
    if len(parts) < 2 or parts[0] != "PROGRESS":
        return None
    try:
        fraction = float(parts[1])
    except ValueError:
        return None
    return min(max(fraction, 0.0), 1.0), (parts[2] if len(parts) > 2 else "")


def status_text(fraction: float, stage: str, multiview: bool) -> str:
    """What the status line says while the child runs: Initializing → view k/3 → Fusing → …"""
    stage = (stage or "").strip()
    if not stage or stage.startswith(("starting", "loading", "resampling")) and fraction < 0.04:
        return "Initializing"
    if stage.startswith("fusing"):
        return "Fusing"
    if multiview and 0.04 <= fraction < 0.04 + 0.86 * 0.85:
        # the multi-view method spends its first 85 % on the three view networks, in order
        view = min(int((fraction - 0.04) / (0.86 * 0.85) * 3), 2)
        return f"View {view + 1}/3 ({VIEW_NAMES[view]})"
    if stage.startswith("resampling back") or stage.startswith("post-processing"):
        return "Finishing"
    if stage == "done":
        return "Writing results"
    return "Segmenting" if 0.04 <= fraction < 0.9 else stage[:1].upper() + stage[1:]


def format_seconds(seconds: float) -> str:
    """``12.3 s``, or ``2 min 05 s`` from a minute on."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def done_status(seconds: float, result: dict, confidences: list | None = None) -> str:
    """The status line of a finished run: its warnings and device fallbacks (e.g. out of GPU memory → CPU),
    then the time taken and what was found: each segment's volume in mL, or the number of lesions and
    their confidences (``confidences``, for a detection run)."""
    notes = [str(n) for n in (result.get("warnings") or []) + (result.get("fallbacks") or [])]
    found = [f"{name} {float(ml):.1f} mL" for name, ml in (result.get("volumes_ml") or {}).items()]
    if confidences is not None:
        shown = ", ".join(f"{float(c):.2f}" for c in confidences[:5]) + (", …" if len(confidences) > 5 else "")
        found.append(f"{len(confidences)} lesion{'' if len(confidences) == 1 else 's'}"
                     + (f" (confidence {shown})" if confidences else ""))
    head = "Done: " + "; ".join(notes) if notes else "Done"
    return f"{head} — {format_seconds(seconds)}" + (": " + ", ".join(found) if found else "")


class SegmentJob:
    """One run of a model: Segmenting → Importing → Done | Cancelled | Failed.

    Nothing slow runs on the GUI thread.  Starting only validates the node: a worker thread writes
    its voxels as they are (own type, uncompressed, exact geometry) and the child starts when that
    file is complete.  The model runs in ``python -m TransferSegLib.cli segment|detect …
    --progress-lines``, a child process started by ``slicer.util.launchConsoleProcess`` (no console
    window on Windows) that never imports Slicer.  :meth:`poll` (a GUI timer calls it; tests call
    :meth:`wait`) reads the child's output and, once it has finished, puts every file of
    ``result.json["files"]`` into the scene (:class:`ResultImport`: files read on a worker thread,
    nodes built on the GUI thread).  :meth:`cancel` stops the writing, kills the whole process tree
    with psutil or stops the import, and returns at once; a cancelled or failed job leaves the scene
    as it was and no file behind.  Its files live in a folder under ``logic.temporaryFolder``
    (Slicer's own temporary folder in the GUI); :meth:`close` removes it at once, for when Slicer
    closes and nothing will poll again.
    """

    SEGMENTING, IMPORTING, DONE, CANCELLED, FAILED = "Segmenting", "Importing", "Done", "Cancelled", "Failed"

    def __init__(self, logic: "TransferSegLogic", input_node, model: str, device: str = "auto", roi_node=None,
                 fusion: str | None = None, python: str | None = None, output_segmentation=None,
                 output_detections=None):
        """``output_segmentation``: a segmentation node a segmentation run writes into (its segments replaced
        when the run is done, the nodes an earlier run linked to it replaced by this run's); None: a new one.
        ``output_detections``: the same for a detection (heatmap) model's run: a point list whose points are
        replaced, and whose heatmap and table give way to this run's."""
        self.started = time.monotonic()
        self.seconds = None  # the run's wall time, once done
        self.logic, self.input_node, self.model, self.device = logic, input_node, model, device
        self.roi_node, self.fusion, self.python = roi_node, fusion, python
        self.output_segmentation, self.output_detections = output_segmentation, output_detections
        self.state, self.fraction, self.stage, self.message = self.SEGMENTING, 0.0, "starting", ""
        self.status = "Initializing"
        self.log: list[str] = []
        self.outputs: TransferSegOutputs | None = None
        self.result: dict | None = None
        self.card: dict | None = None
        self._process = None
        self._lines = None
        self._folder = None
        self._command_line = None
        self._input = None  # the node's voxels while the worker writes them
        self._writing = None  # the worker writing input.nrrd
        self._importer = None
        self._cancel_requested = False
        self._output_done = False  # the reader has seen the end of the child's output
        self._start()

    # --- starting -------------------------------------------------------------------------
    def _command(self, input_path: Path) -> list:
        card_path = find_model(self.model)  # a wrong name fails here, before any process starts
        self.card = json.loads(card_path.read_text(encoding="utf-8"))
        heatmap = self.card.get("task") == "heatmap"
        command = [self.python, "-m", "TransferSegLib.cli", "detect" if heatmap else "segment", str(input_path),
                   "-o", str(self._folder / "out"), "--model", str(card_path), "--device", self.device or "auto",
                   "--progress-lines"]
        if self.roi_node is not None:
            bounds = [0.0] * 6
            self.roi_node.GetRASBounds(bounds)
            if not bounds[0] < bounds[1] or not bounds[2] < bounds[3] or not bounds[4] < bounds[5]:
                raise TransferSegError(f"the ROI '{self.roi_node.GetName()}' is empty; place it on the volume")
            command += ["--roi-ras", ",".join(f"{v:.6f}" for v in bounds[0::2] + bounds[1::2])]
        if self.fusion and method_of(self.card)["name"] == "multiview" and not heatmap:
            if self.fusion not in FUSIONS:
                raise TransferSegError(f"fusion must be one of {', '.join(FUSIONS)}; got {self.fusion!r}")
            command += ["--fusion", self.fusion]
        return command

    def _start(self) -> None:
        """On the GUI thread: validate, then hand the voxels to a worker thread (no copy, no conversion)."""
        _, geometry = check_input_node(self.input_node)  # validated before any thread or process starts
        parent = self.logic.temporaryFolder
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._folder = Path(tempfile.mkdtemp(prefix="transferseg-", dir=parent or None))
        try:
            self._command_line = self._command(self._folder / "input.nrrd")
            self._input = NodeVoxels(self.input_node)
            self._writing = BackgroundCall(write_input, self._input, geometry, self._folder / "input.nrrd")
        except BaseException:
            self._cleanup()
            raise

    def _launch(self) -> None:
        """Start the child on the complete input file, and a thread that reads its output lines."""
        command = self._command_line
        if not self.python:
            self.python = child_python()
        command[0] = self.python
        library_root = str(Path(__import__("TransferSegLib").__file__).resolve().parents[1])
        # launchConsoleProcess reads the child's output in the locale's encoding: the child writes in it,
        # replacing what that encoding cannot hold (e.g. "×" under an ASCII locale) instead of failing.
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [library_root, os.environ.get("PYTHONPATH")])),
               "PYTHONIOENCODING": locale.getpreferredencoding(False) + ":replace", "PYTHONUNBUFFERED": "1"}
        # Slicer's own environment (not the launcher-stripped startup one): PythonSlicer needs it.
        self._process = slicer.util.launchConsoleProcess(command, useStartupEnvironment=False, updateEnvironment=env)
        self._lines = queue.Queue()

        def pump(stream, sink):
            try:
                while True:
                    try:
                        line = stream.readline()
                    except UnicodeDecodeError:  # one undecodable line must not stop the reading
                        continue
                    if not line:
                        break
                    sink(line.rstrip("\r\n"))
            finally:
                sink(None)  # end of output: poll may finish the job

        threading.Thread(target=pump, args=(self._process.stdout, self._lines.put), daemon=True).start()

    # --- running --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state in (self.SEGMENTING, self.IMPORTING)

    def poll(self) -> str:
        """Advance the state machine; returns the state.  Never blocks."""
        if self.state == self.IMPORTING:
            self._poll_import()
        elif self.state == self.SEGMENTING:
            if self._process is None:
                self._poll_writing()
            else:
                self._poll_child()
        return self.state

    def _poll_writing(self) -> None:
        if not self._writing.done:
            return
        if self._cancel_requested:
            self._finish(self.CANCELLED, "Cancelled")
            return
        try:
            self._writing.result()
            if self._input.changed(self.input_node):  # edited while the worker read it: the file may mix both
                raise TransferSegError("the input volume changed while it was handed to the model; "
                                       "run Segment again")
            self._input = None
            self._launch()
        except Exception as e:
            self._finish(self.FAILED, str(e))

    def _poll_child(self) -> None:
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._output_done = True
                break
            parsed = parse_progress_line(line)
            if parsed:
                self.fraction, self.stage = parsed
                self.status = status_text(self.fraction, self.stage, self._multiview)
            elif line.strip():
                self.log.append(line)
        code = self._process.poll()
        if code is None or not (self._output_done or self._cancel_requested):
            return
        if self._cancel_requested:
            self._finish(self.CANCELLED, "Cancelled")
        elif code == 0:
            self._import()
        elif code == EXIT_INTERRUPTED:
            self._finish(self.CANCELLED, "Cancelled")
        else:
            self._finish(self.FAILED, failure_message(code, self.log))

    @property
    def _multiview(self) -> bool:
        return bool(self.card) and method_of(self.card)["name"] == "multiview"

    def wait(self, timeout: float = 600.0, interval: float = 0.05) -> str:
        return wait_while(self, (self.SEGMENTING, self.IMPORTING), timeout, interval)

    def cancel(self) -> None:
        """Stop the input's writing, kill the child and everything it started (psutil: the same on
        Windows, macOS and Linux), or stop the import and remove what it built.

        Returns at once; the next :meth:`poll` sees the work stopped and reports Cancelled.
        """
        if not self.running:
            return
        self._cancel_requested = True
        self.status = "Cancelling"
        if self._writing is not None:
            self._writing.stop.set()
        if self._process is not None and self.state == self.SEGMENTING:
            kill_process_tree(self._process.pid)
        if self._importer is not None:
            self._importer.cancel()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel a running job and remove its folder now, without waiting for :meth:`poll`
        (Slicer is closing: no timer will poll again).  Waits at most ``timeout`` s for the
        killed child and the worker threads to let go of its files (Windows cannot delete a file
        a process holds open)."""
        if self.running:
            self.cancel()
            if self._process is not None:
                try:
                    self._process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            if self._writing is not None:
                self._writing.join(timeout)
            if self._importer is not None:
                self._importer.wait(timeout)
            self._finish(self.CANCELLED, "Cancelled")
        self._cleanup()

    def _import(self) -> None:
        self.state, self.status = self.IMPORTING, "Importing"
        out = self._folder / "out"
        try:
            self.result = json.loads((out / "result.json").read_text(encoding="utf-8"))
            heatmap = self.card.get("task") == "heatmap"
            self._importer = ResultImport(self.logic, self.input_node, out, self.result, self.card,
                                          target=self.output_detections if heatmap else self.output_segmentation)
        except Exception as e:
            self._finish(self.FAILED, f"importing the result failed: {e}")
            return
        self._poll_import()

    def _poll_import(self) -> None:
        if self._cancel_requested:
            if self._importer.idle:  # its worker no longer reads the folder
                self._finish(self.CANCELLED, "Cancelled")
            return
        try:
            if not self._importer.step():
                return
        except Exception as e:
            self._finish(self.FAILED, f"importing the result failed: {e}")
            return
        self.outputs = self._importer.outputs
        self.fraction = 1.0
        self.seconds = time.monotonic() - self.started
        confidences = self._importer.confidences  # None unless the model detects lesions
        self._finish(self.DONE, done_status(self.seconds, self.result, confidences))

    def _finish(self, state: str, message: str) -> None:
        self.state, self.message = state, message
        self.status = f"Failed: {message}" if state == self.FAILED else message if state == self.DONE else state
        self._input = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def wait_while(job, busy: tuple, timeout: float, interval: float) -> str:
    """Poll ``job`` (a :class:`SegmentJob` or a batch) until its state leaves ``busy``; past ``timeout`` seconds
    it is closed and fails.  For scripts and tests: the panel polls from a timer instead.  Returns the state."""
    deadline = time.monotonic() + timeout
    while job.poll() in busy:
        if time.monotonic() > deadline:
            job.close()
            job.message = f"timed out after {timeout:.0f} s"
            job.state, job.status = job.FAILED, f"Failed: {job.message}"
            break
        time.sleep(interval)
    return job.state


class ResultImport:
    """Puts the files of one run into the scene, one file at a time, all of them or none.

    Each file's voxels are read on a worker thread, in the file's own type, straight into the buffer
    its node then takes over (:func:`read_view_labels`, :func:`read_scalar_output`); the node is built
    on the GUI thread when the read is done.  Only the .seg.nrrd goes through Slicer's own reader, on
    the GUI thread (one uint8 label map: about 0.1 s for 512 × 512 × 200).  :meth:`step` never
    blocks; :meth:`cancel` and any error remove every node built so far.  With a ``target`` (a segmentation,
    or for a detection run a point list), the last step writes the new segments or points into it (the target
    and the nodes linked to it are untouched until then)."""

    def __init__(self, logic: "TransferSegLogic", inputNode, folder, result: dict, card: dict, target=None):
        self.logic, self.inputNode, self.card, self.target = logic, inputNode, card, target
        self.reference = grid_of(inputNode)  # outputs are checked against and placed on this grid
        self.outputs = TransferSegOutputs()
        self.confidences = None  # the detections' confidences, once read
        self.result = result  # its "lesions" (the run's report) fill the findings table
        files, folder = list(result["files"]), Path(folder)
        # (reader on a worker thread, or None: the builder reads; file; builder(file, what was read))
        self._steps = []
        if "segmentation.seg.nrrd" in files:
            self._steps.append((None, folder / "segmentation.seg.nrrd", self._segmentation))
        for view in VIEW_NAMES:
            if f"views/{view}.nii.gz" in files:
                self._steps.append((read_view_labels, folder / "views" / f"{view}.nii.gz",
                                    functools.partial(self._view, view)))
        if "disagreement.nii.gz" in files:
            self._steps.append((read_scalar_output, folder / "disagreement.nii.gz", self._disagreement))
        if "heatmap.nii.gz" in files:
            self._steps.append((read_heatmap_output, folder / "heatmap.nii.gz", self._heatmap))
        if "detections.json" in files:
            self._steps.append((None, folder / "detections.json", self._detections))
        self._reading = None  # (BackgroundCall, builder, file)
        self._finished = False

    # --- the builders, on the GUI thread --------------------------------------------------
    def _segmentation(self, path: Path, _) -> None:
        self.outputs.segmentation = self.logic.readSegmentation(path, f"{self.inputNode.GetName()} TransferSeg",
                                                                 self.inputNode, self.card)
        report = run_report(self.result, "segmentation")  # None for a result from before reports
        if report is None:
            rows = segment_rows(self.outputs.segmentation, self.card, self.reference)
        else:  # the organs from the label map, then the report's lesions
            organs = segment_rows(self.outputs.segmentation, self.card, self.reference,
                                  skip=report["summary"]["lesion_labels"])
            rows = report_rows(report, organs)
        self.outputs.findings = self.logic.findingsTable(rows, f"{self.inputNode.GetName()} TransferSeg findings",
                                                         report=report)

    def _view(self, view: str, path: Path, labels) -> None:
        self.outputs.views[view] = self.logic.viewSegmentation(labels, view, self.reference, self.inputNode, self.card)

    def _disagreement(self, path: Path, image) -> None:
        self.outputs.disagreement = self.logic.scalarOverlay(
            image, f"{self.inputNode.GetName()} view disagreement", self.reference, DISAGREEMENT_COLORS, lower=0.05)

    def _heatmap(self, path: Path, read) -> None:
        image, grid = read  # on the model's working grid, over the input's box: Slicer overlays it by geometry
        self.outputs.heatmap = self.logic.scalarOverlay(
            image, f"{self.inputNode.GetName()} lesion heatmap", grid, HEATMAP_COLORS, lower=0.05)

    def _detections(self, path: Path, _) -> None:
        detections = json.loads(path.read_text(encoding="utf-8"))["detections"]
        self.outputs.detections = self.logic.addDetections(path, f"{self.inputNode.GetName()} detections", self.card)
        report = run_report(self.result, "detections")  # None for a result from before reports
        rows = detection_rows(detections) if report is None else report_rows(report)
        self.outputs.findings = self.logic.findingsTable(rows, f"{self.inputNode.GetName()} detections table",
                                                         detections=True, report=report)
        self.confidences = [float(d["confidence"]) for d in detections]

    def _link(self) -> None:
        """Write into the target (if any), and link this run's other nodes to its output node (the segmentation,
        or a detection run's point list), replacing (removing) those an earlier run had linked to it."""
        outputs, target = self.outputs, self.target
        if outputs.segmentation is not None:
            new = outputs.segmentation
            if alive(target) and target is not new:
                write_segments_into(target, new, self.inputNode)
                remove_nodes(self.logic.scene, [new])
                outputs.segmentation = new = target
        elif outputs.detections is not None:
            new = outputs.detections
            if alive(target) and target is not new:
                write_points_into(target, new)
                remove_nodes(self.logic.scene, [new])
                outputs.detections = new = target
            new.SetNodeReferenceID(INPUT_ROLE, self.inputNode.GetID())  # a later input lets go of it
        else:
            return
        linked = dict(outputs.views, disagreement=outputs.disagreement, heatmap=outputs.heatmap,
                      findings=outputs.findings)
        remove_nodes(self.logic.scene, link_companions(new, linked))

    @property
    def idle(self) -> bool:
        """No worker is reading a file."""
        return self._reading is None or self._reading[0].done

    def step(self) -> bool:
        """Build what has been read and start reading the next file; True once every node is in the
        scene.  Never waits for a file."""
        try:
            while not self._finished:
                if self._reading is not None:
                    reading, build, path = self._reading
                    if not reading.done:
                        return False
                    self._reading = None
                    build(path, reading.result())  # one file's voxels, handed over to its node
                    del reading
                    continue
                if not self._steps:
                    self._link()
                    self.logic.placeUnderStudy(self.inputNode, self.outputs.nodes())
                    self.logic.showResult(self.inputNode, self.outputs)
                    self._finished = True
                    break
                read, path, build = self._steps.pop(0)
                if read is None:
                    build(path, None)
                else:
                    self._reading = (BackgroundCall(read, path, self.reference), build, path)
        except Exception:
            self.cancel()
            raise
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Wait at most ``timeout`` s for the file being read."""
        if self._reading is not None:
            self._reading[0].join(timeout)

    def cancel(self) -> None:
        """Stop reading and remove every node built so far: the scene is as it was."""
        if self._reading is not None:
            self._reading[0].stop.set()
        self._steps = []
        # the user's output node is never removed: it is written into only in the last step
        remove_nodes(self.logic.scene, [n for n in self.outputs.nodes() if n is not self.target])
        self.outputs = TransferSegOutputs()


def kill_process_tree(pid: int) -> None:
    """Kill a process and all its descendants, children first; never waits."""
    import psutil  # installed on the first Segment click (dependencies.PIP_PACKAGES), not bundled with Slicer

    try:
        parent = psutil.Process(pid)
        children = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in children + [parent]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def failure_message(code: int, log: list) -> str:
    """The child's own error line, or what its exit status says (an out-of-memory kill says so)."""
    errors = [line for line in log if line.strip()]
    text = "\n".join(errors[-20:])
    # SIGKILL that the user did not ask for: on Linux the kernel's out-of-memory killer.
    if code in (-9, 137) or "MemoryError" in text or "out of memory" in text.lower():
        return ("the computer ran out of memory (the segmentation process was stopped by the system); "
                "choose a smaller ROI, close other programs, or use the CPU if the GPU ran out")
    for line in reversed(errors):
        if line.startswith(("transferseg: error: ", "transferseg: interrupted")):
            return line[len("transferseg: "):].removeprefix("error: ")
    return errors[-1] if errors else f"the segmentation process exited with code {code}"


def alive(node) -> bool:
    """The node exists and is still in a scene (the user may have deleted it)."""
    return node is not None and node.GetScene() is not None


@dataclass
class TransferSegOutputs:
    """The nodes one run added to the scene (any of them may be None)."""

    segmentation: object = None
    views: dict = field(default_factory=dict)  # view name -> segmentation node
    disagreement: object = None
    heatmap: object = None
    detections: object = None
    findings: object = None  # a table node: each tumor component, or each detection

    def nodes(self) -> list:
        return [n for n in [self.segmentation, *self.views.values(), self.disagreement, self.heatmap,
                            self.detections, self.findings] if n is not None]
