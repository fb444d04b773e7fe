"""The README against the code: the benchmark table, the CLI reference, the Kafka examples."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from google.protobuf import json_format

from bench.run import RESULTS, TARGETS
from bench.table import END, START, markdown_table, readme_block, with_table
from prolifscore.cli.main import main as cli_main
from prolifscore.v1 import pipeline_pb2, scoring_pb2, training_pb2

README = Path(__file__).resolve().parents[2] / "README.md"


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ")[0]
    nxt = re.search(rf"\n#{{1,{len(level)}}} ", text[start + 1 :])
    return text[start : start + 1 + nxt.start()] if nxt else text[start:]


# --------------------------------------------------------------------------------------------
# Benchmarks.


def test_readme_benchmark_table_matches_results() -> None:
    """Read at test time: a bench rerun that was not copied into the README fails here."""
    results = json.loads(RESULTS.read_text())
    block = readme_block(README.read_text())
    assert block.strip() == markdown_table(results).strip(), (
        "the README's benchmark table differs from bench/results.json: run "
        "`python -m bench.table --write-readme` (or paste the output of `python -m bench.table` "
        f"between {START} and {END})"
    )


def test_markdown_table_rows() -> None:
    target_key = next(iter(TARGETS))
    results = {
        "_note": "skipped",
        "a_ratio": 0.5,
        "count": 3,
        "flag": True,
        "label": "text",
        target_key: 1.25,
    }
    lines = markdown_table(results).splitlines()
    assert lines[:2] == ["| Metric | Value | Target |", "|---|---:|---|"]
    assert lines[2:] == [
        "| `a_ratio` | 0.5 |  |",
        "| `count` | 3 |  |",
        f"| `{target_key}` | 1.25 | {TARGETS[target_key]} |",
    ]


def test_with_table_replaces_only_the_block() -> None:
    text = f"# T\n\nbefore\n\n{START}\nold\n{END}\n\n## After\n"
    new = with_table(text, "| new |\n")
    assert new == f"# T\n\nbefore\n\n{START}\n| new |\n{END}\n\n## After\n"
    assert readme_block(new).strip() == "| new |"
    with pytest.raises(ValueError, match="markers"):
        readme_block("no markers here")


# --------------------------------------------------------------------------------------------
# Structure and CLI reference.


def test_readme_sections_in_order() -> None:
    headings = re.findall(r"^## (.+)$", README.read_text(), re.M)
    expected = [
        "Quickstart",
        "Architecture",
        "Preprocessing",
        "Scoring",
        "Training",
        "Sending work",
        "Configuration",
        "Kubernetes",
        "Benchmarks",
        "Status and limitations",
    ]
    assert [h for h in headings if h in expected] == expected
    assert "BENCH_TABLE" not in README.read_text()


def test_table_of_contents_lists_every_section_and_its_anchor() -> None:
    """The contents block names each ## and ### heading below it, in order, with GitHub's
    anchor for it (lower case, punctuation dropped, spaces to hyphens)."""
    text = README.read_text()
    toc, body = text.split("<!-- toc:end -->")
    entries = re.findall(r"^ *- \[(.+)\]\(#(.+)\)$", toc.split("<!-- toc:start -->")[1], re.M)
    headings = re.findall(r"^#{2,3} (.+)$", body, re.M)
    assert [title for title, _ in entries] == headings
    for title, anchor in entries:
        assert anchor == re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit):
        cli_main([*argv, "--help"])
    return capsys.readouterr().out


def test_cli_reference_covers_every_command_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    section = _section(README.read_text(), "### CLI")
    usage = _help(capsys)
    commands = re.search(r"\{([a-z,]+)\}", usage)
    assert commands, usage
    missing = []
    for command in commands.group(1).split(","):
        if f"`{command}" not in section:
            missing.append(command)
            continue
        options = set(re.findall(r"(--[a-z][a-z-]*)", _help(capsys, command))) - {"--help"}
        missing += [f"{command} {o}" for o in sorted(options) if o not in section]
    assert not missing, f"README's CLI reference lacks {missing}"


# --------------------------------------------------------------------------------------------
# Kafka JSON examples parse as the messages of their topics.

TOPICS = {
    "prolif.slides.ingest": pipeline_pb2.SlideIngest,
    "prolif.score.requests": scoring_pb2.ScoreRequest,
    "prolif.train.requests": training_pb2.TrainRequest,
}


def kafka_example() -> str:
    """The README's Kafka client example (the Python block under "Any Kafka client")."""
    text = README.read_text()
    after = text[text.index("\n### Any Kafka client (JSON)\n") :]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_kafka_json_examples_parse() -> None:
    examples = [
        (body, topic, key)
        for topic, key, body in re.findall(
            r'^send\("(\S+)", "(\S+)", (\{.*\})\)$', kafka_example(), re.M
        )
    ]
    assert {topic for _, topic, _ in examples} == set(TOPICS)
    for body, topic, key in examples:
        message = json_format.Parse(body, TOPICS[topic]())  # unknown JSON fields raise
        ident = getattr(message, "slide_id", "") or getattr(message, "request_id", "")
        assert ident == key, (topic, body)
    train = [json.loads(b) for b, topic, _ in examples if topic == "prolif.train.requests"]
    assert any(t.get("profile") == "quick" for t in train)
