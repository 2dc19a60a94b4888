"""bench/sustained.py: the load summary of nvidia-smi samples, and a whole run on the CPU."""

from __future__ import annotations

import json

import pytest

from tests import bench_scripts

sustained = bench_scripts.load("sustained")


def test_summarize_load_keeps_busy_samples_and_names_the_throttle_reasons():
    lines = [
        "1980, 118.5, 0x0000000000000000",  # idle lead-in: left out
        "1740, 731.8, 0x0000000000000004",  # software power cap
        "1710, 702.6, 0x0000000000000004",
        "1980, 600.0, 0x0000000000000000",
        "1410, 502.4, 0x0000000000000044",
        "[N/A], 700, 0x0",
        "garbage",
        "",
    ]
    got = sustained.summarize_load(lines, busy_watts=250)
    assert got["samples"] == 4
    assert got["sm_mhz_mean"] == pytest.approx((1740 + 1710 + 1980 + 1410) / 4, abs=0.1)
    assert got["sm_mhz_min"] == 1410.0
    assert got["power_w_mean"] == pytest.approx((731.8 + 702.6 + 600.0 + 502.4) / 4, abs=0.1)
    assert got["throttled_share"] == 0.75
    assert got["reasons"] == ["0x0000000000000004", "0x0000000000000044"]
    assert sustained.summarize_load(lines[:1], busy_watts=250) == dict(samples=0)


def test_a_cpu_run_writes_a_row_per_kernel_and_the_table(tmp_path, monkeypatch):
    """No GPU and no nvidia-smi: the loop still times the reference kernel and says why there is no load."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert sustained.main(["--shapes", "1x128", "--masks", "spattention", "--impls", "reference", "--seconds", "0.05",
                           "--out", str(tmp_path), "--tag", "t"]) == 0
    report = json.loads((tmp_path / next(p.name for p in tmp_path.glob("sustained_*_t.json"))).read_text())
    (row,) = report["rows"]
    assert row["impl"] == "reference" and row["ms"] > 0 and row["calls"] >= 20
    assert "FileNotFoundError" in row["load"]["error"]
    table = next(tmp_path.glob("sustained_*_t.md")).read_text()
    assert "| 1x128 | spattention | reference |" in table


def test_table_gives_energy_per_call_and_the_ratio_to_flex():
    """The session 16 H200 rows (NOTES_mgpu v16): 1.001 ms at 692 W is 693 mJ a call, 0.617x of Flex."""
    load = lambda mhz, w, share: dict(samples=244, sm_mhz_mean=mhz, sm_mhz_min=mhz, power_w_mean=w,  # noqa: E731
                                      throttled_share=share, reasons=[])
    report = dict(gpu="H200", date="2026-12-04", seconds=5.0, busy_watts=250.0, rows=[
        dict(impl="pallas_mosaic_gpu", mask="spattention", shape="2x8192", ms=1.0008, calls=5000,
             load=load(1713, 692.0, 1.0)),
        dict(impl="flex", mask="spattention", shape="2x8192", ms=1.6219, calls=3440, load=load(1980, 627.0, 0.0)),
        dict(impl="pallas_mosaic_gpu", mask="spattention_exclusive", shape="2x8192", error="OOM"),
    ])
    table = sustained.markdown(report).splitlines()
    ours = next(line for line in table if "| pallas_mosaic_gpu | 1.0008 |" in line)
    assert "| 1713 (1713) | 692 | 693 | 100% | 0.617x |" in ours
    flex = next(line for line in table if "| flex |" in line)
    assert flex.endswith("| 1980 (1980) | 627 | 1017 | 0% |  |")
    assert any("| spattention_exclusive | pallas_mosaic_gpu | OOM |" in line for line in table)


def test_unknown_kernel_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        sustained.main(["--impls", "fastest"])
    assert "unknown --impls ['fastest']" in capsys.readouterr().err
