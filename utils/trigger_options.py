"""The options and builders of the static triggers that several attacks share (BadNets' patch and Blended's
pattern are also Bypass's triggers): each a list of Opt and a function cfg -> (trigger, what poison.json records
of where it came from)."""
from utils.config import Opt, in_range
from utils.data import dataset_info
from utils.errors import UserError
from utils.triggers import BlendTrigger, PatchTrigger, badnet_pattern, blend_noise_pattern, file_sha256, \
    load_image_pattern


def parse_position(v):
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return [int(v[0]), int(v[1])]
    s = str(v)
    if "," in s:
        r, c = s.split(",")
        return [int(r), int(c)]
    return s


PATCH_OPTIONS = [
    Opt("patch_size", int, 3, "side of the square patch in pixels", check=in_range(1)),
    Opt("patch_position", parse_position, "bottom_right",
        "bottom_right, bottom_left, top_right, top_left, or 'row,col' of the patch's top-left pixel"),
    Opt("patch_value", int, 255, "pixel value of the patch (0-255 scale)", check=in_range(1, 255)),
    Opt("patch_mask_path", str, None, "an image file used as the pattern instead (non-zero pixels replace the image)"),
]

BLEND_OPTIONS = [
    Opt("attack_train_blended_alpha", float, 0.2, "blend weight of the pattern in poisoned training images",
        check=in_range(0, 1, lo_open=True)),
    Opt("attack_test_blended_alpha", float, 0.2, "blend weight in the poisoned test images", check=in_range(0, 1, lo_open=True)),
    Opt("blend_pattern_seed", int, 0, "seed of the noise pattern (independent of random_seed)", check=in_range(0)),
    Opt("attack_trigger_img_path", str, None, "an image file to blend instead of the noise pattern"),
]


def make_patch_trigger(cfg):
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
    return PatchTrigger(pattern), meta


def blend_pattern(cfg):
    """(uint8 pattern, meta): the image file of attack_trigger_img_path, or the seeded noise of blend_pattern_seed
    (Blended, Bypass's blend trigger, Adaptive-Blend)."""
    shape = dataset_info(cfg["dataset"]).shape
    if cfg["attack_trigger_img_path"]:
        return load_image_pattern(cfg["attack_trigger_img_path"], shape), {
            "source": "file", "file": cfg["attack_trigger_img_path"],
            "file_sha256": file_sha256(cfg["attack_trigger_img_path"])}
    return blend_noise_pattern(shape, cfg["blend_pattern_seed"]), {"source": "noise",
                                                                   "blend_pattern_seed": cfg["blend_pattern_seed"]}


def make_blend_trigger(cfg):
    pattern, meta = blend_pattern(cfg)
    return BlendTrigger(pattern, cfg["attack_train_blended_alpha"], cfg["attack_test_blended_alpha"]), meta
