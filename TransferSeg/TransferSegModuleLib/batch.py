"""Segmenting several volumes in one run: :class:`BatchJob` runs one :class:`~.jobs.SegmentJob` per input,
one after the other, with the same model, device, region and fusion, behind one progress fraction and one
status line ("Volume 2/5: Segmenting").

The inputs are a list of volume nodes (:func:`volume_inputs`: each result lands where a single run puts it,
under that volume's study), or every item of a sequence (:class:`SequenceBatch`): each item's volume is
segmented on a hidden copy in the scene, and each node the run makes (the segmentation, its findings table,
a multi-view model's views …) is stored as the item, at the same index value, of an output sequence of its
own, synchronized in the same browser, so scrubbing the sequence shows each item's results.  A batch again on
the same sequence replaces the output sequences of the earlier one, once it is done: a cancelled or failed
rerun leaves them as they were.
"""
from __future__ import annotations

import time

import slicer
import vtk

from TransferSegLib.models import find_model
from TransferSegLib.volume import TransferSegError
from .jobs import SegmentJob, TransferSegOutputs, alive, format_seconds, wait_while
from .scene import remove_nodes

#: how the panel's Segment button takes its inputs: the input volume, the checked volumes, a sequence's items
BATCH_MODES = ("off", "volumes", "sequence")
#: attribute on the sequences a batch writes (value: the output's role), so a later batch never reads one as input
OUTPUT_ATTRIBUTE = "TransferSeg.BatchOutput"
#: node-reference role from each output sequence to the volume sequence it came from: a rerun replaces them
INPUT_SEQUENCE_ROLE = "TransferSeg.BatchInput"
VOLUME_CLASS = "vtkMRMLScalarVolumeNode"


# --------------------------------------------------------------------------------------
# Inputs: each has a name, the node to segment, what to keep of a finished run, and a clean-up
# --------------------------------------------------------------------------------------
class VolumeInput:
    """A volume node of the user's list: segmented as it is; its results stay where a single run puts them."""

    def __init__(self, node):
        self.node = node
        self.name = node.GetName() if node is not None else "(no volume)"

    def prepare(self):
        if not alive(self.node):
            raise TransferSegError(f"'{self.name}' is no longer in the scene")
        return self.node

    def keep(self, outputs: TransferSegOutputs) -> TransferSegOutputs:
        return outputs

    def release(self) -> None:
        pass

    def finish(self, done: bool) -> None:
        pass


def volume_inputs(nodes) -> list:
    """The batch inputs for a list of volume nodes, in the list's order, each node once."""
    seen, inputs = set(), []
    for node in nodes:
        if node is not None and node.GetID() not in seen:
            seen.add(node.GetID())
            inputs.append(VolumeInput(node))
    return inputs


def volume_sequence(browser):
    """The browser's sequence of scalar volumes: its master sequence if it holds them, else the first synchronized
    one that does (never one a batch wrote).  :class:`TransferSegError` if there is none."""
    if browser is None or browser.GetScene() is None:
        raise TransferSegError("select a sequence (a sequence browser) to segment")
    others = vtk.vtkCollection()
    browser.GetSynchronizedSequenceNodes(others, False)
    candidates = [browser.GetMasterSequenceNode()]
    candidates += [others.GetItemAsObject(n) for n in range(others.GetNumberOfItems())]
    for sequence in candidates:
        if (sequence is not None and sequence.GetDataNodeClassName() == VOLUME_CLASS
                and sequence.GetNumberOfDataNodes() > 0 and not sequence.GetAttribute(OUTPUT_ATTRIBUTE)):
            return sequence
    raise TransferSegError(f"the sequence '{browser.GetName()}' holds no scalar volumes")


def sequence_length(browser) -> int:
    """How many volumes a batch over ``browser`` segments (0 when it holds no volume sequence)."""
    try:
        return volume_sequence(browser).GetNumberOfDataNodes()
    except TransferSegError:
        return 0


def output_roles(outputs: TransferSegOutputs) -> list:
    """``[(role, node)]`` of the nodes one run made: each role gets an output sequence of its own."""
    roles = [("segmentation", outputs.segmentation)]
    roles += [(f"view {view}", node) for view, node in outputs.views.items()]
    roles += [("disagreement", outputs.disagreement), ("heatmap", outputs.heatmap),
              ("detections", outputs.detections), ("findings", outputs.findings)]
    return [(role, node) for role, node in roles if node is not None]


def output_sequences(browser, sequence) -> list:
    """The output sequences in ``browser`` that a batch over ``sequence`` wrote (those from before outputs named
    their volume sequence count too: a browser's batch only ever reads one)."""
    synchronized = vtk.vtkCollection()
    browser.GetSynchronizedSequenceNodes(synchronized, False)
    found = []
    for n in range(synchronized.GetNumberOfItems()):
        node = synchronized.GetItemAsObject(n)
        if node is None or not node.GetAttribute(OUTPUT_ATTRIBUTE):
            continue
        source = node.GetNodeReferenceID(INPUT_SEQUENCE_ROLE)
        if source is None or source == sequence.GetID():
            found.append(node)
    return found


class SequenceBatch:
    """Every item of a browser's volume sequence in; one output sequence per kind of output node out.

    Each output sequence is named after the nodes it holds (``<sequence> TransferSeg``, ``… findings`` …), has
    the input's index name, unit and type, and is synchronized in the same browser; an item that has no output
    (it failed, or the batch was cancelled before it) shows an empty node there.  Where the browser has proxy
    nodes (Slicer's Sequences logic makes them), each output's proxy takes the display of the first item's
    node, and the segmentation's proxy refers to the input's proxy as its reference geometry.

    The output sequences of an earlier batch over the same sequence stay untouched while this one runs;
    :meth:`finish` removes them once this batch is done, or, when it was cancelled or failed, removes this
    batch's own instead (a first batch keeps the items it finished).
    """

    def __init__(self, logic, browser):
        self.logic, self.browser = logic, browser
        self.sequence = volume_sequence(browser)
        self.sequences: dict = {}  # role -> the output sequence node
        self.earlier = output_sequences(browser, self.sequence)  # replaced once this batch is done
        self._finished = False

    def inputs(self) -> list:
        return [SequenceItemInput(self, n) for n in range(self.sequence.GetNumberOfDataNodes())]

    def item_name(self, n: int) -> str:
        sequence = self.sequence
        index = " ".join(filter(None, [sequence.GetNthIndexValue(n), sequence.GetIndexUnit()]))
        return f"{sequence.GetName()} [{sequence.GetIndexName() or 'index'} = {index}]"

    def copy_of_item(self, n: int):
        """A hidden volume node in the scene sharing item ``n``'s voxels and geometry (as the browser's proxy
        does: a shallow content copy), so that the run reads one item even if the user scrubs meanwhile."""
        data = self.sequence.GetNthDataNode(n)
        if data is None:
            raise TransferSegError(f"{self.item_name(n)} holds no volume")
        node = slicer.vtkMRMLScalarVolumeNode()
        node.SetName(self.sequence.GetName())  # the run names its outputs after it
        node.SetHideFromEditors(True)  # before it is added: the Data module and the node lists never show it
        node.CopyContent(data, False)
        return self.logic.scene.AddNode(node)

    def store(self, n: int, outputs: TransferSegOutputs) -> TransferSegOutputs:
        """Put one item's output nodes into the output sequences at item ``n``'s index value, remove them from
        the scene, and return the browser's proxies of the output sequences (what the slice views show)."""
        value, stored = self.sequence.GetNthIndexValue(n), []
        try:
            for role, node in output_roles(outputs):
                sequence = self.sequences.get(role)
                if alive(sequence):
                    sequence.SetDataNodeAtValue(node, value)  # a copy, in the sequence's own scene
                else:
                    sequence = self.sequences[role] = self._new_output(role, node, value)
                stored.append(sequence)
        except Exception:
            for sequence in stored:  # all of the item's outputs, or none
                sequence.RemoveDataNodeAtValue(value)
            raise
        remove_nodes(self.logic.scene, outputs.nodes())
        return self.proxies()

    def _new_output(self, role: str, node, value: str):
        scene, browser = self.logic.scene, self.browser
        sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", node.GetName())
        sequence.SetAttribute(OUTPUT_ATTRIBUTE, role)
        sequence.SetNodeReferenceID(INPUT_SEQUENCE_ROLE, self.sequence.GetID())
        sequence.SetIndexName(self.sequence.GetIndexName())  # the browser synchronizes only matching indexes
        sequence.SetIndexUnit(self.sequence.GetIndexUnit())
        sequence.SetIndexType(self.sequence.GetIndexType())
        sequence.SetDataNodeAtValue(node, value)
        browser.AddSynchronizedSequenceNodeID(sequence.GetID())
        # an item without output shows an empty node, never the result of another item
        browser.SetMissingItemMode(sequence, browser.MissingItemSetToDefault)
        placed = [sequence]
        proxy = browser.GetProxyNode(sequence)
        if proxy is not None:
            if proxy.IsA("vtkMRMLDisplayableNode") and proxy.GetDisplayNode() is None:
                proxy.CreateDefaultDisplayNodes()
            for k in range(min(_display_count(proxy), _display_count(node))):
                shown, made = proxy.GetNthDisplayNode(k), node.GetNthDisplayNode(k)
                if shown is not None and made is not None and shown.GetClassName() == made.GetClassName():
                    shown.CopyContent(made)  # e.g. a view's outlines, the heatmap's colours and threshold
            volume_proxy = browser.GetProxyNode(self.sequence)
            if volume_proxy is not None and proxy.IsA("vtkMRMLSegmentationNode"):
                proxy.SetNodeReferenceID(proxy.GetReferenceImageGeometryReferenceRole(), volume_proxy.GetID())
            placed.append(proxy)
        self.logic.placeUnderStudy(self.sequence, placed)
        return sequence

    def proxies(self) -> TransferSegOutputs:
        """The browser's proxy nodes of the output sequences, as a run's outputs (None where there is none),
        shown in the slice views."""
        outputs = self._outputs()
        volume_proxy = self.browser.GetProxyNode(self.sequence)
        if volume_proxy is not None:  # the run showed the hidden copy: show the browser's volume instead
            self.logic.showResult(volume_proxy, outputs)
        return outputs

    def _outputs(self) -> TransferSegOutputs:
        proxy = {role: self.browser.GetProxyNode(sequence) for role, sequence in self.sequences.items()
                 if alive(sequence)}
        views = {role.split(" ", 1)[1]: node for role, node in proxy.items() if role.startswith("view ") and node}
        return TransferSegOutputs(segmentation=proxy.get("segmentation"), views=views,
                                  disagreement=proxy.get("disagreement"), heatmap=proxy.get("heatmap"),
                                  detections=proxy.get("detections"), findings=proxy.get("findings"))

    def finish(self, done: bool) -> None:
        """The batch ended (once is enough): ``done``, the earlier batch's output sequences give way to this one's;
        else, if there are earlier ones, this batch's own go and the slice views show the earlier ones again."""
        if self._finished:
            return
        self._finished = True
        if done:
            self._remove(self.earlier)
        elif self.earlier and self.sequences:
            self._remove(list(self.sequences.values()))
            self.sequences = {sequence.GetAttribute(OUTPUT_ATTRIBUTE): sequence for sequence in self.earlier}
            shown = self._outputs()
            volume_proxy = self.browser.GetProxyNode(self.sequence)
            if volume_proxy is not None:  # what the views showed before: the slice layers only, no display changes
                self.logic.setSliceLayers(volume_proxy, shown.heatmap or shown.disagreement)

    def _remove(self, sequences: list) -> None:
        """Remove output sequences with their proxies (the browser's nodes that show them)."""
        nodes = []
        for sequence in sequences:
            if not alive(sequence):
                continue
            nodes += [self.browser.GetProxyNode(sequence), sequence]
            self.browser.RemoveSynchronizedSequenceNode(sequence.GetID())
        remove_nodes(self.logic.scene, nodes)


def _display_count(node) -> int:
    return node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0


class SequenceItemInput:
    """One item of a :class:`SequenceBatch`: segmented on a hidden copy, which is removed when its run ends."""

    def __init__(self, batch: SequenceBatch, n: int):
        self.batch, self.n = batch, n
        self.name = batch.item_name(n)
        self._node = None

    def prepare(self):
        self._node = self.batch.copy_of_item(self.n)
        return self._node

    def keep(self, outputs: TransferSegOutputs) -> TransferSegOutputs:
        return self.batch.store(self.n, outputs)

    def release(self) -> None:
        remove_nodes(self.batch.logic.scene, [self._node])
        self._node = None

    def finish(self, done: bool) -> None:
        self.batch.finish(done)


def batch_inputs(logic, mode: str, volumes, browser) -> list:
    """The inputs of a batch in ``mode`` ("volumes": the checked ``volumes``; "sequence": every item of
    ``browser``'s volume sequence).  :class:`TransferSegError` when there is nothing to segment."""
    if mode == "volumes":
        inputs = volume_inputs(volumes)
        if not inputs:
            raise TransferSegError("check the volumes to segment in the Batch section")
        return inputs
    if mode == "sequence":
        return SequenceBatch(logic, browser).inputs()
    raise TransferSegError(f"batch mode must be one of {', '.join(BATCH_MODES[1:])}; got {mode!r}")


# --------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------
class BatchJob:
    """Several runs, one per input, in order: Segmenting → Done | Cancelled | Failed, polled like a
    :class:`SegmentJob` (the panel drives either).

    ``fraction`` is the finished inputs plus the current run's fraction, over the number of inputs, and never
    goes back; ``status`` reads "Volume k/n: <the current run's status>".  An input that fails (refused at
    the start, or its run failed) is recorded in ``failures`` with its error and the next one starts; the batch
    is Done when at least one input was segmented, and its status names those that failed.  :meth:`cancel`
    cancels the current run (which leaves the scene as it was) and starts no other: the finished inputs'
    results stay.  ``outputs``: the nodes to show, those of the last finished input (for a sequence, the output
    sequences' proxies).  ``log`` holds every run's output lines, each run under a line naming its input.
    """

    SEGMENTING, DONE = SegmentJob.SEGMENTING, SegmentJob.DONE
    CANCELLED, FAILED = SegmentJob.CANCELLED, SegmentJob.FAILED

    def __init__(self, logic, inputs: list, model: str, device: str = "auto", roi_node=None, fusion=None,
                 python: str | None = None):
        if not inputs:
            raise TransferSegError("there is no volume to segment")
        find_model(model)  # a wrong name fails here, once, before any input starts
        self.logic, self.inputs, self.model, self.device = logic, list(inputs), model, device
        self.roi_node, self.fusion, self.python = roi_node, fusion, python
        self.started = time.monotonic()
        self.seconds = None
        self.state, self.fraction, self.status, self.message = self.SEGMENTING, 0.0, "Initializing", ""
        self.log: list[str] = []
        self.outputs: TransferSegOutputs | None = None
        self.segmented: list[str] = []  # the names of the inputs whose results are in the scene
        self.failures: list[tuple] = []  # (input name, error)
        self.job: SegmentJob | None = None  # the current run
        self._current = -1
        self._logged = 0
        self._cancel_requested = False
        self._start_next()

    @property
    def running(self) -> bool:
        return self.state == self.SEGMENTING

    @property
    def current(self) -> int:
        """The index of the input being segmented (the number of inputs before it)."""
        return self._current

    def _label(self, n: int) -> str:
        return f"Volume {n + 1}/{len(self.inputs)}"

    def _start_next(self) -> None:
        """Start the next input's run; an input refused at the start is recorded and the one after it tried."""
        while self._current + 1 < len(self.inputs):
            self._current += 1
            item = self.inputs[self._current]
            self.log.append(f"{self._label(self._current)}: {item.name}")
            try:
                node = item.prepare()
                self.job = self.logic.startSegmentation(node, self.model, device=self.device, roiNode=self.roi_node,
                                                        fusion=self.fusion, python=self.python)
            except Exception as e:  # this input only (the model was checked once): record it, go on
                item.release()
                self._failed(item, str(e))
                continue
            self._logged = 0
            self._update()
            return
        self._end()

    def _update(self) -> None:
        job = self.job
        fraction = (self._current + min(max(job.fraction, 0.0), 1.0)) / len(self.inputs)
        self.fraction = max(self.fraction, fraction)
        self.status = f"{self._label(self._current)}: {job.status}"

    def _failed(self, item, message: str) -> None:
        self.failures.append((item.name, message))
        self.log.append(f"{self._label(self._current)} ({item.name}) failed: {message}")

    def poll(self) -> str:
        """Advance the current run, and start the next input when it has ended; returns the state.  Never blocks."""
        job = self.job
        if self.state != self.SEGMENTING or job is None:
            return self.state
        state = job.poll()
        self.log.extend(job.log[self._logged:])
        self._logged = len(job.log)
        if job.running:
            self._update()
            return self.state
        self._ended(job, state)
        if self._cancel_requested or state == job.CANCELLED:
            self._end(cancelled=True)
        else:
            self._start_next()
        return self.state

    def _ended(self, job: SegmentJob, state: str) -> None:
        """The current run ended: keep its results (a sequence item's go into the output sequences), or record
        its error; then remove what the input needed."""
        item, self.job = self.inputs[self._current], None
        try:
            if state == job.DONE:
                self.log.append(f"{self._label(self._current)} ({item.name}): {job.status}")
                try:
                    self.outputs = item.keep(job.outputs)
                except Exception as e:
                    remove_nodes(self.logic.scene, job.outputs.nodes())  # nothing half-stored is left
                    self._failed(item, f"storing the result failed: {e}")
                else:
                    self.segmented.append(item.name)
            elif state == job.FAILED:
                self._failed(item, job.message)
        finally:
            item.release()
        if state != job.CANCELLED:  # this input is finished, done or not
            self.fraction = max(self.fraction, (self._current + 1) / len(self.inputs))

    def _end(self, cancelled: bool = False) -> None:
        self.seconds = time.monotonic() - self.started
        self._finish_inputs(done=not cancelled and bool(self.segmented))
        count, done = len(self.inputs), len(self.segmented)
        noun = "volume" if count == 1 else "volumes"
        failed = "; ".join(f"{name} ({message.splitlines()[0] if message else 'failed'})"
                           for name, message in self.failures)
        if cancelled:
            self.state = self.CANCELLED
            self.message = self.status = f"Cancelled after {done} of {count} {noun}"
        elif done == 0:
            self.state = self.FAILED
            self.message = f"no volume was segmented: {failed}"
            self.status = f"Failed: {self.message}"
        else:
            self.state, self.fraction = self.DONE, 1.0
            head = f"Done — {done} {noun}" if not self.failures else f"Done — {done} of {count} {noun}"
            self.message = self.status = f"{head} in {format_seconds(self.seconds)}" + (
                f"; failed: {failed}" if self.failures else "")
        self.log.append(self.status)

    def _finish_inputs(self, done: bool) -> None:
        """Tell the inputs the batch ended (a sequence's then replaces its earlier output sequences, or keeps them)."""
        for item in self.inputs:
            try:
                item.finish(done)
            except Exception as e:  # the batch's results stay; what could not be tidied is said in the log
                self.log.append(f"{item.name}: {e}")

    def cancel(self) -> None:
        """Cancel the current run and start no other; returns at once (the next :meth:`poll` ends the batch)."""
        if not self.running:
            return
        self._cancel_requested = True
        self.status = "Cancelling"
        if self.job is not None:
            self.job.cancel()

    def close(self, timeout: float = 5.0) -> None:
        """Slicer is closing: close the current run (its files removed now) and start no other."""
        if not self.running:
            return
        self._cancel_requested = True
        job = self.job
        if job is not None:
            job.close(timeout)
            self._ended(job, job.state)
        self._end(cancelled=True)

    def wait(self, timeout: float = 1800.0, interval: float = 0.05) -> str:
        return wait_while(self, (self.SEGMENTING,), timeout, interval)
