"""Pure helpers of bench/spectral.py (the benchmark itself takes minutes and is not run here)."""

import numpy as np
import pytest

from workflow_utils import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("spectral")


def test_seven_b_seconds_formula(bench):
    sq, wide, tall = (4096, 4096), (4096, 11008), (11008, 4096)
    # 32 * 3 * (4 t_sq + 2 t_tall + 1 t_wide) + one Gaussian per distinct shape
    assert bench.seven_b_seconds({sq: 1.0, wide: 0.0, tall: 0.0}) == 32 * 12 + 1
    assert bench.seven_b_seconds({sq: 0.0, wide: 1.0, tall: 0.0}) == 32 * 3 + 1
    assert bench.seven_b_seconds({sq: 0.0, wide: 0.0, tall: 1.0}) == 32 * 6 + 1
    t = {sq: 10.0, wide: 30.0, tall: 20.0}
    assert bench.seven_b_seconds(t) == pytest.approx(32 * 3 * (40 + 40 + 30) + 60)
    assert bench.seven_b_seconds({sq: 2.0}, layers=1, per_layer={sq: 1}, per_matrix=1) == 4.0
    with pytest.raises(KeyError):
        bench.seven_b_seconds({sq: 1.0, wide: 1.0})
    assert bench.n_svds_7b() == 32 * 7 * 3 + 3 == 675


def test_fmt_duration(bench):
    assert bench.fmt_duration(5400).startswith("1.50 h")
    assert bench.fmt_duration(90) == "0.03 h (1.5 min)"


def test_agreement(bench):
    s = np.array([4.0, 2.0, 1.0])
    assert bench.agreement(s, s) == (0.0, 0.0)
    got_max, got_elem = bench.agreement(np.array([1.1, 2.0, 4.0]), s)  # unsorted input is sorted
    assert got_max == pytest.approx(0.1 / 4.0)
    assert got_elem == pytest.approx(0.1)
    with pytest.raises(ValueError):
        bench.agreement(s, s[:2])


def _row(shape, device, ours, numpy):
    return {"shape": shape, "device": device, "ours": ours, "numpy": numpy, "agree_max": 1e-6, "agree_elem": 1e-3}


def test_table_and_extrapolation(bench):
    sq, wide, tall = (4096, 4096), (4096, 11008), (11008, 4096)
    rows = [_row(sq, "cpu", 2.0, 4.0), _row(wide, "cpu", 5.0, 5.0), _row(tall, "cpu", 3.0, 6.0),
            _row((192, 512), "cuda", 0.001, 0.004), _row(sq, "cuda", 0.5, 4.0)]
    table = bench.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[2] == "| 4096x4096 | cpu | 2.00 | 4.00 | 2.00x | 1.0e-06 | 1.0e-03 |"
    assert "| 0.0010 | 0.0040 | 4.00x |" in table[5]
    lines = bench.extrapolation_lines(rows)
    assert len(lines) == 1 and lines[0].startswith("- cpu:")  # cuda lacks two of the 7B shapes
    ours = bench.seven_b_seconds({sq: 2.0, wide: 5.0, tall: 3.0})
    base = bench.seven_b_seconds({sq: 4.0, wide: 5.0, tall: 6.0})
    assert f"ours {ours / 3600:.2f} h ({ours / 60:.1f} min)" in lines[0]
    assert f"instead: {base / 3600:.2f} h" in lines[0]


def test_rank_lines(bench):
    lines = bench.rank_lines({(4096, 4096): (2088, 2088), (192, 512): (120, 120)})
    assert "| 4096x4096 | 2088 | 2088 | 2088 | 51.0% |" in lines
    assert any(line.startswith("| 192x512 | 120 | 120 | - |") for line in lines)
