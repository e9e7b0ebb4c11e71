"""Runs in progress as the app's sidebar reads them (store/progress.py): parts folders of compute.all runs, with and
without a plan, alive or stopped, and the suite's queue of the first run's background stores."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from store import progress

PLAN = ["setup", "activations", "ablation/conv5", "attributes/conv5", "dissection/conv5"]


def parts(directory: Path, name: str, done=(), writing=None, plan=PLAN, locked: bool = False):
    """A parts folder as store/writer.py leaves it; with ``locked`` an open lock file held like a running writer's
    (returned, to be closed by the test)."""
    folder = directory / f".{name}.parts"
    folder.mkdir(parents=True)
    info = {"run_key": "k", "provenance": {"model": "demo", "run_name": name}}
    if plan is not None:
        info["plan"] = plan
    (folder / "run.json").write_text(json.dumps(info))
    for stage in done:
        (folder / (stage.replace("/", "__") + ".h5")).write_bytes(b"")
    if writing:
        (folder / (writing.replace("/", "__") + ".h5.tmp")).write_bytes(b"")
    lock = open(folder / "lock", "w")
    if locked:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return lock
    lock.close()
    return None


@pytest.fixture()
def held():
    """Lock files to close at the end of the test (a running writer's)."""
    files = []
    yield files
    for handle in files:
        handle.close()


def test_a_running_stage_is_the_ith_of_the_plan(tmp_path, held):
    held.append(parts(tmp_path, "demo-bn", done=PLAN[:2], writing="ablation/conv5", locked=True))
    (run,) = progress.runs_in_progress(tmp_path)
    assert (run.name, run.model, run.done, run.running) == ("demo-bn", "demo", PLAN[:2], "ablation/conv5")
    assert run.alive is True
    assert run.describe() == "stage 3 of 5: ablation/conv5"


def test_a_stage_that_has_not_opened_its_part_is_the_one_after_the_last_finished(tmp_path, held):
    held.append(parts(tmp_path, "demo-seed1", done=PLAN[:3], locked=True))
    (run,) = progress.runs_in_progress(tmp_path)
    assert run.describe() == "stage 4 of 5: attributes/conv5"


def test_without_a_plan_only_the_stages_done_are_shown(tmp_path, held):
    held.append(parts(tmp_path, "old", done=["setup"], plan=None, locked=True))
    (run,) = progress.runs_in_progress(tmp_path)
    assert run.plan is None and run.position() is None
    assert run.describe() == "1 stages done, the last setup"
    held.append(parts(tmp_path, "older", done=["setup"], writing="activations", plan=None, locked=True))
    assert progress.runs_in_progress(tmp_path)[1].describe() == "1 stages done, now activations"


def test_a_run_whose_writer_is_gone_is_stopped(tmp_path):
    parts(tmp_path, "demo-bn", done=PLAN[:2], writing="ablation/conv5", locked=False)
    (run,) = progress.runs_in_progress(tmp_path)
    if run.alive is None:
        pytest.skip("/proc/locks is not readable here")
    assert run.alive is False
    assert run.describe().startswith("stopped at stage 3 of 5: ablation/conv5")


def test_damaged_or_foreign_files_are_no_runs_and_raise_nothing(tmp_path):
    (tmp_path / "demo.h5").write_bytes(b"")  # a finished store is no run
    (tmp_path / ".broken.parts").mkdir()
    (tmp_path / ".broken.parts" / "run.json").write_text("{half")
    (tmp_path / ".list.parts").mkdir()
    (tmp_path / ".list.parts" / "run.json").write_text(json.dumps({"plan": "not a list"}))
    runs = {run.name: run for run in progress.runs_in_progress(tmp_path)}
    assert set(runs) == {"broken", "list"} and runs["list"].plan is None
    assert progress.runs_in_progress(tmp_path / "nowhere") == []


def test_the_suite_queue_says_what_is_coming(tmp_path, held):
    lock = open(tmp_path / progress.SUITE_LOCK, "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.append(lock)
    stores = [("demo-bn", "done"), ("demo-dropout", "computing"), ("demo-seed1", "waiting"), ("demo-seed2", "waiting")]
    progress.write_suite_status(tmp_path, stores, "waiting", ["demo", "demo-seed1", "demo-seed2"])
    held.append(parts(tmp_path, "demo-dropout", done=PLAN[:1], locked=True))
    suite = progress.suite_status(tmp_path)
    assert suite.unfinished() == ["demo-dropout", "demo-seed1", "demo-seed2"] and suite.ahead("demo-seed2") == 2
    assert progress.coming(tmp_path, "demo-dropout") == "demo-dropout is being computed: stage 2 of 5: activations."
    assert progress.coming(tmp_path, "demo-seed1") == "demo-seed1 is coming: 1 store ahead of it in the background run."
    assert progress.coming(tmp_path, "demo-seed2") == ("demo-seed2 is coming: 2 stores ahead of it in the background "
                                                       "run.")
    assert progress.coming(tmp_path, "demo-bn") is None and progress.coming(tmp_path, "other") is None
    assert progress.table_coming(tmp_path) == ("Table 1 is computed over demo, demo-seed1, demo-seed2 once they are "
                                               "all here.")
    lines, active = progress.summary(tmp_path)
    assert active and lines == ["demo-dropout: stage 2 of 5: activations", "demo-seed1: waiting",
                                "demo-seed2: waiting", "Table 1: waiting"]


def test_a_stopped_suite_says_to_rerun(tmp_path):
    progress.write_suite_status(tmp_path, [("demo-bn", "training")], "waiting", ["demo"])
    (tmp_path / progress.SUITE_LOCK).touch()
    if progress.locked_inodes() is None:
        pytest.skip("/proc/locks is not readable here")
    assert "was stopped" in progress.coming(tmp_path, "demo-bn")
    lines, active = progress.summary(tmp_path)
    assert not active and lines == ["demo-bn: training its network (stopped: rerun to resume)",
                                    "Table 1: waiting (stopped: rerun to resume)"]
    progress.write_suite_status(tmp_path, [("demo-bn", "done")], "done", ["demo"])
    assert progress.summary(tmp_path) == ([], False)


def test_the_queue_file_is_replaced_whole(tmp_path):
    progress.write_suite_status(tmp_path, [("a", "waiting")], None)
    assert not list(tmp_path.glob("*.tmp")) and progress.suite_status(tmp_path).prediction is None
    (tmp_path / progress.SUITE_FILE).write_text("[1, 2]")
    assert progress.suite_status(tmp_path) is None


def test_progress_needs_neither_torch_nor_streamlit():
    import subprocess
    import sys

    code = ("import sys, store.progress; bad = {'torch', 'streamlit'} & set(sys.modules); "
            "print(*sorted(bad)); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_first_run_suite_keeps_its_queue(tmp_path, monkeypatch):
    """compute.suite --first-run: variants with their pages' stages, then the instances at conv5, then Table 1 over
    demo and the instances; the queue file follows each store (training and compute.all recorded, not run)."""
    import compute.all
    import compute.train
    from compute import suite

    data_dir = tmp_path / "data"
    stores = data_dir / "stores"
    seen = []

    def fake_train(model, seed=0, data_dir=None, epochs=None):
        seen.append(("train", f"{model}-{seed}", progress.suite_status(stores).state(suite.run_name(model, seed))))

    def fake_all(argv):
        args = compute.all.parse_args(argv)
        name = suite.run_name(args.model, args.seed)
        seen.append(("all", name, progress.suite_status(stores).state(name), args.layers, args.greedy_steps,
                     args.live_layers))
        return 0

    monkeypatch.setattr(compute.train, "train_demo", fake_train)
    monkeypatch.setattr(compute.all, "main", fake_all)
    monkeypatch.setattr(suite, "table_one", lambda paths: seen.append(("table", [p.name for p in paths])) or 0)
    monkeypatch.setattr(suite, "stop_on_sigterm", lambda: None)  # leave pytest's own SIGTERM handling alone
    assert suite.main(["--first-run", "--data-dir", str(data_dir)]) == 0
    assert seen[:2] == [("train", "demo-bn-0", "training"),
                        ("all", "demo-bn", "computing", ["conv5"], 0, [])]
    assert [step[1] for step in seen if step[0] == "all"] == ["demo-bn", "demo-dropout", "demo-seed1", "demo-seed2",
                                                              "demo-seed3", "demo-seed4"]
    assert seen[-2][3] == ["conv5"]
    assert seen[-1] == ("table", ["demo.h5", "demo-seed1.h5", "demo-seed2.h5", "demo-seed3.h5", "demo-seed4.h5"])
    queue = progress.suite_status(stores)
    assert queue.unfinished() == [] and queue.prediction == "done"
    assert queue.table_stores == ["demo", "demo-seed1", "demo-seed2", "demo-seed3", "demo-seed4"]


def test_a_sub_part_counts_for_its_stage(tmp_path, held):
    """Parts below a stage's name (a pass of it, a torchrun rank's shard) show as that stage, and finish nothing."""
    held.append(parts(tmp_path, "demo", done=["setup", "activations/shard-0-of-2"], writing="activations/shard-1-of-2",
                      locked=True))
    (run,) = progress.runs_in_progress(tmp_path)
    assert run.done == ["setup"] and run.describe() == "stage 2 of 5: activations"
