"""A short real run: BadNets and Blended on a 6,000-image subset of the real Fashion-MNIST."""
import json

from tests.conftest import make_record


def test_badnet_real_subset_learns_task_and_backdoor(real_badnet_record):
    s = json.loads((real_badnet_record / "summary.json").read_text())
    assert s["test_acc"] > 0.75 and s["test_asr"] > 0.9 and s["test_ra"] < 0.1


def test_blend_real_subset_learns_task_and_backdoor(tmp_path, real_subset_root):
    s = make_record(tmp_path / "blend_real", real_subset_root, "blend",
                    ["--epochs", "6", "--cos_t_max", "6", "--batch_size", "64"])
    assert s["test_acc"] > 0.75 and s["test_asr"] > 0.85
