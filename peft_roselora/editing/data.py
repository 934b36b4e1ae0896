"""Knowledge-editing requests and loaders for EasyEdit-style JSON (ZsRE, CounterFact, KnowEdit) and MEND zsRE.

Every loader checks every record; a malformed one raises ``EditDataError`` naming the record (its index) and the
field, unless ``on_invalid="collect"``, which returns it in ``LoadedRequests.rejected`` (never dropped silently).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


class EditDataError(ValueError):
    """A malformed edit record: the message names the record index and the field."""


@dataclass
class EditRequest:
    """One fact to edit (EasyEdit's fields).

    ``prompt`` is completed by ``target_new`` after the edit; ``rephrase_prompts`` test generalisation;
    ``locality_prompts`` (with their ``locality_answers``) test that unrelated predictions do not change;
    ``portability_prompts`` / ``portability_answers`` test reasoning with the edited fact.
    """

    prompt: str
    target_new: str
    subject: Optional[str] = None
    ground_truth: list[str] = field(default_factory=list)
    rephrase_prompts: list[str] = field(default_factory=list)
    locality_prompts: list[str] = field(default_factory=list)
    locality_answers: list[str] = field(default_factory=list)
    portability_prompts: list[str] = field(default_factory=list)
    portability_answers: list[str] = field(default_factory=list)
    record_id: Optional[int] = None


@dataclass
class LoadedRequests:
    requests: list[EditRequest]
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (record index, field, reason)


def _text(record: dict, index: int, name: str, required: bool = True) -> Optional[str]:
    value = record.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise EditDataError(f"record {index}: field '{name}' must be a non-empty string, got {value!r}")
    return value


def _texts(record: dict, index: int, name: str) -> list[str]:
    value = record.get(name)
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise EditDataError(
            f"record {index}: field '{name}' must be a string or a list of non-empty strings, got {value!r}"
        )
    return list(values)


def _from_mend(record: dict, index: int) -> EditRequest:
    prompt, target = _text(record, index, "src"), _text(record, index, "alt")
    subject = _text(record, index, "subject", required=False)
    if subject is not None and subject not in prompt:
        raise EditDataError(f"record {index}: field 'subject' ({subject!r}) does not occur in 'src'")
    locality = _texts(record, index, "loc")
    answers = _texts(record, index, "loc_ans")
    if len(locality) != len(answers):
        raise EditDataError(f"record {index}: field 'loc_ans' has {len(answers)} answers for {len(locality)} 'loc'")
    return EditRequest(
        prompt=prompt,
        target_new=target.strip(),
        subject=subject,
        ground_truth=_texts(record, index, "answers"),
        rephrase_prompts=_texts(record, index, "rephrase"),
        locality_prompts=locality,
        locality_answers=answers,
        record_id=index,
    )


def _prompt_answer_groups(record: dict, index: int, name: str) -> tuple[list[str], list[str]]:
    """EasyEdit/KnowEdit ``locality`` / ``portability``: ``{group: {"prompt": ..., "ground_truth": ...}}`` or a list
    of such dicts."""
    value = record.get(name)
    if value is None:
        return [], []
    groups = list(value.values()) if isinstance(value, dict) else value
    prompts, answers = [], []
    for group in groups if isinstance(groups, list) else [groups]:
        items = group if isinstance(group, list) else [group]
        for item in items:
            if not isinstance(item, dict) or "prompt" not in item or "ground_truth" not in item:
                raise EditDataError(f"record {index}: field '{name}' entries need 'prompt' and 'ground_truth'")
            prompt = item["prompt"]
            truth = item["ground_truth"]
            while isinstance(truth, list) and truth and isinstance(truth[0], list):
                truth = truth[0]
            truth = truth[0] if isinstance(truth, list) and truth else truth
            if not isinstance(prompt, str) or not isinstance(truth, str) or not prompt.strip() or not truth.strip():
                raise EditDataError(f"record {index}: field '{name}' has an empty or non-string prompt/ground_truth")
            prompts.append(prompt)
            answers.append(truth)
    return prompts, answers


def _from_easyedit(record: dict, index: int) -> EditRequest:
    prompt = _text(record, index, "prompt")
    target = _text(record, index, "target_new")
    rephrase = _texts(record, index, "rephrase_prompt") + _texts(record, index, "rephrase")
    locality_prompts, locality_answers = _prompt_answer_groups(record, index, "locality")
    if "locality_prompt" in record:
        locality_prompts += _texts(record, index, "locality_prompt")
        locality_answers += _texts(record, index, "locality_ground_truth")
    portability_prompts, portability_answers = _prompt_answer_groups(record, index, "portability")
    return EditRequest(
        prompt=prompt,
        target_new=target.strip(),
        subject=_text(record, index, "subject", False),
        ground_truth=_texts(record, index, "ground_truth"),
        rephrase_prompts=rephrase,
        locality_prompts=locality_prompts,
        locality_answers=locality_answers,
        portability_prompts=portability_prompts,
        portability_answers=portability_answers,
        record_id=index,
    )


def _from_counterfact(record: dict, index: int) -> EditRequest:
    rewrite = record.get("requested_rewrite")
    if not isinstance(rewrite, dict):
        raise EditDataError(f"record {index}: field 'requested_rewrite' must be an object, got {rewrite!r}")
    subject = _text(rewrite, index, "subject")
    template = _text(rewrite, index, "prompt")
    if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
        raise EditDataError(
            f"record {index}: field 'requested_rewrite.prompt' needs exactly one '{{}}' subject slot and no other "
            f"braces, got {template!r}"
        )
    target = rewrite.get("target_new", {}).get("str") if isinstance(rewrite.get("target_new"), dict) else None
    if not isinstance(target, str) or not target.strip():
        raise EditDataError(f"record {index}: field 'requested_rewrite.target_new.str' must be a non-empty string")
    truth = rewrite.get("target_true", {}).get("str") if isinstance(rewrite.get("target_true"), dict) else None
    neighbours = _texts(record, index, "neighborhood_prompts")
    if neighbours and not (isinstance(truth, str) and truth.strip()):
        raise EditDataError(
            f"record {index}: field 'requested_rewrite.target_true.str' must be a non-empty string: the "
            f"{len(neighbours)} neighborhood_prompts need it as their answer"
        )
    return EditRequest(
        prompt=template.replace("{}", subject),
        target_new=target.strip(),
        subject=subject,
        ground_truth=[truth] if truth else [],
        rephrase_prompts=_texts(record, index, "paraphrase_prompts"),
        locality_prompts=neighbours,
        locality_answers=[truth] * len(neighbours) if truth else [],
        record_id=index,
    )


FORMATS = {"mend": _from_mend, "easyedit": _from_easyedit, "counterfact": _from_counterfact}


def detect_format(record: Any) -> str:
    """``"mend"`` (``src``/``alt``), ``"counterfact"`` (``requested_rewrite``) or ``"easyedit"`` (``prompt``/
    ``target_new``)."""
    if isinstance(record, dict):
        if "requested_rewrite" in record:
            return "counterfact"
        if "src" in record and "alt" in record:
            return "mend"
        if "prompt" in record and "target_new" in record:
            return "easyedit"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise EditDataError(f"record 0: cannot tell the format from its keys {keys}; pass fmt= one of {sorted(FORMATS)}")


def parse_edit_records(
    records: list[dict],
    fmt: Literal["auto", "mend", "easyedit", "counterfact"] = "auto",
    limit: Optional[int] = None,
    on_invalid: Literal["raise", "collect"] = "raise",
) -> LoadedRequests:
    """Turn raw records into ``EditRequest``s.

    Raises:
        EditDataError: for a malformed record (``on_invalid="raise"``) or an unknown format.
    """
    if not isinstance(records, list) or not records:
        raise EditDataError("edit data must be a non-empty JSON list of records")
    if on_invalid not in ("raise", "collect"):
        raise ValueError(f"`on_invalid` must be 'raise' or 'collect', got {on_invalid!r}")
    fmt = detect_format(records[0]) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"`fmt` must be one of {['auto', *sorted(FORMATS)]}, got {fmt!r}")
    result = LoadedRequests(requests=[])
    for index, record in enumerate(records[:limit] if limit is not None else records):
        try:
            if not isinstance(record, dict):
                raise EditDataError(f"record {index}: must be a JSON object, got {type(record).__name__}")
            result.requests.append(FORMATS[fmt](record, index))
        except EditDataError as error:
            if on_invalid == "raise":
                raise
            message = str(error)
            name = message.split("field '")[1].split("'")[0] if "field '" in message else "<record>"
            result.rejected.append((index, name, message))
    return result


def load_edit_requests(
    path: str, fmt: str = "auto", limit: Optional[int] = None, on_invalid: str = "raise"
) -> LoadedRequests:
    """Load a JSON file of edit records (see :func:`parse_edit_records`).

    Raises:
        EditDataError: the file is not UTF-8, starts with a byte-order mark, is not JSON (names the file and the
            position) or nests too deeply to read, or a record is malformed.
        OSError: the file is missing or unreadable.
    """
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raise EditDataError(f"{path}: starts with a UTF-8 byte-order mark; save it as UTF-8 without BOM")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise EditDataError(f"{path}: not UTF-8 (byte {error.start}: {error.reason})") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise EditDataError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    except RecursionError:
        raise EditDataError(
            f"{path}: JSON nested too deeply to read (no edit record format nests like this)"
        ) from None
    return parse_edit_records(records, fmt=fmt, limit=limit, on_invalid=on_invalid)


SPLITS = ("all", "dev", "test")


def split_of(request: EditRequest, dev_fraction: float = 0.5) -> str:
    """``"dev"`` or ``"test"`` for one request, decided by its content alone: the first 8 bytes of the SHA-256 of
    ``prompt`` and ``target_new`` as a number in ``[0, 1)``, ``"dev"`` below ``dev_fraction``. The split therefore
    does not depend on the order of the records, on ``--limit`` or on the other records, and a record keeps its
    side when the data file grows.

    Raises:
        ValueError: if ``dev_fraction`` is not a number in ``(0, 1)``.
    """
    _check_dev_fraction(dev_fraction)
    digest = hashlib.sha256(f"{request.prompt}\x1f{request.target_new}".encode()).digest()
    return "dev" if int.from_bytes(digest[:8], "big") / 2**64 < dev_fraction else "test"


def select_split(requests: list[EditRequest], split: str, dev_fraction: float = 0.5) -> list[EditRequest]:
    """The requests of one side of the deterministic dev (tuning) / test (reporting) split (:func:`split_of`), in
    their original order; ``split="all"`` returns them all.

    Raises:
        ValueError: if ``split`` is not one of ``all``, ``dev``, ``test``, or ``dev_fraction`` is out of range.
    """
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {list(SPLITS)}, got {split!r}.")
    _check_dev_fraction(dev_fraction)  # also for "all": a bad value is never ignored
    if split == "all":
        return list(requests)
    return [request for request in requests if split_of(request, dev_fraction) == split]


def _check_dev_fraction(dev_fraction: float) -> None:
    if isinstance(dev_fraction, bool) or not isinstance(dev_fraction, (int, float)) or not 0 < dev_fraction < 1:
        raise ValueError(f"`dev_fraction` must be a number in (0, 1), got {dev_fraction!r}.")
