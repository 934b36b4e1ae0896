"""A streamed, resumable sequential-editing run: the one runner ``roselora-edit --mode sequential`` and
``benchmarks/editing/sequential.py`` share.

Every edit's row and every checkpoint's row go to ``write`` as soon as they are measured, and the editor's state is
saved (safetensors) at every checkpoint, so a run that stops is resumed from its last checkpoint and ends exactly
where an uninterrupted one does (:meth:`Editor.edit_sequence` seeds edit ``i`` with ``seed + i``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import EditRequest
from .editor import Editor
from .results import EditResult, SequenceCheckpoint


def full_edit_row(index: int, result: EditResult) -> dict:
    """An edit's row: its whole result as strict JSON (see :meth:`EditResult.to_row`), ``kind`` and ``index``."""
    return {**result.to_row(), "kind": "edit", "index": index}


def checkpoint_row(checkpoint: SequenceCheckpoint) -> dict:
    """A checkpoint's row: its measurements and ``kind``."""
    return {**checkpoint.to_dict(), "kind": "checkpoint"}


@dataclass
class SequenceRun:
    """The rows a run produced (this call's, not those of a run it resumed) and the edits it resumed after."""

    edits: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    resumed_after: int = 0


def run_sequence(
    editor: Editor,
    requests: Sequence[EditRequest],
    *,
    state_path: Path,
    write: Callable[[dict], None],
    checkpoints: Sequence[int] = (),
    seed: int = 0,
    resume: bool = True,
    edit_row: Callable[[int, EditResult], dict] = full_edit_row,
    on_checkpoint: Optional[Callable[[SequenceCheckpoint, dict], None]] = None,
    label: str = "sequential edits",
) -> SequenceRun:
    """Edit ``requests`` one after another with ``editor``, streaming and saving as it goes.

    Args:
        editor: a fresh editor on the unedited model.
        requests: the whole sequence (a resumed run edits only those after the saved state's edits).
        state_path: the safetensors file of the editor's state, written at every checkpoint.
        write: receives each row as it is produced (``edit_row(index, result)`` per edit, :func:`checkpoint_row`
            per checkpoint).
        checkpoints: measure every edit so far after these numbers of edits (and after the last); numbers above
            ``len(requests)`` are left out.
        seed: edit ``i`` runs under ``torch.manual_seed(seed + i)``.
        resume: restart from ``state_path`` when it exists (otherwise it is overwritten).
        edit_row: the row of one edit.
        on_checkpoint: called with each checkpoint and its row, after the state is saved.
        label: the progress bar's.

    Raises:
        ValueError: a saved state that does not fit the editor or the requests (see :meth:`Editor.load_state_dict`).
    """
    run = SequenceRun()
    state_path = Path(state_path)
    if resume and state_path.exists():
        run.resumed_after = editor.load_state_dict(load_file(state_path), list(requests))
        print(f"{label}: resumed after {run.resumed_after} edits from {state_path}", flush=True)
    progress = tqdm(total=len(requests), initial=len(editor.memory), desc=label)

    def edited(index: int, result: EditResult) -> None:
        row = edit_row(index, result)
        run.edits.append(row)
        write(row)
        progress.update(1)

    def measured(checkpoint: SequenceCheckpoint) -> None:
        row = checkpoint_row(checkpoint)
        run.checkpoints.append(row)
        write(row)
        save_file(editor.state_dict(), str(state_path))
        if on_checkpoint is not None:
            on_checkpoint(checkpoint, row)

    marks = [c for c in checkpoints if c <= len(requests)]
    editor.edit_sequence(list(requests), checkpoints=marks, on_edit=edited, on_checkpoint=measured, seed=seed)
    progress.close()
    return run
