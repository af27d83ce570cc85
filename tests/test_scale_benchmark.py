"""benchmarks/scale.py at tiny sizes: one workload per child process, its numbers and the budget rule."""

import importlib.util

import pytest

from benchmarks import scale

# each test starts benchmark workers in child processes (a JAX import and a compile each):
# marked slow (CI runs them; -m "not slow" leaves them out)
pytestmark = pytest.mark.slow


def test_num_params_matches_the_model():
    assert scale.num_params(512) == 534_529  # the full preset's P (issue 15: P >= 5e5)
    assert scale.num_params(64) == 9_473


def test_worker_solves_and_reports(tmp_path):
    rows = scale.run(quick=True, sizes=(40,), widths=(8,), chunk=16, tools=("fishr", "fishr chunked"),
                     budget_gb=8.0, time_limit=240.0, out_dir=str(tmp_path))
    assert [r["status"] for r in rows] == ["ok"] * 2
    for r in rows:
        assert r["first_s"] > 0 and 0 < r["warm_min_s"] <= r["warm_s"] <= r["warm_max_s"] and r["finite"]
        assert 0 < r["peak_rss_gb"] < 8
    # chunked and unchunked compute the same update
    by = {(r["tool"], r["N"]): r["update_norm"] for r in rows}
    assert by[("fishr chunked", 40)] == pytest.approx(by[("fishr", 40)], rel=1e-4)
    assert scale.largest_under_budget(rows, "fishr") == (40, scale.num_params(8))
    text = (tmp_path / "scale_quick.md").read_text()
    assert "Largest problem solved under 8 GiB" in text and "| fishr chunked | 40 | 289 | 16 |" in text


def test_over_budget_is_stopped_and_reported():
    row = scale.measure("fishr", 32, 8, 16, False, budget_bytes=1.0, time_limit=240.0)  # 1 byte: any process
    assert row["status"] == "over budget" and "first_s" not in row
    assert scale.largest_under_budget([row], "fishr") is None


@pytest.mark.skipif(importlib.util.find_spec("netket") is not None, reason="NetKet installed")
def test_missing_peer_is_reported_not_failed():
    row = scale.measure("netket srt_onthefly", 32, 8, 16, False, budget_bytes=8 * 2**30, time_limit=240.0)
    assert row["status"] == "not installed"
