"""The student weights shipped in the package: each file, its record and what it builds."""

import hashlib
import json

import jax
import pytest

from dtpf_jax import checkpoint, infer, networks

# name -> file of each shipped student; 'student' is the default, an alias of 'student_ivf'.
SHIPPED = {
    name: infer.WEIGHTS_DIR / file
    for name, file in infer.SHIPPED_STUDENTS.items()
    if name != "student" and (infer.WEIGHTS_DIR / file).is_file()
}


@pytest.mark.parametrize("name", sorted(SHIPPED) or [pytest.param("none", marks=pytest.mark.skip)])
def test_shipped_student_matches_its_record_and_the_official_student(name):
    path = SHIPPED[name]
    blob = path.read_bytes()
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["file"] == path.name
    assert len(blob) <= 16 * 2**20, "shipped weights must stay within 16 MiB"
    assert hashlib.sha256(blob).hexdigest() == record["sha256"], "record out of date"
    params, cfg, meta = checkpoint.load_params(path)  # checks every tensor's shape
    assert json.loads(json.dumps(cfg.to_dict(), default=list)) == record["config"]
    official = networks.model_config("student")
    for key in ("dim", "num_blocks", "num_refinement_blocks", "ffn_expansion_factor", "text_dim"):
        assert cfg[key] == official[key], key
    assert sum(x.size for x in jax.tree.leaves(params)) == 4_371_772
    # distilled, or fine-tuned on the fusion loss alone (configs/distill.py:nodistill or
    # scripts/finetune_head.py)
    assert meta["stage"] in ("distill", "student") and meta["stage"] == record["stage"]
    assert meta["step"] == record["step"]
    # the run (config name) says the data: distill_med_<task>... for a medical student
    task = name.removeprefix("student_")
    assert meta["run"] == record["run"]
    assert (
        meta["run"].startswith(f"distill_med_{task}")
        if task != "ivf"
        else "_med" not in meta["run"]
    )


@pytest.mark.skipif("student_ivf" not in SHIPPED, reason="no student weights shipped")
def test_load_model_default_is_the_shipped_student():
    model = infer.load_model()
    assert model.trained and model.source == str(SHIPPED["student_ivf"]) and not model.text_guided
