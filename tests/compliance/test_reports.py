"""Lineage and record-of-processing reports over a job the round engine ran (two rounds, three
honest clients, epsilon 2.0 each per round; records 100 / 200 / 300)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.compliance.reports import NOT_STATED, report_markdown
from fedtune.coordinator.reports import ReportNotFound, adapter_lineage, processing_record
from fedtune.coordinator.rounds import run_job
from fedtune.coordinator.store import AuditEvent, Job
from fedtune_testing.accounting import reference_epsilon

MECH = (0.1, 1.1, 5)  # what the honest agents sign (tests/compliance/conftest.py)
TWO_ROUNDS = reference_epsilon([MECH, MECH], 1e-5)


@pytest.fixture
def ran(job_context, honest_agents):
    assert [r.status for r in run_job(job_context, "job-1", honest_agents)] == ["completed", "completed"]
    return job_context.sessions


def test_lineage_of_the_last_version(ran):
    with ran() as s:
        report = adapter_lineage(s, "job-1", 2)
        seqs = {e.resource_id: e.seq for e in s.scalars(select(AuditEvent).where(
            AuditEvent.action == "adapter_version.created"))}
    assert report["base_digest"] == "sha256:base"
    assert [(v["version"], v["parent_version"], v["round"]) for v in report["versions"]] == \
        [(2, 1, 2), (1, 0, 1), (0, None, None)]
    assert [v["audit_seq"] for v in report["versions"]] == [seqs["job-1/v2"], seqs["job-1/v1"], seqs["job-1/v0"]]
    v2 = report["versions"][0]
    assert v2["aggregation"] == "ffa" and v2["client_level_dp"] is None
    assert [(c["client_id"], c["records"], c["epsilon"], c["delta"]) for c in v2["contributors"]] == \
        [("bank-a", 100, 2.0, 1e-5), ("bank-b", 200, 2.0, 1e-5), ("hospital-c", 300, 2.0, 1e-5)]
    clients = {c["client_id"]: c for c in report["clients"]}
    assert clients["bank-b"]["org"] == "bank" and clients["bank-b"]["rounds"] == [1, 2]
    assert clients["bank-b"]["records"] == 400
    assert clients["bank-b"]["epsilon_per_round"] == [{"round": 1, "epsilon": 2.0, "delta": 1e-5},
                                                      {"round": 2, "epsilon": 2.0, "delta": 1e-5}]
    # per client, its two rounds composed (signed mechanism q 0.1, sigma 1.1, 5 steps each) at the job's
    # delta, not the sum of the two signed 2.0s; never across clients
    assert clients["bank-b"]["epsilon_total"] == pytest.approx(TWO_ROUNDS, rel=1e-9)
    assert clients["bank-b"]["delta_total"] == 1e-5
    markdown = report_markdown(report)
    assert "# Lineage of job-1 adapter version 2" in markdown and "| bank-b | bank | 1, 2 | 400 |" in markdown
    assert json.loads(json.dumps(report)) == report  # JSON as it stands

    with ran() as s:
        v1 = adapter_lineage(s, "job-1", 1)
    assert [v["version"] for v in v1["versions"]] == [1, 0]
    assert v1["clients"][0]["epsilon_total"] == pytest.approx(reference_epsilon([MECH], 1e-5), rel=1e-9)


def test_record_of_processing(ran):
    with ran() as s:
        report = processing_record(s, "job-1")
    assert report["purpose"] == "fraud-memo classification"
    assert report["data_categories"] == ["transaction memos"]
    assert (report["retention"], report["retention_days"]) == ("365 days", 365)
    assert report["legal_basis"] == report["controller"] == report["data_subjects"] == NOT_STATED
    assert report["status"] == "completed" and report["rounds"] == {"completed": 2, "failed": 0}
    assert report["adapter_versions"] == 3
    assert [(p["client_id"], p["org"], p["rounds_contributed"], p["epsilon_spent"]) for p in report["parties"]] == \
        [("bank-a", "bank", 2, pytest.approx(TWO_ROUNDS, rel=1e-9)), ("bank-b", "bank", 2, pytest.approx(TWO_ROUNDS)),
         ("hospital-c", "hospital", 2, pytest.approx(TWO_ROUNDS))]
    safeguards = "\n".join(report["safeguards"])
    assert "target epsilon 4.0, delta 1e-05 for the whole job" in safeguards and "epsilon <= 10.0" in safeguards
    assert "L2 norm above 1.0" in safeguards
    markdown = report_markdown(report)
    assert "| purpose | fraud-memo classification |" in markdown and "| retention | 365 days |" in markdown


def test_unstated_processing_reads_not_stated(ran):
    with ran.begin() as s:
        s.add(Job(id="job-2", base_digest="sha256:base", config={"rounds": 1}))
    with ran() as s:
        report = processing_record(s, "job-2")
    assert {report[k] for k in ("purpose", "legal_basis", "data_categories", "retention")} == {NOT_STATED}
    assert report["parties"] == [] and "no target epsilon" in report["safeguards"][0]


def test_missing_job_or_version(ran):
    with ran() as s, pytest.raises(ReportNotFound, match="no adapter version 7"):
        adapter_lineage(s, "job-1", 7)
    with ran() as s, pytest.raises(ReportNotFound, match="'job-9' does not exist"):
        processing_record(s, "job-9")


def test_report_commands(ran, database_url):
    runner = CliRunner()
    result = runner.invoke(app, ["audit", "lineage", "--job", "job-1", "--version", "2", "--output", "json",
                                 "--database-url", database_url])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["versions"][0]["version"] == 2
    result = runner.invoke(app, ["audit", "processing", "--job", "job-1", "--database-url", database_url])
    assert result.exit_code == 0 and result.output.startswith("# Record of processing: job job-1")
    result = runner.invoke(app, ["audit", "processing", "--job", "nope", "--database-url", database_url])
    assert result.exit_code == 1 and "does not exist" in result.output


# --- operator text is escaped in the Markdown (security review finding 8) -------------------------------

HOSTILE = ("<img src=x onerror=alert(1)> [x](javascript:alert(1)) ![i](http://evil.example/x.png) <https://e.example> "
           "**b** _i_ `c` ~~s~~ # h | \u202etxt.exe\u2066 &amp; \\* end\nnext line")


def _render(markdown: str) -> str:
    """Markdown as an auditor's viewer renders it (CommonMark with raw HTML, GFM tables and strikethrough)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)


def _shown(text: str) -> str:
    """What a reader must see for ``text``: itself, line breaks as spaces, bidi controls named."""
    return text.replace("\n", " ").replace("\u202e", "<U+202E>").replace("\u2066", "<U+2066>")


def test_operator_text_renders_as_text_in_both_reports(ran):
    import html as html_lib
    import re

    with ran() as s:
        processing = processing_record(s, "job-1")
        lineage = adapter_lineage(s, "job-1", 2)
    processing.update(purpose=HOSTILE, legal_basis=HOSTILE, data_categories=[HOSTILE, "plain"])
    processing["parties"][0]["org"] = HOSTILE
    processing["safeguards"].append("- " + HOSTILE)
    lineage["clients"][0]["org"] = HOSTILE
    lineage["notes"].append("1. " + HOSTILE)
    for markdown in (report_markdown(processing), report_markdown(lineage)):
        rendered = _render(markdown)
        for markup in ("<img", "<a ", "<strong", "<em", "<code>c</code>", "<s>", "<del", "<ol", "<li>\n<ul", "\u202e",
                       "\u2066", "javascript:alert(1)\""):
            assert markup not in rendered, (markup, rendered)
    rendered = _render(report_markdown(processing))
    purpose = re.search(r"<td>purpose</td>\s*<td>(.*?)</td>", rendered, re.S)[1]
    assert html_lib.unescape(purpose) == _shown(HOSTILE)  # escaped, not lost: the reader sees the text
    assert "<li>- " + html_lib.escape(_shown(HOSTILE), quote=False) in rendered


def test_plain_text_stays_plain():
    from fedtune.compliance.reports import _cell

    assert _cell("fraud-memo classification") == "fraud-memo classification"
    assert _cell(None) == "-" and _cell(2.0) == "2" and _cell("a|b") == "a\\|b"
