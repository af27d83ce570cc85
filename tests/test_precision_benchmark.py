"""``benchmarks.precision`` runs its tiny preset and reports both settings side by side."""

import jax

from benchmarks import precision


def test_tiny_preset_rows_and_table():
    rows = precision.run("tiny", rounds=1, log=lambda *_: None)
    assert [r["kind"] for r in rows] == ["SR sample_space", "K-FAC step", "K-FAC step"]
    for r in rows:
        assert 0 < r["error highest"] < 1e-2 and 0 < r["error None"] < 1e-2
        if jax.default_backend() == "cpu":  # the CPU computes true float32 products at either setting
            assert abs(r["error highest"] - r["error None"]) <= 1e-3 * r["error None"]
        assert r["first highest s"] > 0 and len(r["warm None ms"]) == 3 and r["highest / None warm"] > 0
    table = precision.markdown(rows).splitlines()
    assert len(table) == 2 + len(rows) and "CNN width 4" in table[-1]
