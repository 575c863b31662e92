"""The parts every training script shares (rule 1: written out in each file, the same everywhere): check that they
are in fact the same, and that each script's text loader reads what data_pipeline.py writes."""
import importlib
import inspect
import json

import pytest

TRAINING_SCRIPTS = ["zero", "tensor_parallel", "pipeline_parallel", "fsdp_train", "muon", "mixed_precision", "parallel_3d",
                    "expert_parallel"]
SETUP_SCRIPTS = TRAINING_SCRIPTS + ["collectives", "data_pipeline", "data_mixing"]
COMMON = ["GPTConfig", "Attention", "MLP", "Block", "TinyGPT", "load_text", "get_batch"]


TOOLS = ["now", "CommCounter"]  # every script but the two data chapters, which run on CPUs and count nothing


@pytest.mark.parametrize("name", COMMON + TOOLS + ["setup_distributed", "cleanup"])
def test_common_parts_are_identical_in_every_file(name):
    scripts = {"setup_distributed": SETUP_SCRIPTS, "cleanup": SETUP_SCRIPTS}.get(name, TRAINING_SCRIPTS)
    if name in TOOLS:
        scripts = [s for s in SETUP_SCRIPTS if not s.startswith("data_")]
    sources = {s: inspect.getsource(getattr(importlib.import_module(s), name)) for s in scripts}
    reference = sources["zero"]
    assert [s for s, src in sources.items() if src != reference] == []


@pytest.mark.parametrize("script", SETUP_SCRIPTS)
def test_common_core_comes_last(script):
    """The technique opens the file; the common core closes it, after main()."""
    text = inspect.getsource(importlib.import_module(script))
    core = text.index("# --- common core")
    assert text.index("def main(") < core < text.index("def setup_distributed(")


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_load_text_reads_a_file_a_folder_and_pipeline_jsonl(script, tmp_path):
    load_text = importlib.import_module(script).load_text
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("world")
    rows = [{"id": "1", "source": "x", "text": "first"}, {"id": "2", "source": "y", "text": "second"}]
    (tmp_path / "clean.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert bytes(load_text(str(tmp_path / "a.txt")).tolist()) == b"hello"
    assert bytes(load_text(str(tmp_path / "clean.jsonl")).tolist()) == b"first\n\nsecond"
    folder = bytes(load_text(str(tmp_path)).tolist())  # every text file below it, in sorted order
    assert folder == b"hello" + b"first\n\nsecond" + b"world"
    with pytest.raises(ValueError, match="no such file or folder"):
        load_text(str(tmp_path / "missing"))
