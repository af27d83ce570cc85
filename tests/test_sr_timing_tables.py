"""The SR timing benchmark's tables: the paired checks of issue 12 (auto, NetKet twins) as printed."""

from benchmarks import sr_timing


def _row(auto_ratio: float, twins: bool):
    ms = {"gradient": (0.3, 0.3, 0.4), "jacobian": (1.0, 0.9, 1.2), "fishr auto": (2.0, 1.9, 2.5),
          "fishr lazy": (6.0, 5.9, 7.0), "fishr sample_space": (2.0, 1.9, 2.2)}
    row = dict(model="RBM alpha=16", N=256, P=4368, ms=ms, first_s={k: 1.0 for k in ms},
               **{"fishr fastest": 2.0, "fishr fastest / jacobian": 2.0, "auto / fastest exact fishr": 1.0,
                  "auto / fastest fishr": 1.0})
    row["auto check"] = dict(against="fishr sample_space", repeats=31, ours_ms=(2.0 * auto_ratio, 1.9, 2.6),
                             theirs_ms=(2.0, 1.9, 2.3), ratio=auto_ratio, ratio_fastest=1.0)
    row["twins"] = {"fishr lazy": dict(netket="netket QGTOnTheFly", ours_ms=(6.0, 5.9, 7.0), theirs_ms=(5.0, 4.9, 6.0),
                                       ratio=1.2, ratio_fastest=1.2)} if twins else {}
    return row


def test_auto_check_says_whether_the_target_holds():
    table = sr_timing.markdown([_row(1.02, twins=False), _row(1.3, twins=False)])
    checks = [line for line in table.splitlines() if line.startswith("| RBM") and "sample_space |" in line]
    assert len(checks) == 2 and checks[0].endswith("| yes |") and checks[1].endswith("| NO |")
    assert "1.02x (1.00x)" in checks[0]
    assert "NetKet twin" not in table  # no NetKet rows without NetKet


def test_twin_table_lists_each_pair_with_its_ratio():
    table = sr_timing.markdown([_row(1.0, twins=True)])
    twin = [line for line in table.splitlines() if "| lazy | QGTOnTheFly |" in line]
    want = "| RBM alpha=16 | 256 | 4368 | lazy | QGTOnTheFly | 6.0 (5.9-7.0) | 5.0 (4.9-6.0) | 1.20x (1.20x) |"
    assert twin == [want]
