"""The student weights shipped in the package: the file, its record and what it builds."""

import hashlib
import json

import jax
import pytest

from dtpf_jax import checkpoint, infer, networks

SHIPPED = infer.WEIGHTS_DIR / infer.DEFAULT_STUDENT
RECORD = infer.WEIGHTS_DIR / "student_ivf.json"

pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="no student weights shipped")


def test_shipped_student_matches_its_record_and_the_official_student():
    blob = SHIPPED.read_bytes()
    record = json.loads(RECORD.read_text())
    assert len(blob) <= 16 * 2**20, "shipped weights must stay within 16 MiB"
    assert hashlib.sha256(blob).hexdigest() == record["sha256"], "record out of date"
    params, cfg, meta = checkpoint.load_params(SHIPPED)  # checks every tensor's shape
    assert json.loads(json.dumps(cfg.to_dict(), default=list)) == record["config"]
    official = networks.model_config("student")
    for key in ("dim", "num_blocks", "num_refinement_blocks", "ffn_expansion_factor", "text_dim"):
        assert cfg[key] == official[key], key
    assert sum(x.size for x in jax.tree.leaves(params)) == 4_371_772
    # distilled, or fine-tuned on the fusion loss alone (configs/distill.py:nodistill)
    assert meta["stage"] in ("distill", "student") and meta["stage"] == record["stage"]
    assert meta["step"] == record["step"]


def test_load_model_default_is_the_shipped_student():
    model = infer.load_model()
    assert model.trained and model.source == str(SHIPPED) and not model.text_guided
