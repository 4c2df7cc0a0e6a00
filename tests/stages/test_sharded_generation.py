"""pairs and eval on two processes (`model.gpus: 2`, CPU): the items split between them, the outputs merged back in
order and equal to one process's, chunk resume as before."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mathwizard.config import EvalConfig, ModelConfig, PairsConfig
from mathwizard.manifest import read_manifest
from tests.stages.eval_data import make_data
from tests.stages.test_pairs import make_teach


def _predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_sharded_greedy_eval_answers_as_one_process(tmp_path: Path) -> None:
    from mathwizard.stages import evaluate

    data = make_data(tmp_path / "02-teach")  # 6 problems
    cfg = EvalConfig(max_new_tokens=8, batch_size=2)  # 3 batches: rank 0 answers the 1st and 3rd, rank 1 the 2nd
    seen: list[tuple[int, int]] = []
    # The launch waits on its ranks (own processes, mostly imports and loading); the one-process run goes meanwhile.
    with ThreadPoolExecutor(max_workers=1) as pool:
        launched = pool.submit(
            evaluate.run,
            *(cfg, ModelConfig(gpus=2), "tiny", data, tmp_path / "two", "base"),
            progress=lambda d, t: seen.append((d, t)),
        )
        one = evaluate.run(cfg, ModelConfig(gpus=1), "tiny", data, tmp_path / "one", "base")
        two = launched.result()

    single, sharded = _predictions(tmp_path / "one"), _predictions(tmp_path / "two")
    assert [p["id"] for p in sharded] == [p["id"] for p in single] == ["e1", "e2", "m1", "m2", "h1", "h2"]
    assert sharded == single  # greedy: the very same answers, tokens and scores, in the split's order
    report_one, report_two = evaluate.Report.of(one), evaluate.Report.of(two)
    assert report_two.model_dump(exclude={"seconds"}) == report_one.model_dump(exclude={"seconds"})
    assert two.fingerprint == one.fingerprint and two == read_manifest(tmp_path / "two")
    assert not (tmp_path / "two" / ".shards").exists() and not (tmp_path / "two" / ".launch").exists()
    assert seen[-1] == (6, 6) and all(t == 6 for _, t in seen)  # both ranks' answers add up to the whole split


def test_sharded_pairs_sample_every_chunk_as_one_process_and_resume_by_chunk(tmp_path: Path) -> None:
    from mathwizard.data.splits import read_table
    from mathwizard.stages import pairs

    teach = make_teach(tmp_path / "02-teach")  # train 8, val 2
    cfg = PairsConfig(max_new_tokens=8, max_attempts=2, batch_size=4, chunk_size=4)  # chunks: train 0-1, val 0
    one = pairs.run(cfg, ModelConfig(gpus=1), "tiny", teach, tmp_path / "one")

    out = tmp_path / "two"
    # One chunk already finished by an earlier (single-process) run: the two ranks share the other two.
    (out / "chunks").mkdir(parents=True)
    finished = tmp_path / "one" / "chunks" / "train-00001.parquet"
    (out / "chunks" / finished.name).write_bytes(finished.read_bytes())
    seen: list[tuple[int, int]] = []
    two = pairs.run(cfg, ModelConfig(gpus=2), "tiny", teach, out, progress=lambda d, t: seen.append((d, t)))

    for split in ("train", "val"):
        assert read_table(out, split).to_pylist() == read_table(tmp_path / "one", split).to_pylist()
    assert (out / "failures.jsonl").read_text() == (tmp_path / "one" / "failures.jsonl").read_text()
    report_one, report_two = pairs.Report.of(one), pairs.Report.of(two)
    # the same samples were drawn (attempts and generated tokens per chunk), only the timings differ
    volatile = {"seconds", "wall_seconds", "resumed_chunks", "splits"}
    assert report_two.model_dump(exclude=volatile) == report_one.model_dump(exclude=volatile)
    assert {s: v.generated_tokens for s, v in report_two.splits.items()} == {
        s: v.generated_tokens for s, v in report_one.splits.items()
    }
    assert (report_one.resumed_chunks, report_two.resumed_chunks) == (0, 1)
    assert seen[0] == (4, 10) and seen[-1] == (10, 10)  # the resumed chunk at once, then the ranks' items
