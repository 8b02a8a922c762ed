"""Results pages of the documentation site: the header names the date, the command and the machine."""

from datetime import datetime, timezone

from prefopt.reporting.doc_page import command_line, machine, render_page, write_doc_page


def test_the_page_names_date_command_and_machine_above_the_table():
    when = datetime(2026, 12, 1, 1, 26, tzinfo=timezone.utc)
    info = {"platform": "Linux", "CPU": "AMD EPYC, 2 cores", "torch": "2.13.0", "GPU": "none"}
    page = render_page("Speed", "| a |\n|---|\n| 1 |\n", "python scripts/speed_vs_trl.py --doc x.md", when, info)
    assert page.startswith("# Speed\n")
    for row in (
        "| date | 2026-12-01 01:26 UTC |",
        "| command | `python scripts/speed_vs_trl.py --doc x.md` |",
        "| CPU | AMD EPYC, 2 cores |",
        "| torch | 2.13.0 |",
        "| GPU | none |",
    ):
        assert row in page
    assert page.index("| GPU | none |") < page.index("| a |") and page.endswith("| 1 |\n")


def test_write_doc_page_writes_the_file_with_this_machine_and_command(tmp_path):
    path = write_doc_page(tmp_path / "results" / "page.md", "T", "body", command="python x.py")
    text = path.read_text()
    assert "| command | `python x.py` |" in text and f"| torch | {machine()['torch']} |" in text
    assert command_line(["scripts/x.py", "--doc", "a b.md"]) == "python scripts/x.py --doc 'a b.md'"
