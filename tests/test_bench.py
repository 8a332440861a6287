"""The load benchmark's table and its Unsloth anchor case (the GPU timings themselves run on the device)."""
import pytest

from loadspec import bench


def _result(**extra):
    case = lambda load, again, fresh: [dict(load_s=load, again_s=again, first_forward_s=fresh, model_gib=4.0, peak_gib=4.5)]
    return dict(shape="8b", gpu="H100", torch="2.11", bf16_gib=14.0, nf4_gib=5.3,
                cases={"transformers_prequantized": case(1.5, 1.2, 10.0), "loadspec": case(0.3, 0.25, 4.0)},
                loadspec_build=dict(build_s=4.0, peak_rss_gib=1.5), loadspec_builds_s=[4.0, 5.0],
                transformers_quantize_and_save={}, cache_hit=dict(by_name_s=0.001, by_spec_s=0.006),
                logits=dict(equal=True, max_abs_diff=0.0), **extra)


def test_table_ratios_against_transformers_and_unsloth():
    unsloth = [dict(load_s=3.9, total_s=40.0, peak_gib=5.3), dict(load_s=3.0, total_s=36.0, peak_gib=5.3)]
    table = bench.report(_result(unsloth=unsloth))
    loadspec_row = next(line for line in table.splitlines() if line.startswith("loadspec "))
    assert loadspec_row.split()[-2:] == ["5.0x", "4.8x"]  # 1.5 / 0.3 and 1.2 / 0.25
    unsloth_row = next(line for line in table.splitlines() if line.startswith("unsloth_prequantized"))
    assert "3.000" in unsloth_row and "36.00*" in unsloth_row  # the best of the reps
    assert "loadspec is 10.0x faster in process, 9.0x fresh" in table
    assert "ERROR" not in table


def test_table_reports_unsloth_errors_and_missing_cases():
    result = _result(unsloth=[{"error": "No module named 'unsloth_zoo'"}])
    del result["cases"]["transformers_prequantized"]
    table = bench.report(result)
    assert "ERROR unsloth_prequantized: No module named 'unsloth_zoo'" in table
    assert "nan" in next(line for line in table.splitlines() if line.startswith("loadspec "))


def test_unsloth_case_runs_the_anchor_scripts_own_case(tmp_path):
    anchor = tmp_path / "unsloth_load.py"
    anchor.write_text("def run_case(name, root):\n    return dict(case=name, root=root, load_s=1.0)\n")
    assert bench.unsloth_load(anchor, tmp_path / "8b") == dict(case="unsloth_prequantized", root=str(tmp_path / "8b"), load_s=1.0)


def test_missing_anchor_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--unsloth-anchor", str(tmp_path / "nope.py")])
    assert exit_info.value.code == 2
    assert "no such file" in capsys.readouterr().err
