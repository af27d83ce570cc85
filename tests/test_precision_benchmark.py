"""``benchmarks.precision`` runs its tiny preset and reports both settings side by side."""

import json

import jax

from benchmarks import precision


def test_tiny_preset_rows_and_table(tmp_path, capsys):
    precision.main(["--preset", "tiny", "--rounds", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "precision.json").read_text())
    assert [r["kind"] for r in rows] == ["SR sample_space", "K-FAC step", "K-FAC step"]
    for r in rows:
        assert 0 < r["error highest"] < 1e-2 and 0 < r["error None"] < 1e-2
        if jax.default_backend() == "cpu":  # the CPU computes true float32 products at either setting
            assert abs(r["error highest"] - r["error None"]) <= 1e-3 * r["error None"]
        assert r["first highest s"] > 0 and len(r["warm None ms"]) == 3 and r["highest / None warm"] > 0
    table = (tmp_path / "precision.md").read_text().strip().splitlines()
    assert table[0].startswith("float32 against float64; jax ") and "order highest-first" in table[0]
    assert len(table) == 2 + 2 + len(rows) and "CNN width 4" in table[-1]  # header, blank, table head, rows
    assert "| K-FAC step | MLP width 16" in capsys.readouterr().out
