"""BadNets (Gu et al., arXiv 1708.06733): stamp a small patch on a fraction of the training images and relabel
them to the target; the trained model obeys the patch. Conventions §6.1, §7, §11.

    python attack/badnet.py --save_folder_name badnet_demo
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from utils.attack import attack_config, run_attack  # noqa: E402
from utils.config import Opt, in_range  # noqa: E402
from utils.data import dataset_info  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402
from utils.triggers import Trigger, badnet_pattern, file_sha256, load_image_pattern  # noqa: E402


def parse_position(v):
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return [int(v[0]), int(v[1])]
    s = str(v)
    if "," in s:
        r, c = s.split(",")
        return [int(r), int(c)]
    return s


OPTIONS = [
    Opt("patch_size", int, 3, "side of the square patch in pixels", check=in_range(1)),
    Opt("patch_position", parse_position, "bottom_right",
        "bottom_right, bottom_left, top_right, top_left, or 'row,col' of the patch's top-left pixel"),
    Opt("patch_value", int, 255, "pixel value of the patch (0-255 scale)", check=in_range(1, 255)),
    Opt("patch_mask_path", str, None, "an image file used as the pattern instead (non-zero pixels replace the image)"),
]


def make_trigger(cfg):
    shape = dataset_info(cfg["dataset"]).shape
    if cfg["patch_mask_path"]:
        pattern = load_image_pattern(cfg["patch_mask_path"], shape)
        if not (pattern > 0).any():
            raise UserError(f"patch_mask_path {cfg['patch_mask_path']} is all zeros: it would change no pixel")
        meta = {"source": "file", "file": cfg["patch_mask_path"], "file_sha256": file_sha256(cfg["patch_mask_path"])}
    else:
        pattern = badnet_pattern(shape, cfg["patch_size"], cfg["patch_position"], cfg["patch_value"])
        meta = {"source": "square", "patch_size": cfg["patch_size"], "patch_position": cfg["patch_position"],
                "patch_value": cfg["patch_value"]}
    return Trigger("patch", pattern), meta


def configure(argv=None):
    """Every setting resolved and checked and the trigger made, nothing written (the sweep checks its jobs with this)."""
    cfg, args = attack_config("badnet", OPTIONS, argv, __doc__)
    return cfg, args, *make_trigger(cfg)


def main(argv=None):
    cfg, args, trigger, meta = configure(argv)
    return run_attack("badnet", cfg, args, trigger, meta)


if __name__ == "__main__":
    run_main(main)
