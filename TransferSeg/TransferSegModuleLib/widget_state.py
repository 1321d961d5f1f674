"""What the module's panel decides, without Qt: what a parameter change does, what the buttons enable,
what a click on Segment runs (one volume, or a batch), what the status line and the display controls say,
and what happens to a run when the scene or Slicer closes.  The widget (TransferSeg.py) reads the parameter
node, calls these and applies the answers to its controls; the tests call them on a real MRML scene.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from TransferSegLib.models import DEFAULT_DETECTION_MODEL, DEFAULT_SEGMENTATION_MODEL, method_of
from .batch import BatchJob, sequence_length
from .jobs import VIEW_NAMES, SegmentJob, TransferSegOutputs, alive
from .results import INPUT_ROLE, show_3d

#: task → (model-card task, default model); the widget adds each task's shown text
TASKS = {"ct": ("segmentation", DEFAULT_SEGMENTATION_MODEL), "dbt": ("heatmap", DEFAULT_DETECTION_MODEL)}
#: devices every computer lists; "mps" joins where torch can use Apple's GPU (:func:`device_choices`)
BASE_DEVICES = ("auto", "cpu", "cuda")


def task_of(card: dict | None) -> str | None:
    """The task key ("ct" or "dbt") of a model card, None without a card."""
    if not card:
        return None
    return "dbt" if card.get("task") == "heatmap" else "ct"


def is_multiview(card: dict | None) -> bool:
    return bool(card) and method_of(card)["name"] == "multiview"


def model_choices(cards: list) -> tuple[list, str]:
    """``(names, default)`` for the model combo box: every card's name (the default CT model when there is
    none, so the combo is never empty), and the default CT model if listed, else the first."""
    names = [card["name"] for card in cards] or [DEFAULT_SEGMENTATION_MODEL]
    return names, DEFAULT_SEGMENTATION_MODEL if DEFAULT_SEGMENTATION_MODEL in names else names[0]


def device_choices(mps: bool) -> list:
    """The device combo's values: auto, CPU, CUDA, and MPS where torch reported Apple's GPU."""
    return list(BASE_DEVICES) + (["mps"] if mps else [])


@dataclass
class Reaction:
    """What the widget does after a parameter change."""

    set: dict = field(default_factory=dict)  # parameters to set, in this order
    again: bool = False  # setting them fires the change again: nothing else to do now
    multiview: bool = False  # show the fusion choice
    output: str = "segmentation"  # which output choice shows: "segmentation", or "detections" for a heatmap model
    display_changed: frozenset = frozenset()  # display parameters to apply to the slice views


class PanelState:
    """The panel's memory between parameter changes: the last task, model, input and display values.

    Task and model stay consistent (a new task picks its default model, a new model sets its task); a
    new model that is multi-view selects its card's fusion; only a changed display parameter touches the
    slice views, so a new device never resets the user's layers; a new input volume lets go of an output
    segmentation or output point list made for another volume (the next run makes a new one, rather than
    overwriting it).
    """

    def __init__(self):
        self.task = self.model = self.input = None
        self.display = {}

    def connected(self, display: dict, input_id: str | None = None) -> None:
        """A parameter node is (re)connected: the slice views already show its display values."""
        self.display = dict(display)
        self.input = input_id

    def parameter_changed(self, task: str, model: str, display: dict, cards: dict, input_node=None,
                          output_segmentation=None, output_detections=None) -> Reaction:
        """``cards``: name → card of the listed models, in the combo's order."""
        card = cards.get(model)
        reaction = Reaction()
        if self.task is not None and task != self.task:
            self.task = task
            if task_of(card) != task:
                candidates = [name for name, c in cards.items() if task_of(c) == task]
                if candidates:
                    default = TASKS[task][1]
                    return Reaction(set={"model": default if default in candidates else candidates[0]}, again=True)
        elif model != self.model:
            self.model = model
            if task_of(card) and task_of(card) != task:
                self.task = task_of(card)
                return Reaction(set={"task": self.task}, again=True)
            if is_multiview(card):
                reaction.set["fusion"] = method_of(card)["config"].get("fusion", "vfn")
        self.task, self.model = task, model
        return self._rest(reaction, card, display, input_node, output_segmentation, output_detections)

    def _rest(self, reaction: Reaction, card, display: dict, input_node, output_segmentation,
              output_detections) -> Reaction:
        reaction.multiview = is_multiview(card)
        reaction.output = "detections" if task_of(card) == "dbt" else "segmentation"
        reaction.display_changed = frozenset(name for name in display if display[name] != self.display.get(name))
        self.display = dict(display)
        input_id = input_node.GetID() if input_node is not None else None
        if input_id != self.input:
            self.input = input_id
            if output_segmentation is not None and not output_fits(output_segmentation, input_node):
                reaction.set["outputSegmentation"] = None
            if output_detections is not None and not output_fits(output_detections, input_node):
                reaction.set["outputDetections"] = None
        return reaction


def output_fits(output_node, input_node) -> bool:
    """Whether a run on ``input_node`` may write into ``output_node`` (a segmentation, or a point list): it
    was made for no volume yet (e.g. by the user), or for ``input_node`` (a segmentation's reference volume,
    the volume a point list's run read)."""
    if output_node is None or input_node is None:
        return True
    role = output_node.GetReferenceImageGeometryReferenceRole() if output_node.IsA("vtkMRMLSegmentationNode") \
        else INPUT_ROLE
    reference = output_node.GetNodeReference(role)
    return reference is None or reference.GetID() == input_node.GetID()


@dataclass
class Buttons:
    segment: bool
    cancel: bool
    export: bool
    show3d: bool
    ready: bool  # an input and an installed model: the Segment tool tip says so


def buttons(has_input: bool, model_installed: bool, busy: bool, has_segmentation: bool) -> Buttons:
    """What the run, export and Show 3D buttons enable: nothing but Cancel during a run."""
    ready = has_input and model_installed
    return Buttons(segment=ready and not busy, cancel=busy, export=has_segmentation and not busy,
                   show3d=has_segmentation and not busy, ready=ready)


@dataclass
class RunPlan:
    """What a click on Segment runs, in the panel's batch mode (:data:`~.batch.BATCH_MODES`)."""

    count: int  # how many volumes (0: nothing to run yet)
    button: str  # the Segment button's text
    hint: str  # its tool tip: what it runs, or what to select first
    batch: bool  # a batch (new segmentations, one per volume) rather than one run


def run_plan(mode: str, input_node, checked_volumes, browser) -> RunPlan:
    """``mode`` "off": the input volume; "volumes": the checked volumes; "sequence": every item of the
    ``browser``'s volume sequence."""
    if mode == "volumes":
        count = len({node.GetID() for node in checked_volumes if node is not None})
        return RunPlan(count, f"Segment {count} volume{'' if count == 1 else 's'}" if count else "Segment",
                       "Run the model on each checked volume, one after the other" if count else
                       "Check the volumes to segment in the Batch section", batch=True)
    if mode == "sequence":
        count = sequence_length(browser)
        return RunPlan(count, f"Segment {count} sequence item{'' if count == 1 else 's'}" if count else "Segment",
                       "Run the model on every item of the sequence, one after the other" if count else
                       "Select a sequence of volumes in the Batch section", batch=True)
    return RunPlan(int(input_node is not None), "Segment", "Run the model on the selected volume"
                   if input_node is not None else "Select an input volume", batch=False)


@dataclass
class DisplayControls:
    views: dict  # view → its checkbox enabled
    overlay: bool  # the overlay checkbox and the opacity slider
    heatmap: bool  # the overlay is the lesion heatmap (else the views' disagreement)
    threshold: bool  # the confidence slider
    findings: bool  # the findings table has rows to click


def display_controls(outputs: TransferSegOutputs | None) -> DisplayControls:
    """The display controls the current results have."""
    views = {view: bool(outputs and view in outputs.views) for view in VIEW_NAMES}
    overlay = bool(outputs and (outputs.heatmap or outputs.disagreement))
    return DisplayControls(views=views, overlay=overlay, heatmap=bool(outputs and outputs.heatmap),
                           threshold=bool(outputs) and outputs.detections is not None,
                           findings=bool(outputs) and alive(outputs.findings))


def detections_text(shown: int, total: int, threshold: float) -> str:
    return f"{shown} of {total} detections at confidence ≥ {threshold:.2f}"


def repair_message(name: str, old: str, new: str) -> str:
    return f"The scene's {name} '{old}' is not available here; using '{new}'."


@dataclass
class Finished:
    """A run that ended: its state, the status line, the nodes it made (when done) and its error; for a
    batch, the inputs that failed (name, error)."""

    state: str
    status: str
    outputs: TransferSegOutputs | None
    message: str
    batch: bool = False
    failures: list = field(default_factory=list)


class PanelRun:
    """The panel's run: at most one job (a :class:`SegmentJob` or a :class:`BatchJob`), the last run's results,
    and what closing does.

    :meth:`poll` (the widget's timer) advances the job and hands back its new log lines; when the job has
    ended it returns a :class:`Finished`.  Closing the scene cancels the job (its cancel returns at once; the
    next poll sees it end) and forgets the results; closing Slicer closes the job, which removes its
    temporary files at once, as no timer will poll again.
    """

    def __init__(self):
        self.job: SegmentJob | BatchJob | None = None
        self.outputs: TransferSegOutputs | None = None
        self._logged = 0

    @property
    def busy(self) -> bool:
        return self.job is not None

    def start(self, job: SegmentJob | BatchJob) -> None:
        self.job, self._logged = job, 0

    def poll(self, show3d_when_done: bool = False) -> tuple[list, Finished | None]:
        """``(new log lines, Finished or None)``; with ``show3d_when_done`` a finished segmentation shows in 3D."""
        job = self.job
        if job is None:
            return [], None
        state = job.poll()
        lines, self._logged = job.log[self._logged:], len(job.log)
        if job.running:
            return lines, None
        self.job = None
        if state == job.DONE:
            self.outputs = job.outputs
            if show3d_when_done and job.outputs.segmentation is not None:
                show_3d(job.outputs.segmentation)
        batch = isinstance(job, BatchJob)
        return lines, Finished(state, job.status, job.outputs if state == job.DONE else None, job.message,
                               batch=batch, failures=list(job.failures) if batch else [])

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def scene_closing(self) -> None:
        """The scene is closing: stop the run, forget the results (their nodes go with the scene)."""
        self.cancel()
        self.outputs = None

    def app_closing(self) -> None:
        """Slicer is closing: stop the run and remove its files now."""
        if self.job is not None:
            self.job.close()
            self.job = None
