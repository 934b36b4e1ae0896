"""Knowledge editing with RoseLoRA: EasyEdit-compatible requests, loaders, metrics and an editor with baselines."""

from .data import (
    EditDataError,
    EditRequest,
    LoadedRequests,
    load_edit_requests,
    parse_edit_records,
    select_split,
    split_of,
)
from .editor import METHODS, Editor
from .hparams import EditHyperParams
from .objective import replay_picks
from .results import EditResult


__all__ = [
    "METHODS",
    "EditDataError",
    "EditHyperParams",
    "EditRequest",
    "EditResult",
    "Editor",
    "LoadedRequests",
    "load_edit_requests",
    "parse_edit_records",
    "replay_picks",
    "select_split",
    "split_of",
]
