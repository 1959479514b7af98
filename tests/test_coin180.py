"""COIN at its published granularity: 180 task classes (data.coin_labels=task), on the real metadata."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pytest

from vidray.cli import main
from vidray.data.coin import index_coin, load_coin_taxonomy
from vidray.config import load_config

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "coin.md"


def _index(shared_coin: Path, tmp_path: Path, labels: str, filtered: bool) -> tuple[dict, dict[str, Counter]]:
    """index_coin's summary and, from its missing list (nothing is downloaded), the selected videos per split."""
    (tmp_path / "videos").mkdir(exist_ok=True)
    out = tmp_path / f"{labels}_{'10-60' if filtered else 'all'}.parquet"
    summary = index_coin(
        [shared_coin / "coin_train_70.json", shared_coin / "coin_test_30.json"],
        shared_coin / "taxonomy_domains.csv",
        tmp_path / "videos",
        out,
        min_duration=10 if filtered else None,
        max_duration=60 if filtered else None,
        probe=False,
        labels=labels,
    )
    per_split: dict[str, Counter] = {"train": Counter(), "val": Counter()}
    with out.with_suffix(".missing.csv").open() as f:
        for row in csv.DictReader(f):
            per_split[row["split"]][row["class"]] += 1
    return summary, per_split


def _doc_table(heading: str) -> dict[str, list[int]]:
    """{first column: the four counts} of the table under ``heading`` in docs/coin.md."""
    section = DOC.read_text().split(heading, 1)[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and re.fullmatch(r"\d+", cells[-1]):
            rows[cells[1] if heading == "### Per task" else cells[0]] = [int(c) for c in cells[2:]]
        elif rows and not line.startswith("|"):
            break
    return rows


def test_task_labels_and_the_documented_counts(shared_coin, tmp_path):
    by_id, by_task, classes = load_coin_taxonomy(shared_coin / "taxonomy_domains.csv", labels="task")
    assert len(classes) == 180 and classes == sorted(classes)
    assert by_task["RemoveBlackheadsWithGlue"] == by_id[166] == "RemoveBlackheadsWithGlue"

    filtered, filtered_split = _index(shared_coin, tmp_path, "task", filtered=True)
    everything, all_split = _index(shared_coin, tmp_path, "task", filtered=False)
    assert filtered["labels"] == "task" and len(filtered["selected_per_class"]) == 180
    assert filtered["entries"] == everything["selected"] == 10070 and filtered["problems"] == 0
    assert filtered["selected"] == sum(filtered["selected_per_class"].values()) == 1024
    assert sum(n == 0 for n in filtered["selected_per_class"].values()) == 19

    # docs/coin.md's per-task table is what the index selects.
    documented = _doc_table("### Per task")
    assert len(documented) == 180
    for task in classes:
        counts = [filtered_split["train"][task], filtered_split["val"][task], all_split["train"][task], all_split["val"][task]]
        assert documented[task] == counts, task

    # ... and its per-domain table is the domain labelling's.
    domains, domain_split = _index(shared_coin, tmp_path, "domain", filtered=True)
    assert len(domains["selected_per_class"]) == 12 and domains["selected"] == 1024
    documented = _doc_table("### Per domain")
    for domain, count in domains["selected_per_class"].items():
        assert documented[domain][:2] == [domain_split["train"][domain], domain_split["val"][domain]]
        assert sum(documented[domain][:2]) == count


def test_cli_and_config_switch_the_labels(shared_coin, tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    main([
        "index", "coin", "--annotations", str(shared_coin / "coin_test_30.json"),
        "--taxonomy", str(shared_coin / "taxonomy_domains.csv"), "--videos", str(tmp_path / "videos"),
        "--out", str(tmp_path / "m.parquet"), "--no-probe", "--labels", "task",
    ])  # fmt: skip
    console = capsys.readouterr()
    assert '"labels": "task"' in console.out
    # No video downloaded: every selected one is listed as missing, in the line for a person too.
    assert re.fullmatch(r"vidray index: 0 videos of 180 classes; \d+ listed but not found -> .*m\.parquet\n", console.err)

    cfg = load_config(REPO / "configs" / "coin180.yaml")
    assert cfg.data.source == "coin" and cfg.data.coin_labels == "task"
    assert cfg.data.min_duration is None and cfg.data.max_duration is None
    coin12 = load_config(REPO / "configs" / "coin12.yaml")
    assert coin12.data.coin_labels == "domain"
    assert cfg.data.manifest != coin12.data.manifest and cfg.data.dataset_dir != coin12.data.dataset_dir
    with pytest.raises(Exception, match="coin_labels"):
        load_config(None, ["data.coin_labels=tasks"])
