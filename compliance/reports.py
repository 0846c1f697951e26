"""Compliance reports: their formats and their Markdown (built from the coordinator's store by
``fedtune.coordinator.reports``: ``adapter_lineage`` and ``processing_record``).

* ``fedtune.report.lineage/v1`` (:data:`LINEAGE_FORMAT`): where an adapter version came from: its
  parent chain, the round that made each version, the contributing clients and the record-level
  epsilon each spent, per round (never summed across clients).
* ``fedtune.report.processing/v1`` (:data:`PROCESSING_FORMAT`): a per-job record of processing:
  purpose, legal basis, data categories, data subjects, parties, recipients, retention and
  safeguards; what the job's config does not state reads :data:`NOT_STATED`.

:data:`REPORT_RENDERERS` turns either report into Markdown. Reports name clients by their
pseudonymous id and organization, never a person.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

NOT_STATED = "not stated"
LINEAGE_FORMAT = "fedtune.report.lineage/v1"
PROCESSING_FORMAT = "fedtune.report.processing/v1"


# ---------------------------------------------------------------------------------------------
# Markdown
#
# Report text is partly the operators' (client org and name, purpose, legal basis, data categories)
# and the Markdown is rendered by an auditor's viewer, so every value is escaped for that format and
# reads as the text it is, never as markup: HTML's & < > become entities (no tags, no <javascript:...>
# autolinks); Markdown's [ ] (links, images), * _ ~ (emphasis), ` (code), # (headings), | (table
# cells) and \ are backslash-escaped, as is a list marker opening a list item's text; bidirectional
# controls (U+202A-U+202E, U+2066-U+2069, and the marks U+200E, U+200F, U+061C), which make text
# display in another order than it is stored, and other control characters are shown as <U+202E>;
# line breaks become spaces.

_HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_MARKDOWN_SYNTAX = frozenset("\\`*_[]|~#")
_BIDI_CONTROLS = frozenset(map(chr, (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)))
_LINE_BREAKS = frozenset("\r\n\t\v\f\x85\u2028\u2029")
_LIST_MARKER = re.compile(r"^(\d{1,9})([.)])(?=\s|$)|^([-+])(?=\s|$)")
_CODE_SAFE = re.compile(r"[A-Za-z0-9:._/+=-]*")


def _text(value: Any, *, block: bool = False) -> str:
    """``value`` as Markdown that renders as exactly its text (see above); ``block``: it opens a list
    item or quote, where a leading ``-``, ``+`` or ``1.`` would start a nested list."""
    out = []
    for ch in str(value):
        if ch in _HTML_ENTITIES:
            out.append(_HTML_ENTITIES[ch])
        elif ch in _MARKDOWN_SYNTAX:
            out.append("\\" + ch)
        elif ch in _LINE_BREAKS:
            out.append(" ")
        elif ch in _BIDI_CONTROLS or unicodedata.category(ch) == "Cc":
            out.append(f"&lt;U+{ord(ch):04X}&gt;")
        else:
            out.append(ch)
    text = "".join(out)
    return _LIST_MARKER.sub(lambda m: f"{m[1]}\\{m[2]}" if m[1] else f"\\{m[3]}", text) if block else text


def _code(value: Any) -> str:
    """A digest or id as inline code; anything else as escaped text (a code span cannot be escaped)."""
    text = str(value)
    return f"`{text}`" if _CODE_SAFE.fullmatch(text) else _text(text)


def _cell(value: Any) -> str:
    """A table cell: ``-`` for None, floats to 6 significant digits, anything else escaped (:func:`_text`)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return _text(value)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)]


def lineage_markdown(report: Mapping[str, Any]) -> str:
    """The lineage report as Markdown (every value escaped for Markdown)."""
    lines = [f"# Lineage of {_text(report['job_id'])} adapter version {_text(report['version'])}", "",
             f"- adapter digest: {_code(report['digest'])}", f"- base model digest: {_code(report['base_digest'])}",
             f"- generated at: {_text(report['generated_at'])}", "", "## Versions (newest first)", ""]
    lines += _table(["version", "parent", "round", "aggregation", "digest", "created", "audit seq", "contributors"],
                    [[v["version"], v["parent_version"], v["round"], v["aggregation"], v["digest"], v["created_at"],
                      v["audit_seq"], ", ".join(c["client_id"] for c in v["contributors"]) or None]
                     for v in report["versions"]])
    lines += ["", "## Clients", ""]
    lines += _table(["client", "org", "rounds", "records", "epsilon per round", "epsilon total", "delta total"],
                    [[c["client_id"], c["org"], ", ".join(str(r) for r in c["rounds"]), c["records"],
                      ", ".join(f"r{e['round']}: {_cell(e['epsilon'])}" for e in c["epsilon_per_round"]),
                      c["epsilon_total"], c["delta_total"]] for c in report["clients"]])
    central = [(v["round"], v["client_level_dp"]) for v in report["versions"] if v["client_level_dp"]]
    if central:
        lines += ["", "## Client-level DP (coordinator)", ""]
        lines += _table(["round", "epsilon", "delta", "noise multiplier"],
                        [[r, d["epsilon"], d["delta"], d["noise_multiplier"]] for r, d in central])
    lines += ["", *(f"> {_text(note, block=True)}" for note in report["notes"]), ""]
    return "\n".join(lines)


def processing_markdown(report: Mapping[str, Any]) -> str:
    """The record of processing as Markdown (every value escaped for Markdown)."""
    categories = report["data_categories"]
    lines = [f"# Record of processing: job {_text(report['job_id'])}", "",
             f"- generated at: {_text(report['generated_at'])}; job status: {_text(report['status'])} "
             f"(created {_text(report['created_at'])}, finished {_text(report['finished_at'] or '-')})", "",
             "| item | value |", "|---|---|"]
    for label, value in [("purpose", report["purpose"]), ("legal basis", report["legal_basis"]),
                         ("data categories", ", ".join(categories) if isinstance(categories, list) else categories),
                         ("data subjects", report["data_subjects"]), ("controller", report["controller"]),
                         ("recipients", report["recipients"]), ("retention", report["retention"]),
                         ("data leaving the sites", report["data_leaving_sites"]),
                         ("base model digest", report["base_model_digest"]),
                         ("rounds", f"{report['rounds']['completed']} completed, {report['rounds']['failed']} failed"),
                         ("adapter versions", report["adapter_versions"])]:
        lines.append(f"| {label} | {_cell(value)} |")
    lines += ["", "## Parties", ""]
    lines += _table(["client", "org", "status", "listed in job", "rounds contributed", "epsilon spent"],
                    [[p["client_id"], p["org"], p["status"], "yes" if p["listed_in_job"] else "no",
                      p["rounds_contributed"], p["epsilon_spent"]] for p in report["parties"]])
    lines += ["", "## Safeguards", "", *(f"- {_text(s, block=True)}" for s in report["safeguards"]), ""]
    return "\n".join(lines)


REPORT_RENDERERS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    LINEAGE_FORMAT: lineage_markdown,
    PROCESSING_FORMAT: processing_markdown,
}


def report_markdown(report: Mapping[str, Any]) -> str:
    """Either report as Markdown (chosen by its ``report`` field)."""
    renderer = REPORT_RENDERERS.get(report.get("report"))
    if renderer is None:
        raise ValueError(f"no Markdown renderer for report {report.get('report')!r}")
    return renderer(report)
