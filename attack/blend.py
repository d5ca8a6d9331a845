"""Blended (Chen et al., arXiv 1712.05526): blend a pattern into a fraction of the training images,
x' = (1 - alpha) x + alpha P, and relabel them to the target. Default pattern: seeded uniform noise
(the paper's random-pattern variant; conventions §6.2).

    python attack/blend.py --save_folder_name blend_demo
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from utils.attack import attack_config, run_attack  # noqa: E402
from utils.config import Opt, in_range  # noqa: E402
from utils.data import dataset_info  # noqa: E402
from utils.errors import run_main  # noqa: E402
from utils.triggers import Trigger, blend_noise_pattern, file_sha256, load_image_pattern  # noqa: E402

OPTIONS = [
    Opt("attack_train_blended_alpha", float, 0.2, "blend weight of the pattern in poisoned training images",
        check=in_range(0, 1, lo_open=True)),
    Opt("attack_test_blended_alpha", float, 0.2, "blend weight in the poisoned test images", check=in_range(0, 1, lo_open=True)),
    Opt("blend_pattern_seed", int, 0, "seed of the noise pattern (independent of random_seed)", check=in_range(0)),
    Opt("attack_trigger_img_path", str, None, "an image file to blend instead of the noise pattern"),
]


def make_trigger(cfg):
    shape = dataset_info(cfg["dataset"]).shape
    if cfg["attack_trigger_img_path"]:
        pattern = load_image_pattern(cfg["attack_trigger_img_path"], shape)
        meta = {"source": "file", "file": cfg["attack_trigger_img_path"],
                "file_sha256": file_sha256(cfg["attack_trigger_img_path"])}
    else:
        pattern = blend_noise_pattern(shape, cfg["blend_pattern_seed"])
        meta = {"source": "noise", "blend_pattern_seed": cfg["blend_pattern_seed"]}
    return Trigger("blend", pattern, cfg["attack_train_blended_alpha"], cfg["attack_test_blended_alpha"]), meta


def configure(argv=None):
    """Every setting resolved and checked and the trigger made, nothing written (the sweep checks its jobs with this)."""
    cfg, args = attack_config("blend", OPTIONS, argv, __doc__)
    return cfg, args, *make_trigger(cfg)


def main(argv=None):
    cfg, args, trigger, meta = configure(argv)
    return run_attack("blend", cfg, args, trigger, meta)


if __name__ == "__main__":
    run_main(main)
