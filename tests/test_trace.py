"""Load phase timings on the `loadspec` logger at DEBUG."""
import logging

import loadspec


def test_a_load_logs_its_phases_at_debug(checkpoint, write_spec, tmp_path, caplog):
    spec = write_spec(checkpoint("llama"), name="traced", load={"quant": "none", "dtype": "float32"})
    loadspec.build(spec, cache_dir=tmp_path, progress=False)
    with caplog.at_level(logging.INFO, logger="loadspec"):
        loadspec.load("traced", cache_dir=tmp_path)
    assert not [r for r in caplog.records if r.name == "loadspec" and "load phase" in r.getMessage()]  # silent by default
    with caplog.at_level(logging.DEBUG, logger="loadspec"):
        loadspec.load("traced", cache_dir=tmp_path)
    phases = [r.getMessage().split(":")[0].removeprefix("load phase ") for r in caplog.records if "load phase" in r.getMessage()]
    assert phases[:4] == ["imports", "skeleton", "tokenizer", "weights"]
    assert "adapter and checkpointing" in phases
